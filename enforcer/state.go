package enforcer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/meterd/meterd/internal/billing"
	"github.com/meterd/meterd/internal/saturating"
	"github.com/meterd/meterd/schemas"
)

// Derived billing statuses, worst last. A tenant's billing status is the
// worst of its configured status (billing.Status*), the states of its
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
	billing.StatusActive:    0,
	StatusIncomplete:        1,
	billing.StatusPastDue:   2,
	billing.StatusUnpaid:    3,
	billing.StatusCanceled:  4,
	billing.StatusSuspended: 5,
}

// statusReason is the reason a tenant blocked for status is given.
var statusReason = map[string]schemas.Reason{
	StatusIncomplete:        schemas.ReasonPaymentMethodRequired,
	billing.StatusPastDue:   schemas.ReasonPaymentOverdue,
	billing.StatusUnpaid:    schemas.ReasonPaymentOverdue,
	billing.StatusCanceled:  schemas.ReasonSuspended,
	billing.StatusSuspended: schemas.ReasonSuspended,
}

// DefaultBlockOn is the default of Config.BlockOn: every status but active.
var DefaultBlockOn = []string{billing.StatusPastDue, billing.StatusUnpaid, billing.StatusCanceled, billing.StatusSuspended, StatusIncomplete}

// worse reports whether status a ranks above b.
func worse(a, b string) bool { return statusRank[a] > statusRank[b] }

// tenantUsage is a tenant's usage in its current billing period.
type tenantUsage struct {
	period billing.Period
	// used is the usage per meter in period; meaningful once seeded.
	used map[string]int64
	// next holds increments for hours at or after period.End (event times
	// may lie up to 5 minutes ahead, and clocks differ): the start of the
	// next period's usage when the period rolls over.
	next map[string]int64
	// seeded is set when used was computed from the store (plus the
	// increments since). An unseeded tenant keeps its quota decision.
	seeded bool
}

func newTenantUsage(p billing.Period) *tenantUsage {
	return &tenantUsage{period: p, used: map[string]int64{}, next: map[string]int64{}}
}

// add counts value units of meter used in the hour starting at hour, and
// returns the usage before and after; counted is false when the hour lies
// outside the period.
func (u *tenantUsage) add(meter string, hour time.Time, value int64) (before, after int64, counted bool) {
	switch {
	case u.period.Contains(hour):
		before = u.used[meter]
		after = saturating.Add(before, value)
		u.used[meter] = after
		return before, after, true
	case !hour.Before(u.period.End):
		u.next[meter] = saturating.Add(u.next[meter], value)
	}
	// An hour before the period: a late event of an earlier period, which
	// does not count toward the current one.
	return 0, 0, false
}

// roll moves u to period p. The usage of the period that directly follows
// is known (next); any other jump needs a reseed from the store, reported
// by the result.
func (u *tenantUsage) roll(p billing.Period) (needReseed bool) {
	if p.Start.Equal(u.period.End) {
		u.used, u.next = u.next, map[string]int64{}
	} else {
		u.used, u.next, u.seeded = map[string]int64{}, map[string]int64{}, false
	}
	u.period = p
	return !u.seeded
}

