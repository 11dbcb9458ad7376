package enforcer

import (
	"context"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/ctxtime"
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

// tracker keeps every tenant's usage of its current billing period in
// memory: it counts the committed increments, rolls tenants over when their
// period ends, switches to a new catalog (catalog.go) and takes the totals
// the reconciler reads from the store (beginRead, endRead). Every change
// that may change a decision marks the tenant in dirty; the thresholds it
// crosses are queued to the notifier.
type tracker struct {
	now     func() time.Time
	log     *slog.Logger
	billing *billing // the billing statuses decide reads
	dirty   *dirtySet

	// mu guards the fields below it, and thresholds.
	mu         sync.Mutex
	thresholds thresholds
	cat        *catalog.Catalog // the catalog usage is tracked for
	tracking   bool             // usage is tracked: Run has started seeding
	usage      map[string]*tenantUsage
	journals   map[*journal]struct{}
	reseed     map[string]bool // tenants whose usage must be read from the store again
	reseedWake chan struct{}
}

func newTracker(cat *catalog.Catalog, now func() time.Time, log *slog.Logger, b *billing, dirty *dirtySet, n *notifier) *tracker {
	return &tracker{
		now: now, log: log, billing: b, dirty: dirty,
		thresholds: thresholds{notify: n, now: now, notified: map[string]map[string]bool{}},
		cat:        cat,
		usage:      map[string]*tenantUsage{},
		journals:   map[*journal]struct{}{},
		reseed:     map[string]bool{},
		reseedWake: make(chan struct{}, 1),
	}
}

// onCommitted counts a committed increment of the aggregator.
func (t *tracker) onCommitted(msg *nats.Msg) {
	arrived := time.Now()
	c, err := schemas.DecodeCommitted(msg.Data)
	if err != nil || c.Tenant == "" || c.Meter == "" {
		t.log.Warn("malformed committed increment ignored", "subject", msg.Subject, "err", err)
		return
	}
	c.Hour = c.Hour.UTC()
	t.mu.Lock()
	defer t.mu.Unlock()
	u := t.usage[c.Tenant]
	if u == nil {
		return // not a tenant of the catalog (or not tracking yet)
	}
	t.rollLocked(c.Tenant, u, t.now())
	for j := range t.journals {
		j.add(c)
	}
	before, after, counted := u.add(c.Meter, c.Hour, c.Value)
	if !counted || !u.seeded {
		return
	}
	limit, ok := t.cat.Limit(c.Tenant, c.Meter)
	if !ok {
		return
	}
	if before < limit && after >= limit {
		cause := arrived
		if !c.SealedAt.IsZero() && c.SealedAt.Before(arrived) {
			cause = c.SealedAt
		}
		t.dirty.mark(c.Tenant, cause)
	}
	t.thresholds.check(c.Tenant, u, c.Meter, limit)
}

// rollLocked moves tenant to the period containing now once its period
// ended.
func (t *tracker) rollLocked(tenant string, u *tenantUsage, now time.Time) {
	if now.Before(u.period.End) {
		return
	}
	if u.roll(t.cat.PeriodOf(tenant, now)) {
		t.reseed[tenant] = true
		signal(t.reseedWake)
	}
	t.thresholds.forget(tenant)
	t.dirty.mark(tenant, time.Time{})
	t.thresholds.checkAll(t.cat, tenant, u)
}

// rolloverLoop rolls tenants over when their period ends, also when no
// increment arrives to notice.
func (t *tracker) rolloverLoop(ctx context.Context) {
	for ctxtime.Sleep(ctx, time.Second) {
		t.mu.Lock()
		now := t.now()
		for name, u := range t.usage {
			t.rollLocked(name, u, now)
		}
		t.mu.Unlock()
	}
}

// track starts tracking the usage of every tenant of the catalog, or, when
// tracking already, has every tenant decided again; it returns how many
// tenants are tracked.
func (t *tracker) track() int {
	t.mu.Lock()
	t.tracking = true
	t.mu.Unlock()
	return t.setCatalog(nil) // nil: the newest catalog, also if one came meanwhile
}

// setNotifying has the thresholds reached queued (active) or not. A replica
// that becomes active forgets what it queued before and queues every
// threshold reached again: the markers of NotifyBucket drop those another
// replica (or this one) already sent.
func (t *tracker) setNotifying(active bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.thresholds.active = active
	t.thresholds.notified = map[string]map[string]bool{}
	if active {
		for name, u := range t.usage {
			t.thresholds.checkAll(t.cat, name, u)
		}
	}
}

// usageOf returns tenant's current period, whether its usage was read from
// the store yet, and a copy of its usage per meter in that period (what
// arrived since, while not seeded).
func (t *tracker) usageOf(tenant string) (p catalog.Period, seeded bool, used map[string]int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if u := t.usage[tenant]; u != nil {
		return u.period, u.seeded, maps.Clone(u.used)
	}
	return t.cat.PeriodOf(tenant, t.now()), false, nil
}

// group is tenants whose current period is period: one totals query.
type group struct {
	period  catalog.Period
	tenants []string
}

// groupsOf rolls tenants (nil: all) over where due and groups them by
// their current period.
func (t *tracker) groupsOf(tenants []string) []*group {
	t.mu.Lock()
	defer t.mu.Unlock()
	if tenants == nil {
		tenants = slices.Collect(maps.Keys(t.usage))
	}
	groups := map[[2]int64]*group{}
	now := t.now()
	for _, name := range tenants {
		u := t.usage[name]
		if u == nil {
			continue
		}
		t.rollLocked(name, u, now)
		k := [2]int64{u.period.Start.UnixNano(), u.period.End.UnixNano()}
		if groups[k] == nil {
			groups[k] = &group{period: u.period}
		}
		groups[k].tenants = append(groups[k].tenants, name)
	}
	return slices.Collect(maps.Values(groups))
}

// samePeriod reports whether a and b span the same time.
func samePeriod(a, b catalog.Period) bool {
	return a.Start.Equal(b.Start) && a.End.Equal(b.End)
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

// beginRead registers the journal of a totals query of tenants, whose
// current period is p, just before it is sent: only increments in flight
// at that instant can be counted twice (see the package documentation).
func (t *tracker) beginRead(p catalog.Period, tenants []string) *journal {
	j := &journal{periods: map[string]catalog.Period{}, adds: map[string]map[string]int64{}}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, name := range tenants {
		if u := t.usage[name]; u != nil && samePeriod(u.period, p) {
			j.periods[name] = p
		}
	}
	t.journals[j] = struct{}{}
	return j
}

// endReadChunk is how many tenants endRead sets per hold of the tracker's
// lock: with a million tenants, setting them all at once would hold up the
// committed increments (and so every new block) for about a second.
const endReadChunk = 4096

// endRead ends the query of j: unless it failed (err), the usage of its
// tenants becomes the totals read (incs) plus the increments journaled
// since. It sums the totals without the lock, then sets the tenants
// endReadChunk at a time, releasing the lock in between: j journals a
// tenant's increments until it is set, so each tenant still gets the totals
// plus what arrived since the query started. It returns how many tenants it
// set and how many meters it corrected.
func (t *tracker) endRead(j *journal, incs []schemas.Increment, err error) (set, corrected int) {
	defer func() {
		t.mu.Lock()
		delete(t.journals, j)
		t.mu.Unlock()
	}()
	if err != nil {
		return 0, 0
	}
	// j.periods is only written by beginRead: read without the lock.
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
	names := slices.Collect(maps.Keys(j.periods))
	for len(names) > 0 {
		n := min(len(names), endReadChunk)
		s, c := t.setRead(j, names[:n], totals)
		set, corrected, names = set+s, corrected+c, names[n:]
	}
	return set, corrected
}

// setRead sets the usage of tenants of j to their totals plus the
// increments j journaled for them.
func (t *tracker) setRead(j *journal, tenants []string, totals map[string]map[string]int64) (set, corrected int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, name := range tenants {
		p := j.periods[name]
		u := t.usage[name]
		if u == nil || !samePeriod(u.period, p) {
			continue // gone or rolled over meanwhile; a reseed follows
		}
		used := totals[name]
		if used == nil {
			used = map[string]int64{}
		}
		for m, v := range j.adds[name] {
			used[m] = saturating.Add(used[m], v)
		}
		for m, v := range used {
			if saturating.Saturated(v) && !saturating.Saturated(u.used[m]) {
				t.log.Warn("usage total saturated: its true sum lies beyond int64 (see docs/design-notes.md)", "tenant", name, "meter", m, "used", v)
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
			t.log.Debug("usage corrected from the store", "tenant", name, "memory", u.used, "store", used)
		}
		u.used, u.seeded = used, true
		set++
		delete(t.reseed, name)
		if changed {
			t.dirty.mark(name, time.Time{})
			t.thresholds.checkAll(t.cat, name, u)
		}
	}
	return set, corrected
}

// reseedLater has tenant's usage read from the store again at the next
// try, keeping its decision meanwhile.
func (t *tracker) reseedLater(tenant string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.usage[tenant] != nil {
		t.reseed[tenant] = true
	}
}

// waitingReseed lists the tenants whose usage must be read again; never nil.
func (t *tracker) waitingReseed() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string{}, slices.Collect(maps.Keys(t.reseed))...)
}
