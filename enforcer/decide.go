package enforcer

import (
	"maps"
	"slices"
	"sync"
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

// dirtySet holds the tenants to decide again, for the publisher's writer.
// Its lock is taken last: under the tracker's and the billing records'.
type dirtySet struct {
	mu      sync.Mutex
	tenants map[string]time.Time // tenant → arrival of the increment that crossed a limit
	wake    chan struct{}        // signalled on every mark
}

func newDirtySet() *dirtySet {
	return &dirtySet{tenants: map[string]time.Time{}, wake: make(chan struct{}, 1)}
}

// mark has tenant decided again. cause, when set, is when the usage that
// crossed a limit was sealed (the increment's arrival when it does not
// say): the start of the freshness the write of the block is measured by.
func (d *dirtySet) mark(tenant string, cause time.Time) {
	d.mu.Lock()
	if prev, ok := d.tenants[tenant]; !ok || prev.IsZero() || (!cause.IsZero() && cause.Before(prev)) {
		d.tenants[tenant] = cause
	}
	d.mu.Unlock()
	signal(d.wake)
}

// take returns the dirty tenants and empties the set.
func (d *dirtySet) take() map[string]time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	taken := d.tenants
	d.tenants = map[string]time.Time{}
	return taken
}

// putBack returns a taken tenant whose write failed, unless it was marked
// again meanwhile.
func (d *dirtySet) putBack(tenant string, cause time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, again := d.tenants[tenant]; !again {
		d.tenants[tenant] = cause
	}
}

// decide returns tenant's decision (nil: not blocked); known is false when
// it depends on usage not read from the store yet.
func (t *tracker) decide(tenant string, prev *schemas.Decision) (d *schemas.Decision, known bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	ten, plan, ok := t.cat.Tenant(tenant)
	if !ok {
		return nil, true
	}
	if st := t.billing.worstStatus(tenant, ten.Status, true); st != catalog.StatusActive {
		return &schemas.Decision{Tenant: tenant, Reason: statusReason[st], BillingURL: ten.BillingURL}, true
	}
	u := t.usage[tenant]
	if u == nil || !u.seeded {
		return nil, false
	}
	return decideQuota(tenant, plan, t.cat.Limits(tenant), u, ten.BillingURL, prev), true
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