// thresholdUnits is the usage at which pct percent of limit is reached:
// ceil(limit·pct/100), exact for every int64 limit (pct is 80 or 100).
func thresholdUnits(limit int64, pct int) int64 {
	if pct == 100 {
		return limit
	}
	return limit - limit/5 // ceil(0.8·limit)
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
func decideQuota(tenant string, plan billing.Plan, limits map[string]int64, u *tenantUsage, billingURL string, prev *schemas.Decision) *schemas.Decision {
	if plan.OnExceed == billing.OnExceedOverage {
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

// tenantSpec is a tenant as the admin API sets it: each field given replaces
// the catalog file's value for the tenant; a field left out (or null) keeps
// it. It is the body of PUT /v1/tenants/{tenant} and the value of the
// tenant's key in the meterd-tenants bucket.
type tenantSpec struct {
	Plan          *string        `json:"plan,omitempty"`
	BillingAnchor *string        `json:"billing_anchor,omitempty"`
	BillingURL    *string        `json:"billing_url,omitempty"`
	CustomerID    *string        `json:"customer_id,omitempty"`
	Status        *string        `json:"status,omitempty"`
	Overrides     *specOverrides `json:"overrides,omitempty"`
}

type specOverrides struct {
	Limits map[string]int64 `json:"limits"`
}

// parseAnchor reads a billing anchor as the catalog file does: a date
// (2026-01-15, midnight UTC) or an RFC 3339 time.
func parseAnchor(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	for _, layout := range []string{time.DateOnly, time.RFC3339Nano} {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("must be a date (2026-01-15) or an RFC 3339 time, not %q", s)
}

// fieldError is what is wrong with one field of a tenant: the field path
// as in the catalog file (plan, overrides.limits.api_calls), empty for the
// tenant itself.
type fieldError struct{ Field, Message string }

func (e *fieldError) Error() string {
	if e.Field == "" {
		return e.Message
	}
	return e.Field + ": " + e.Message
}

// applyTo returns base with the fields of s applied.
func (s tenantSpec) applyTo(base billing.Tenant) (billing.Tenant, *fieldError) {
	t := base
	if s.Plan != nil {
		t.Plan = *s.Plan
	}
	if s.BillingAnchor != nil {
		a, err := parseAnchor(*s.BillingAnchor)
		if err != nil {
			return t, &fieldError{Field: "billing_anchor", Message: err.Error()}
		}
		t.BillingAnchor = a
	}
	if s.BillingURL != nil {
		t.BillingURL = *s.BillingURL
	}
	if s.CustomerID != nil {
		t.CustomerID = *s.CustomerID
	}
	if s.Status != nil {
		t.Status = *s.Status
	}
	if s.Overrides != nil {
		t.Overrides.Limits = s.Overrides.Limits
	}
	return t, nil
}

// mergeCatalog builds the catalog the enforcer decides by: the file's
// tenants with the admin API's specs applied, and the tenants only the API
// defines. A spec that no longer fits the file (its plan was removed, its
// customer id now belongs to a file tenant) is left out and returned in
// dropped with the reasons, so that one stale spec cannot stop a reload.
// The spec of tenant last, if any, is applied last: of two specs in conflict
// (the same customer id), that one is dropped.
func mergeCatalog(file *billing.Catalog, specs map[string]tenantSpec, last string) (cat *billing.Catalog, dropped map[string][]*fieldError) {
	dropped = map[string][]*fieldError{}
	for {
		cat, errs := buildCatalog(file, specs, dropped, last)
		if len(errs) == 0 {
			return cat, dropped
		}
		progress := false
		for name, fes := range errs {
			if _, isSpec := specs[name]; isSpec && dropped[name] == nil {
				dropped[name] = fes
				progress = true
			}
		}
		if !progress {
			// The file catalog itself is valid, so this cannot happen;
			// fall back to it rather than to nothing.
			return file, dropped
		}
	}
}

// buildCatalog merges file and the specs not in skip; errs maps a tenant to
// what is wrong with it.
func buildCatalog(file *billing.Catalog, specs map[string]tenantSpec, skip map[string][]*fieldError, last string) (*billing.Catalog, map[string][]*fieldError) {
	errs := map[string][]*fieldError{}
	// The tenants with a spec go last: NewCatalog blames the later of two
	// tenants sharing a customer id, and that must be the spec, never a
	// tenant of the file.
	var tenants []billing.Tenant
	for _, name := range file.TenantNames() {
		if _, ok := specs[name]; !ok || skip[name] != nil {
			t, _, _ := file.Tenant(name)
			tenants = append(tenants, t)
		}
	}
	names := slices.Sorted(maps.Keys(specs))
	if i := slices.Index(names, last); i >= 0 {
		names = append(slices.Delete(names, i, i+1), last)
	}
	for _, name := range names {
		if skip[name] != nil {
			continue
		}
		base, _, ok := file.Tenant(name)
		if !ok {
			base = billing.Tenant{Name: name}
		}
		t, fe := specs[name].applyTo(base)
		if fe != nil {
			errs[name] = append(errs[name], fe)
			continue
		}
		tenants = append(tenants, t)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	// Only the plans tenants name: the catalog offers no list of plans, and
	// a plan no tenant is on decides nothing. A plan the file lacks is
	// left out, so NewCatalog reports the tenant naming it.
	var plans []billing.Plan
	named := map[string]bool{}
	for _, t := range tenants {
		if t.Plan == "" || named[t.Plan] {
			continue
		}
		named[t.Plan] = true
		if p, ok := file.Plan(t.Plan); ok {
			plans = append(plans, p)
		}
	}
	cat, err := billing.NewCatalog(plans, tenants)
	if err != nil {
		for _, ce := range catalogErrors(err) {
			name, field := splitTenantPath(ce.Path)
			errs[name] = append(errs[name], &fieldError{Field: field, Message: ce.Message})
		}
		return nil, errs
	}
	return cat, nil
}

// catalogErrors lists the *billing.CatalogError joined in err.
func catalogErrors(err error) []*billing.CatalogError {
	var out []*billing.CatalogError
	var walk func(error)
	walk = func(err error) {
		if ce, ok := err.(*billing.CatalogError); ok {
			out = append(out, ce)
			return
		}
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		if e := errors.Unwrap(err); e != nil {
			walk(e)
		}
	}
	walk(err)
	return out
}

// splitTenantPath splits a CatalogError path tenants.<name>.<field…> into
// the tenant's name and the field path (empty for the tenant itself). A name
// with characters other than letters, digits, '_' and '-' is quoted.
func splitTenantPath(path string) (tenant, field string) {
	rest, ok := strings.CutPrefix(path, "tenants.")
	if !ok {
		return "", path
	}
	if strings.HasPrefix(rest, `"`) {
		q, err := strconv.QuotedPrefix(rest)
		if err != nil {
			return "", path
		}
		tenant, _ = strconv.Unquote(q)
		rest = rest[len(q):]
	} else {
		i := strings.IndexByte(rest, '.')
		if i < 0 {
			return rest, ""
		}
		tenant, rest = rest[:i], rest[i:]
	}
	return tenant, strings.TrimPrefix(rest, ".")
}

// onCommitted counts a committed increment of the aggregator.
func (e *Enforcer) onCommitted(msg *nats.Msg) {
	arrived := time.Now()
	var c schemas.Committed
	if err := json.Unmarshal(msg.Data, &c); err != nil || c.Tenant == "" || c.Meter == "" {
		e.log.Warn("malformed committed increment ignored", "subject", msg.Subject, "err", err)
		return
	}
	c.Hour = c.Hour.UTC()
	e.mu.Lock()
	defer e.mu.Unlock()
	u := e.usage[c.Tenant]
	if u == nil {
		return // not a tenant of the catalog (or not tracking yet)
	}
	e.rollLocked(c.Tenant, u, e.now())
	for j := range e.journals {
		j.add(c)
	}
	before, after, counted := u.add(c.Meter, c.Hour, c.Value)
	if !counted || !u.seeded {
		return
	}
	limit, ok := e.cat.Limit(c.Tenant, c.Meter)
	if !ok {
		return
	}
	if before < limit && after >= limit {
		cause := arrived
		if !c.SealedAt.IsZero() && c.SealedAt.Before(arrived) {
			cause = c.SealedAt
		}
		e.markDirtyLocked(c.Tenant, cause)
	}
	e.checkThresholdLocked(c.Tenant, u, c.Meter, limit)
}

// rollLocked moves tenant to the period containing now once its period
// ended.
func (e *Enforcer) rollLocked(tenant string, u *tenantUsage, now time.Time) {
	if now.Before(u.period.End) {
		return
	}
	if u.roll(e.cat.PeriodOf(tenant, now)) {
		e.reseed[tenant] = true
		signal(e.reseedWake)
	}
	delete(e.notified, tenant)
	e.markDirtyLocked(tenant, time.Time{})
	e.checkThresholdsLocked(tenant, u)
}

// checkThresholdsLocked queues the notifications of every limit of tenant
// its usage reached.
func (e *Enforcer) checkThresholdsLocked(tenant string, u *tenantUsage) {
	for meter, limit := range e.cat.Limits(tenant) {
		e.checkThresholdLocked(tenant, u, meter, limit)
	}
}

// notifyThresholds are the percentages of a limit that are notified.
var notifyThresholds = []int{WarnPercent, 100}

// checkThresholdLocked queues a notification for each threshold of meter's
// limit the usage reached and that was not queued this period. A limit of 0
// has no thresholds worth telling.
func (e *Enforcer) checkThresholdLocked(tenant string, u *tenantUsage, meter string, limit int64) {
	if !u.seeded || limit <= 0 {
		return
	}
	used := u.used[meter]
	for _, pct := range notifyThresholds {
		if used < thresholdUnits(limit, pct) {
			return
		}
		id := thresholdID(tenant, meter, u.period.Start, pct)
		if e.notified[tenant][id] {
			continue
		}
		if e.notified[tenant] == nil {
			e.notified[tenant] = map[string]bool{}
		}
		e.notified[tenant][id] = true
		e.notify.enqueue(Notification{
			Type: NotifyUsageThreshold, ID: id, Tenant: tenant, Meter: meter, Threshold: pct,
			Used: used, Limit: limit, PeriodStart: u.period.Start, PeriodEnd: u.period.End, At: e.now(),
		})
	}
}

// journal collects the increments that arrive while a totals query runs,
// for the tenants it queries (see the package documentation).
type journal struct {
	periods map[string]billing.Period
	adds    map[string]map[string]int64
}

func (j *journal) add(c schemas.Committed) {
	p, ok := j.periods[c.Tenant]
	if !ok || !p.Contains(c.Hour) {
		return
	}
	if j.adds[c.Tenant] == nil {
		j.adds[c.Tenant] = map[string]int64{}
	}
	j.adds[c.Tenant][c.Meter] = saturating.Add(j.adds[c.Tenant][c.Meter], c.Value)
}

// errUnseeded is returned by reconcile when the store answered but not for
// some tenants: every other tenant was set, and those wait in e.reseed for
// the next try, keeping their decisions meanwhile.
var errUnseeded = errors.New("enforcer: the usage of some tenants could not be read from the store")

// reconcile recomputes the usage of tenants (nil: all) from the store, with
// one Totals query per distinct current period, and replaces the in-memory
// usage by it plus the increments that arrived since that query started.
func (e *Enforcer) reconcile(ctx context.Context, tenants []string) error {
	start := time.Now()
	e.mu.Lock()
	if tenants == nil {
		tenants = slices.Collect(maps.Keys(e.usage))
	}
	type group struct {
		period  billing.Period
		tenants []string
	}
	groups := map[[2]int64]*group{}
	now := e.now()
	for _, t := range tenants {
		u := e.usage[t]
		if u == nil {
			continue
		}
		e.rollLocked(t, u, now)
		k := [2]int64{u.period.Start.UnixNano(), u.period.End.UnixNano()}
		if groups[k] == nil {
			groups[k] = &group{period: u.period}
		}
		groups[k].tenants = append(groups[k].tenants, t)
	}
	e.mu.Unlock()

	var errs, unseeded []error
	queried, corrected := 0, 0
	for _, g := range groups {
		n, c, failed, err := e.reconcilePeriod(ctx, g.period, g.tenants)
		if err != nil {
			errs = append(errs, err)
		}
		unseeded = append(unseeded, failed...)
		queried, corrected = queried+n, corrected+c
	}
	e.m.corrections.Add(float64(corrected))
	if len(errs) > 0 {
		e.m.reconciles.WithLabelValues("error").Inc()
		return errors.Join(errs...)
	}
	if len(unseeded) > 0 {
		e.m.reconciles.WithLabelValues("error").Inc()
		return fmt.Errorf("%w: %w", errUnseeded, errors.Join(unseeded...))
	}
	e.m.reconciles.WithLabelValues("ok").Inc()
	e.log.Debug("usage reconciled", "tenants", queried, "periods", len(groups), "corrected", corrected, "took", time.Since(start))
	return nil
}

// reconcilePeriod reconciles tenants whose current period is p with one
// Totals query. If that fails while the store answers a ping, something in
// the data may break the query (as SQLite's overflowing sum once did for
// every tenant): it reads the tenants one by one, so that it costs only the
// tenant whose query fails its seed; failed holds their errors, and they
// wait in e.reseed. err is set when the store did not answer at all. It
// returns how many tenants it set and how many meters it corrected.
func (e *Enforcer) reconcilePeriod(ctx context.Context, p billing.Period, tenants []string) (set, corrected int, failed []error, err error) {
	set, corrected, err = e.setFromStore(ctx, p, tenants, func(ctx context.Context) ([]schemas.Increment, error) {
		return e.cfg.Store.Totals(ctx, p.Start, p.End)
	})
	if err == nil || ctx.Err() != nil {
		return set, corrected, nil, err
	}
	if perr := e.cfg.Store.Ping(ctx); perr != nil {
		return 0, 0, nil, err // the store is away: every tenant waits alike
	}
	e.log.Warn("reading the usage of all tenants failed while the store answers; reading tenant by tenant", "period", p, "err", err)
	for _, t := range tenants {
		n, c, terr := e.setFromStore(ctx, p, []string{t}, func(ctx context.Context) ([]schemas.Increment, error) {
			return e.cfg.Store.TenantTotals(ctx, t, p.Start, p.End)
		})
		set, corrected = set+n, corrected+c
		if terr != nil {
			failed = append(failed, fmt.Errorf("tenant %s: %w", t, terr))
			e.mu.Lock()
			if e.usage[t] != nil {
				e.reseed[t] = true
			}
			e.mu.Unlock()
		}
	}
	return set, corrected, failed, nil
}

// setFromStore sets the usage of tenants, whose current period is p, to the
// totals read plus the increments that arrived since read started. The
// journal is registered just before the query, so that only increments in
// flight at that instant can be counted twice (see the package
// documentation). It returns how many tenants it set and how many meters it
// corrected.
func (e *Enforcer) setFromStore(ctx context.Context, p billing.Period, tenants []string,
	read func(context.Context) ([]schemas.Increment, error)) (set, corrected int, err error) {
	j := &journal{periods: map[string]billing.Period{}, adds: map[string]map[string]int64{}}
	e.mu.Lock()
	for _, t := range tenants {
		if u := e.usage[t]; u != nil && u.period.Start.Equal(p.Start) && u.period.End.Equal(p.End) {
			j.periods[t] = p
		}
	}
	e.journals[j] = struct{}{}
	e.mu.Unlock()

	incs, err := read(ctx)

	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.journals, j)
	if err != nil {
		return 0, 0, fmt.Errorf("totals of %s: %w", p, err)
	}
	totals := map[string]map[string]int64{}
	for _, inc := range incs {
		if _, ok := j.periods[inc.Tenant]; !ok {
			continue
		}
		if totals[inc.Tenant] == nil {
			totals[inc.Tenant] = map[string]int64{}
		}
		totals[inc.Tenant][inc.Meter] = saturating.Add(totals[inc.Tenant][inc.Meter], inc.Value)
	}
	for t := range j.periods {
		u := e.usage[t]
		if u == nil || !u.period.Start.Equal(p.Start) || !u.period.End.Equal(p.End) {
			continue // gone or rolled over meanwhile; a reseed follows
		}
		used := totals[t]
		if used == nil {
			used = map[string]int64{}
		}
		for m, v := range j.adds[t] {
			used[m] = saturating.Add(used[m], v)
		}
		for m, v := range used {
			if saturating.Saturated(v) && !saturating.Saturated(u.used[m]) {
				e.log.Warn("usage total saturated: its true sum lies beyond int64 (see docs/design-notes.md)", "tenant", t, "meter", m, "used", v)
			}
		}
		changed := !u.seeded || !maps.Equal(u.used, used)
		if u.seeded && changed {
			for m := range used {
				if used[m] != u.used[m] {
					corrected++
				}
			}
			for m := range u.used {
				if _, ok := used[m]; !ok {
					corrected++
				}
			}
			e.log.Debug("usage corrected from the store", "tenant", t, "memory", u.used, "store", used)
		}
		u.used, u.seeded = used, true
		set++
		delete(e.reseed, t)
		if changed {
			e.markDirtyLocked(t, time.Time{})
			e.checkThresholdsLocked(t, u)
		}
	}
	return set, corrected, nil
}

// reconcileLoop reconciles every tenant each ReconcileEvery, and the tenants
// waiting for a reseed as soon as they wait; retrySoon has those tried again
// after a short pause, as after a failed reconcile.
func (e *Enforcer) reconcileLoop(ctx context.Context, retrySoon bool) {
	tick := time.NewTicker(e.cfg.ReconcileEvery)
	defer tick.Stop()
	var retryC <-chan time.Time // nil: no retry pending
	if retrySoon {
		retryC = time.After(writeRetry)
	}
	for {
		var tenants []string // nil: all
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-e.reseedWake:
			tenants = e.waitingReseed()
		case <-retryC:
			tenants = e.waitingReseed()
		}
		if tenants != nil && len(tenants) == 0 {
			continue
		}
		retryC = nil
		if err := e.reconcile(ctx, tenants); err != nil && ctx.Err() == nil {
			e.log.Warn("reconciling usage with the store failed", "err", err)
			retryC = time.After(writeRetry)
		}
	}
}

// waitingReseed lists the tenants whose usage must be read again; never nil.
func (e *Enforcer) waitingReseed() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string{}, slices.Collect(maps.Keys(e.reseed))...)
}

// rolloverLoop rolls tenants over when their period ends, also when no
// increment arrives to notice.
func (e *Enforcer) rolloverLoop(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		e.mu.Lock()
		now := e.now()
		for t, u := range e.usage {
			e.rollLocked(t, u, now)
		}
		e.mu.Unlock()
	}
}
