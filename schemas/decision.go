package schemas

import (
	"fmt"
	"time"
)

// Reason says why a tenant is blocked.
type Reason string

// The reasons of docs/architecture.md#decision.
const (
	ReasonQuotaExceeded         Reason = "quota_exceeded"
	ReasonPaymentOverdue        Reason = "payment_overdue"
	ReasonPaymentMethodRequired Reason = "payment_method_required"
	ReasonSuspended             Reason = "suspended"
)

// Decision is the value of a tenant's key in the blocklist bucket: the tenant
// is blocked for Reason. Version only grows per tenant; a gate ignores an
// older version than the one it holds.
type Decision struct {
	Tenant      string    `json:"tenant"`
	Reason      Reason    `json:"reason"`
	Meter       string    `json:"meter,omitempty"`
	Limit       int64     `json:"limit,omitempty"`
	Used        int64     `json:"used,omitempty"`
	PeriodStart time.Time `json:"period_start,omitzero"`
	PeriodEnd   time.Time `json:"period_end,omitzero"`
	BillingURL  string    `json:"billing_url,omitempty"`
	Version     uint64    `json:"version"`
	DecidedAt   time.Time `json:"decided_at"`
	// CrossedAt, on a quota_exceeded block caused by usage as it arrived,
	// is when the batch holding the crossing usage was sealed (on the
	// collector's clock; see Committed.SealedAt). Gates measure
	// freshness from it; it is zero for any other decision.
	CrossedAt time.Time `json:"crossed_at,omitzero"`
}

// FreshnessBuckets are the buckets of the freshness histograms (seconds) of
// the gates and the enforcer, dense around the 1 s freshness target
// (docs/architecture.md#freshness-and-the-gate) so alerts can ask for the
// share of blocks slower than it.
var FreshnessBuckets = []float64{0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30}

// Detail is the sentence a person reads about d: what happened and what to
// do. It is the detail of the gate's 402 and of the enforcer's usage summary.
func (d Decision) Detail() string {
	at := func(action string) string {
		if d.BillingURL == "" {
			return action
		}
		return action + " at " + d.BillingURL
	}
	switch d.Reason {
	case ReasonQuotaExceeded:
		period := "the current period"
		if !d.PeriodEnd.IsZero() {
			period = "the period ending " + d.PeriodEnd.UTC().Format(time.RFC3339)
		}
		return fmt.Sprintf("%s used %d of %d %s in %s; upgrade the plan or wait for the next period.",
			d.Tenant, d.Used, d.Limit, d.Meter, period)
	case ReasonPaymentOverdue:
		return fmt.Sprintf("%s's payment is overdue; %s to restore access.", d.Tenant, at("pay the open invoice"))
	case ReasonPaymentMethodRequired:
		return fmt.Sprintf("%s has no valid payment method; %s to restore access.", d.Tenant, at("add one"))
	default: // ReasonSuspended
		return fmt.Sprintf("%s's account is suspended; %s to restore access.", d.Tenant, at("contact the provider"))
	}
}
