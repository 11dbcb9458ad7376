package enforcer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/saturating"
	"github.com/meterd/meterd/schemas"
)

// UsageSource is where the enforcer seeds and reconciles usage totals from:
// the aggregator's store (every aggregator.Store satisfies it; the enforcer
// needs these three methods only, so it does not import the aggregator).
type UsageSource interface {
	// Totals returns the usage per (tenant, meter) with from <= time < to.
	Totals(ctx context.Context, from, to time.Time) ([]schemas.Increment, error)
	// TenantTotals returns the usage per meter of tenant alone: read tenant
	// by tenant when Totals fails while the store answers.
	TenantTotals(ctx context.Context, tenant string, from, to time.Time) ([]schemas.Increment, error)
	// Ping reports whether the store is reachable.
	Ping(ctx context.Context) error
}

// tenantUsage is a tenant's usage in its current billing period.
type tenantUsage struct {
	period catalog.Period
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

func newTenantUsage(p catalog.Period) *tenantUsage {
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
func (u *tenantUsage) roll(p catalog.Period) (needReseed bool) {
	if p.Start.Equal(u.period.End) {
		u.used, u.next = u.next, map[string]int64{}
	} else {
		u.used, u.next, u.seeded = map[string]int64{}, map[string]int64{}, false
	}
	u.period = p
	return !u.seeded
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

// journal collects the increments that arrive while a totals query runs,
// for the tenants it queries (see the package documentation).
type journal struct {
	periods map[string]catalog.Period
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
		period  catalog.Period
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
func (e *Enforcer) reconcilePeriod(ctx context.Context, p catalog.Period, tenants []string) (set, corrected int, failed []error, err error) {
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
func (e *Enforcer) setFromStore(ctx context.Context, p catalog.Period, tenants []string,
	read func(context.Context) ([]schemas.Increment, error)) (set, corrected int, err error) {
	j := &journal{periods: map[string]catalog.Period{}, adds: map[string]map[string]int64{}}
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
