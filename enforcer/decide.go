package enforcer

import (
	"maps"
	"slices"
	"time"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/schemas"
)

// Derived billing statuses, worst last. A tenant's billing status is the
// worst of its configured status (catalog.Status*), the states of its
// invoices and the status of its latest subscription (see billingRecord).
// StatusIncomplete stands for every "a payment method or action is needed"
// state: Stripe's incomplete and incomplete_expired subscriptions and
// invoice.payment_action_required.
const (
	StatusIncomplete = "incomplete"
)

// statusRank orders the statuses a tenant can be in; an unknown status
// ranks with active.
var statusRank = map[string]int{
	catalog.StatusActive:    0,
	StatusIncomplete:        1,
	catalog.StatusPastDue:   2,
	catalog.StatusUnpaid:    3,
	catalog.StatusCanceled:  4,
	catalog.StatusSuspended: 5,
}

// statusReason is the reason a tenant blocked for status is given.
var statusReason = map[string]schemas.Reason{
	StatusIncomplete:        schemas.ReasonPaymentMethodRequired,
	catalog.StatusPastDue:   schemas.ReasonPaymentOverdue,
	catalog.StatusUnpaid:    schemas.ReasonPaymentOverdue,
	catalog.StatusCanceled:  schemas.ReasonSuspended,
	catalog.StatusSuspended: schemas.ReasonSuspended,
}

// DefaultBlockOn is the default of Config.BlockOn: every status but active.
var DefaultBlockOn = []string{catalog.StatusPastDue, catalog.StatusUnpaid, catalog.StatusCanceled, catalog.StatusSuspended, StatusIncomplete}

// worse reports whether status a ranks above b.
func worse(a, b string) bool { return statusRank[a] > statusRank[b] }

// markDirtyLocked has tenant decided again. cause, when set, is when the
// usage that crossed a limit was sealed (the increment's arrival when it
// does not say): the start of the freshness the write of the block is
// measured by.
func (e *Enforcer) markDirtyLocked(tenant string, cause time.Time) {
	if prev, ok := e.dirty[tenant]; !ok || prev.IsZero() || (!cause.IsZero() && cause.Before(prev)) {
		e.dirty[tenant] = cause
	}
	signal(e.wake)
}

// decideLocked returns tenant's decision (nil: not blocked); known is false
// when it depends on usage not read from the store yet.
func (e *Enforcer) decideLocked(tenant string, prev *schemas.Decision) (d *schemas.Decision, known bool) {
	t, plan, ok := e.cat.Tenant(tenant)
	if !ok {
		return nil, true
	}
	if st := e.worstStatusLocked(tenant, t.Status, true); st != catalog.StatusActive {
		return &schemas.Decision{Tenant: tenant, Reason: statusReason[st], BillingURL: t.BillingURL}, true
	}
	u := e.usage[tenant]
	if u == nil || !u.seeded {
		return nil, false
	}
	return decideQuota(tenant, plan, e.cat.Limits(tenant), u, t.BillingURL, prev), true
}

// worstStatusLocked is the worst of tenant's configured status and the
// statuses of its billing record, among those that block when blocking.
func (e *Enforcer) worstStatusLocked(tenant, configured string, blocking bool) string {
	worst := catalog.StatusActive
	rec := e.records[tenant]
	for _, st := range append([]string{configured}, rec.statuses()...) {
		if (!blocking || e.blockOn[st]) && worse(st, worst) {
			worst = st
		}
	}
	return worst
}

// billingStatusLocked is tenant's billing status, blocking or not.
func (e *Enforcer) billingStatusLocked(tenant string) string {
	t, _, _ := e.cat.Tenant(tenant)
	return e.worstStatusLocked(tenant, t.Status, false)
}

// sameBlock reports whether two decisions block for the same thing: a
// change of reason, meter, limit, period or billing URL is a new decision;
// a change of usage alone is not (the value keeps the usage at blocking).
func sameBlock(a, b schemas.Decision) bool {
	return a.Tenant == b.Tenant && a.Reason == b.Reason && a.Meter == b.Meter && a.Limit == b.Limit &&
		a.PeriodStart.Equal(b.PeriodStart) && a.PeriodEnd.Equal(b.PeriodEnd) && a.BillingURL == b.BillingURL
}

// decideQuota returns the quota block of a tenant of plan with limits and
// usage u, or nil. Among the meters at or over their limit it keeps the one
// of the current block (prev), so a second meter crossing does not rewrite
// the decision, else it takes the first by name.
func decideQuota(tenant string, plan catalog.Plan, limits map[string]int64, u *tenantUsage, billingURL string, prev *schemas.Decision) *schemas.Decision {
	if plan.OnExceed == catalog.OnExceedOverage {
		return nil
	}
	meter := ""
	for _, m := range slices.Sorted(maps.Keys(limits)) {
		if u.used[m] < limits[m] {
			continue
		}
		if prev != nil && prev.Reason == schemas.ReasonQuotaExceeded && prev.Meter == m {
			meter = m
			break
		}
		if meter == "" {
			meter = m
		}
	}
	if meter == "" {
		return nil
	}
	return &schemas.Decision{
		Tenant: tenant, Reason: schemas.ReasonQuotaExceeded, Meter: meter,
		Limit: limits[meter], Used: u.used[meter],
		PeriodStart: u.period.Start, PeriodEnd: u.period.End, BillingURL: billingURL,
	}
}
