package schemas

import "time"

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
	// collector's clock; see aggregator.Committed.SealedAt). Gates measure
	// freshness from it; it is zero for any other decision.
	CrossedAt time.Time `json:"crossed_at,omitzero"`
}
