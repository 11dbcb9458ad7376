// Package storetest is the conformance suite every aggregator.Store passes:
// the same input gives the same increments, totals, reports and repairs in
// every store.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/schemas"
)

// Corrupter damages a store's rollups behind its back so that Run can check
// Reconcile. A store's test implements it on a wrapper of the store it
// returns from newStore; Run skips the repair test for a store without it.
type Corrupter interface {
	// AddToRollup adds value and events to the rollup row of (tenant, meter,
	// hour, dims) without touching the raw events.
	AddToRollup(t *testing.T, tenant, meter string, hour time.Time, dims map[string]string, value, events int64)
}

// Run runs the suite; newStore returns a new, empty store and arranges its
// cleanup.
func Run(t *testing.T, newStore func(t *testing.T) aggregator.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s aggregator.Store)
	}{
		{"RetriedEventInLaterBatchCountsOnce", testRetriedEvent},
		{"RedeliveredBatchCountsOnce", testRedeliveredBatch},
		{"DuplicatesInOneCallCountOnce", testDuplicatesInCall},
		{"SameIDUnderTwoTenantsCountsTwice", testSameIDTwoTenants},
		{"ManyRetriedEventsCountOnce", testManyRetries},
		{"ApplyReturnsNewlyCountedIncrements", testIncrements},
		{"EmptyApply", testEmptyApply},
		{"InvalidEventWritesNothing", testInvalidEvent},
		{"FailedApplyRetriedCountsOnce", testFailedApply},
		{"TotalRanges", testTotalRanges},
		{"Totals", testTotals},
		{"ReconcileCleanStore", testReconcileClean},
		{"ReconcileRepairsRollups", testReconcileRepairs},
		{"RandomAppliesMatchOracle", testOracle},
		{"Usage", testUsage},
		{"UsageStorableRange", testUsageStorableRange},
		{"UsageDimensionValues", testUsageDimensionValues},
		{"UsageCorrectionsCancelOut", testUsageCorrection},
		{"UsageMatchesOracle", testUsageOracle},
		{"MaxValueSumsExactly", testMaxValueSumsExactly},
		{"SumsSaturate", testSumsSaturate},
		{"Ping", func(t *testing.T, s aggregator.Store) {
			if err := s.Ping(t.Context()); err != nil {
				t.Fatalf("Ping: %v", err)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, newStore(t)) })
	}
}

// t0 is an hour shortly before a month end.
var t0 = time.Date(2026, 1, 31, 22, 0, 0, 0, time.UTC)

func at(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		panic(err)
	}
	return t
}

func ev(tenant, id, meter string, value int64, t time.Time, dims ...string) schemas.Event {
	e := schemas.Event{ID: id, Tenant: tenant, Meter: meter, Value: value, Time: t}
	for i := 0; i+1 < len(dims); i += 2 {
		if e.Dimensions == nil {
			e.Dimensions = map[string]string{}
		}
		e.Dimensions[dims[i]] = dims[i+1]
	}
	return e
}

func batch(id string, events ...schemas.Event) *schemas.Batch {
	return &schemas.Batch{ID: id, Collector: "storetest", SealedAt: t0, Events: events}
}

func apply(t *testing.T, s aggregator.Store, batches ...*schemas.Batch) []aggregator.Increment {
	t.Helper()
	incs, err := s.Apply(t.Context(), batches)
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return incs
}

// inc formats an expected increment the way show formats actual ones.
func inc(tenant, meter string, hour time.Time, value, events int64) string {
	return fmt.Sprintf("%s %s %s value=%d events=%d", tenant, meter, hour.UTC().Format(time.RFC3339), value, events)
}

func show(incs []aggregator.Increment) []string {
	out := []string{}
	for _, i := range incs {
		out = append(out, inc(i.Tenant, i.Meter, i.Hour, i.Value, i.Events))
	}
	return out
}

func checkIncs(t *testing.T, what string, got []aggregator.Increment, want ...string) {
	t.Helper()
	if want == nil {
		want = []string{}
	}
	if g := show(got); !slices.Equal(g, want) {
		t.Errorf("%s:\n got  %q\n want %q", what, g, want)
	}
}

func checkTotal(t *testing.T, s aggregator.Store, tenant, meter string, from, to time.Time, want int64) {
	t.Helper()
	got, err := s.Total(t.Context(), tenant, meter, from, to)
	if err != nil {
		t.Fatalf("Total(%s, %s, %s, %s): %v", tenant, meter, from, to, err)
	}
	if got != want {
		t.Errorf("Total(%s, %s, %s, %s) = %d, want %d", tenant, meter, from.Format(time.RFC3339Nano), to.Format(time.RFC3339Nano), got, want)
	}
}

func checkTotals(t *testing.T, s aggregator.Store, from, to time.Time, want ...string) {
	t.Helper()
	got, err := s.Totals(t.Context(), from, to)
	if err != nil {
		t.Fatalf("Totals: %v", err)
	}
	for _, g := range got {
		if !g.Hour.Equal(from) {
			t.Errorf("Totals: Hour = %s, want from = %s", g.Hour, from)
		}
	}
	checkIncs(t, fmt.Sprintf("Totals(%s, %s)", from.Format(time.RFC3339), to.Format(time.RFC3339)), got, want...)
}

func checkTenantTotals(t *testing.T, s aggregator.Store, tenant string, from, to time.Time, want ...string) {
	t.Helper()
	got, err := s.TenantTotals(t.Context(), tenant, from, to)
	if err != nil {
		t.Fatalf("TenantTotals(%s): %v", tenant, err)
	}
	checkIncs(t, fmt.Sprintf("TenantTotals(%s, %s, %s)", tenant, from.Format(time.RFC3339), to.Format(time.RFC3339)), got, want...)
}

func testRetriedEvent(t *testing.T, s aggregator.Store) {
	// The client retried e1 hours later without a time, so the collector
	// stamped a new time and put it in another batch; value differs too.
	// The first copy counts, the retry does not.
	checkIncs(t, "first", apply(t, s, batch("b1", ev("acme", "e1", "api_calls", 3, t0.Add(10*time.Minute)))),
		inc("acme", "api_calls", t0, 3, 1))
	checkIncs(t, "retry", apply(t, s, batch("b2",
		ev("acme", "e1", "api_calls", 30, t0.Add(5*time.Hour+10*time.Minute)),
		ev("acme", "e2", "api_calls", 4, t0.Add(5*time.Hour+20*time.Minute)))),
		inc("acme", "api_calls", t0.Add(5*time.Hour), 4, 1))
	checkTotal(t, s, "acme", "api_calls", t0, t0.Add(24*time.Hour), 7)
	checkTotal(t, s, "acme", "api_calls", at("2026-01-01T00:00:00Z"), at("2026-02-01T00:00:00Z"), 3)
	checkTotal(t, s, "acme", "api_calls", at("2026-02-01T00:00:00Z"), at("2026-03-01T00:00:00Z"), 4)
}

func testRedeliveredBatch(t *testing.T, s aggregator.Store) {
	b := batch("b1",
		ev("acme", "e1", "api_calls", 2, t0),
		ev("acme", "e2", "api_calls", 5, t0.Add(90*time.Minute)))
	checkIncs(t, "first", apply(t, s, b),
		inc("acme", "api_calls", t0, 2, 1), inc("acme", "api_calls", t0.Add(time.Hour), 5, 1))
	checkIncs(t, "redelivery", apply(t, s, b))
	checkIncs(t, "redelivery with a new batch", apply(t, s, b, batch("b2", ev("acme", "e3", "api_calls", 1, t0))),
		inc("acme", "api_calls", t0, 1, 1))
	checkTotal(t, s, "acme", "api_calls", t0, t0.Add(2*time.Hour), 8)
}

func testDuplicatesInCall(t *testing.T, s aggregator.Store) {
	// The first occurrence counts: e1 with value 5, not 7 or 9.
	b1 := batch("b1",
		ev("acme", "e1", "api_calls", 5, t0),
		ev("acme", "e1", "api_calls", 7, t0.Add(time.Hour)),
		ev("acme", "e2", "api_calls", 1, t0.Add(time.Minute)))
	b2 := batch("b2",
		ev("acme", "e1", "api_calls", 9, t0),
		ev("acme", "e3", "api_calls", 10, t0.Add(time.Minute)))
	checkIncs(t, "apply", apply(t, s, b1, b2, b1),
		inc("acme", "api_calls", t0, 16, 3))
	checkTotal(t, s, "acme", "api_calls", t0, t0.Add(2*time.Hour), 16)
}

func testSameIDTwoTenants(t *testing.T, s aggregator.Store) {
	checkIncs(t, "apply", apply(t, s, batch("b1",
		ev("globex", "e1", "api_calls", 3, t0),
		ev("acme", "e1", "api_calls", 2, t0))),
		inc("acme", "api_calls", t0, 2, 1), inc("globex", "api_calls", t0, 3, 1))
	checkTotal(t, s, "acme", "api_calls", t0, t0.Add(time.Hour), 2)
	checkTotal(t, s, "globex", "api_calls", t0, t0.Add(time.Hour), 3)
}

// testManyRetries retries more events than a store may look up one by one
// (thousands, as a spool replay sends them) in new batches.
func testManyRetries(t *testing.T, s aggregator.Store) {
	const n = 6000
	var first, retry []schemas.Event
	for i := range n {
		e := ev(fmt.Sprintf("tenant-%d", i%7), fmt.Sprintf("e%d", i), "api_calls", 2, t0.Add(time.Duration(i)*time.Second))
		first = append(first, e)
		e.Time = e.Time.Add(3 * time.Hour) // stamped again at the retry
		retry = append(retry, e)
	}
	apply(t, s, batch("first", first...))
	checkIncs(t, "retry", apply(t, s, batch("retry-1", retry[:n/2]...), batch("retry-2", append(retry[n/2:],
		ev("tenant-0", "new", "api_calls", 5, t0.Add(4*time.Hour)),
		ev("tenant-7", "e0", "api_calls", 1, t0.Add(4*time.Hour)))...)),
		inc("tenant-0", "api_calls", t0.Add(4*time.Hour), 5, 1),
		inc("tenant-7", "api_calls", t0.Add(4*time.Hour), 1, 1))
	checkTotal(t, s, "tenant-3", "api_calls", t0, t0.Add(24*time.Hour), 2*n/7)
}

func testIncrements(t *testing.T, s aggregator.Store) {
	checkIncs(t, "first", apply(t, s,
		batch("b1",
			ev("globex", "g1", "api_calls", 1, t0.Add(2*time.Hour)),
			ev("acme", "a1", "api_calls", 2, t0.Add(time.Minute), "route", "/a"),
			ev("acme", "a2", "api_calls", 3, t0.Add(time.Hour-time.Second), "route", "/b", "method", "GET")),
		batch("b2",
			ev("acme", "a3", "api_calls", 5, t0.Add(time.Hour)),
			ev("acme", "a4", "tokens", 100, t0.Add(30*time.Minute)),
			ev("acme", "a5", "tokens", 0, t0.Add(31*time.Minute)))),
		inc("acme", "api_calls", t0, 5, 2),
		inc("acme", "api_calls", t0.Add(time.Hour), 5, 1),
		inc("acme", "tokens", t0, 100, 2),
		inc("globex", "api_calls", t0.Add(2*time.Hour), 1, 1))
	checkIncs(t, "second", apply(t, s, batch("b3",
		ev("acme", "a1", "api_calls", 2, t0.Add(time.Minute), "route", "/a"),
		ev("acme", "a6", "api_calls", 7, t0.Add(time.Minute), "route", "/a"))),
		inc("acme", "api_calls", t0, 7, 1))
	checkTotal(t, s, "acme", "api_calls", t0, t0.Add(3*time.Hour), 17)
	checkTotal(t, s, "acme", "tokens", t0, t0.Add(3*time.Hour), 100)
}

func testEmptyApply(t *testing.T, s aggregator.Store) {
	checkIncs(t, "no batches", apply(t, s))
	checkIncs(t, "empty batch", apply(t, s, batch("b1")))
	checkTotals(t, s, aggregator.MinEventTime, aggregator.MaxEventTime)
}

func testInvalidEvent(t *testing.T, s aggregator.Store) {
	good := batch("good", ev("acme", "e1", "api_calls", 1, t0))
	for name, bad := range map[string]*schemas.Batch{
		"before 1970":  batch("bad", ev("acme", "e2", "api_calls", 1, at("1969-12-31T23:59:59Z"))),
		"after 2106":   batch("bad", ev("acme", "e2", "api_calls", 1, aggregator.MaxEventTime)),
		"bad meter":    batch("bad", ev("acme", "e2", "API", 1, t0)),
		"negative":     batch("bad", ev("acme", "e2", "api_calls", -1, t0)),
		"empty tenant": batch("bad", ev("", "e2", "api_calls", 1, t0)),
		"nil batch":    nil,
	} {
		_, err := s.Apply(t.Context(), []*schemas.Batch{good, bad})
		if !errors.Is(err, aggregator.ErrInvalidEvent) {
			t.Errorf("%s: Apply error = %v, want ErrInvalidEvent", name, err)
		}
	}
	checkTotals(t, s, aggregator.MinEventTime, aggregator.MaxEventTime)
	// The last storable second is stored.
	last := aggregator.MaxEventTime.Add(-time.Second)
	checkIncs(t, "last second", apply(t, s, batch("b", ev("acme", "e3", "api_calls", 4, last))),
		inc("acme", "api_calls", last.Truncate(time.Hour), 4, 1))
	checkTotal(t, s, "acme", "api_calls", last, aggregator.MaxEventTime, 4)
	checkTotal(t, s, "acme", "api_calls", aggregator.MinEventTime, last.Add(time.Hour), 4)
}

func testFailedApply(t *testing.T, s aggregator.Store) {
	b := batch("b1", ev("acme", "e1", "api_calls", 3, t0), ev("acme", "e2", "api_calls", 4, t0))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := s.Apply(ctx, []*schemas.Batch{b}); err == nil {
		t.Fatal("Apply with a cancelled context succeeded")
	}
	checkIncs(t, "retry", apply(t, s, b), inc("acme", "api_calls", t0, 7, 2))
	checkIncs(t, "second retry", apply(t, s, b))
	checkTotal(t, s, "acme", "api_calls", t0, t0.Add(time.Hour), 7)
}

// monthEnd is usage of acme's api_calls around the end of January 2026,
// with other meters and tenants that no acme api_calls total includes.
func monthEnd(t *testing.T, s aggregator.Store) {
	apply(t, s, batch("b1",
		ev("acme", "e1", "api_calls", 1, at("2026-01-31T22:59:59Z")),
		ev("acme", "e2", "api_calls", 10, at("2026-01-31T23:00:00Z"), "region", "eu"),
		ev("acme", "e3", "api_calls", 100, at("2026-01-31T23:30:00.9Z")), // stored as 23:30:00
		ev("acme", "e4", "api_calls", 1000, at("2026-01-31T23:59:59.999Z"), "region", "us"),
		ev("acme", "e5", "api_calls", 10000, at("2026-02-01T00:00:00Z")),
		ev("acme", "e6", "api_calls", 100000, at("2026-02-01T01:15:00Z")),
		ev("acme", "t1", "tokens", 7, at("2026-01-31T23:10:00Z")),
		ev("globex", "e1", "api_calls", 5, at("2026-01-31T23:10:00Z"))))
}

func testTotalRanges(t *testing.T, s aggregator.Store) {
	monthEnd(t, s)
	for _, tc := range []struct {
		from, to string
		want     int64
	}{
		{"2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", 1111},
		{"2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", 110000},
		{"2026-01-31T23:00:00Z", "2026-02-01T00:00:00Z", 1110},
		{"2026-01-31T23:00:00Z", "2026-01-31T23:30:00Z", 10},
		{"2026-01-31T23:30:00Z", "2026-02-01T00:00:00Z", 1100},
		{"2026-01-31T23:30:00.5Z", "2026-02-01T00:00:00Z", 1000}, // e3 is stored at 23:30:00
		{"2026-01-31T23:30:00Z", "2026-01-31T23:30:00.1Z", 100},  // to rounds up to 23:30:01
		{"2026-01-31T22:59:59Z", "2026-01-31T23:00:01Z", 11},
		{"2026-01-31T22:30:00Z", "2026-02-01T01:30:00Z", 111111},
		{"2026-01-31T22:30:00Z", "2026-02-01T01:15:00Z", 11111},
		{"2026-02-01T01:15:00Z", "2026-02-01T01:15:01Z", 100000},
		{"2026-02-01T00:00:00Z", "2026-02-01T00:00:00Z", 0},
		{"2026-02-01T01:00:00Z", "2026-01-31T00:00:00Z", 0},
		{"1900-01-01T00:00:00Z", "2200-01-01T00:00:00Z", 111111},
	} {
		checkTotal(t, s, "acme", "api_calls", at(tc.from), at(tc.to), tc.want)
	}
	checkTotal(t, s, "acme", "tokens", at("2026-01-01T00:00:00Z"), at("2026-02-01T00:00:00Z"), 7)
	checkTotal(t, s, "nobody", "api_calls", at("2026-01-01T00:00:00Z"), at("2026-02-01T00:00:00Z"), 0)
}

func testTotals(t *testing.T, s aggregator.Store) {
	monthEnd(t, s)
	checkTotals(t, s, at("2026-01-31T23:00:00Z"), at("2026-02-01T00:00:00Z"),
		inc("acme", "api_calls", at("2026-01-31T23:00:00Z"), 1110, 3),
		inc("acme", "tokens", at("2026-01-31T23:00:00Z"), 7, 1),
		inc("globex", "api_calls", at("2026-01-31T23:00:00Z"), 5, 1))
	checkTotals(t, s, at("2026-01-31T23:05:00Z"), at("2026-01-31T23:15:00Z"),
		inc("acme", "tokens", at("2026-01-31T23:05:00Z"), 7, 1),
		inc("globex", "api_calls", at("2026-01-31T23:05:00Z"), 5, 1))
	checkTotals(t, s, at("2026-01-31T22:59:59Z"), at("2026-02-01T01:00:00Z"),
		inc("acme", "api_calls", at("2026-01-31T22:59:59Z"), 11111, 5),
		inc("acme", "tokens", at("2026-01-31T22:59:59Z"), 7, 1),
		inc("globex", "api_calls", at("2026-01-31T22:59:59Z"), 5, 1))
	checkTotals(t, s, at("2026-02-01T00:00:00Z"), at("2026-03-01T00:00:00Z"),
		inc("acme", "api_calls", at("2026-02-01T00:00:00Z"), 110000, 2))
	checkTotals(t, s, at("2026-03-01T00:00:00Z"), at("2026-04-01T00:00:00Z"))
	checkTenantTotals(t, s, "acme", at("2026-01-31T22:59:59Z"), at("2026-02-01T01:00:00Z"),
		inc("acme", "api_calls", at("2026-01-31T22:59:59Z"), 11111, 5), inc("acme", "tokens", at("2026-01-31T22:59:59Z"), 7, 1))
	checkTenantTotals(t, s, "globex", at("2026-02-01T00:00:00Z"), at("2026-03-01T00:00:00Z"))
	checkTenantTotals(t, s, "nobody", at("2026-01-01T00:00:00Z"), at("2026-02-01T00:00:00Z"))
}

func testReconcileClean(t *testing.T, s aggregator.Store) {
	if n, err := s.Reconcile(t.Context(), aggregator.MinEventTime, aggregator.MaxEventTime); err != nil || n != 0 {
		t.Fatalf("Reconcile on an empty store = %d, %v; want 0", n, err)
	}
	monthEnd(t, s)
	if n, err := s.Reconcile(t.Context(), aggregator.MinEventTime, aggregator.MaxEventTime); err != nil || n != 0 {
		t.Fatalf("Reconcile on a clean store = %d, %v; want 0", n, err)
	}
}

func testReconcileRepairs(t *testing.T, s aggregator.Store) {
	c, ok := s.(Corrupter)
	if !ok {
		t.Skip("the store under test does not implement storetest.Corrupter")
	}
	monthEnd(t, s)
	h23, h01 := at("2026-01-31T23:00:00Z"), at("2026-02-01T01:00:00Z")
	c.AddToRollup(t, "acme", "api_calls", h23, nil, 5, 0)                               // wrong value
	c.AddToRollup(t, "acme", "api_calls", h23, map[string]string{"region": "eu"}, 0, 2) // wrong count
	c.AddToRollup(t, "globex", "api_calls", h23, map[string]string{"x": "y"}, 9, 1)     // no such events
	c.AddToRollup(t, "acme", "tokens", h23, nil, -7, -1)                                // events not counted
	c.AddToRollup(t, "acme", "api_calls", h01, nil, 1, 1)                               // outside the range below
	checkTotal(t, s, "acme", "api_calls", h23, h23.Add(time.Hour), 1115)

	n, err := s.Reconcile(t.Context(), at("2026-01-31T23:59:59Z"), at("2026-02-01T00:30:00Z"))
	if err != nil || n != 4 {
		t.Fatalf("Reconcile(23:59:59, 00:30) = %d, %v; want 4", n, err)
	}
	checkTotals(t, s, h23, h23.Add(time.Hour),
		inc("acme", "api_calls", h23, 1110, 3),
		inc("acme", "tokens", h23, 7, 1),
		inc("globex", "api_calls", h23, 5, 1))
	checkTotal(t, s, "acme", "api_calls", h01, h01.Add(time.Hour), 100001)
	if n, err := s.Reconcile(t.Context(), h23, h01); err != nil || n != 0 {
		t.Fatalf("Reconcile after repair = %d, %v; want 0", n, err)
	}
	if n, err := s.Reconcile(t.Context(), aggregator.MinEventTime, aggregator.MaxEventTime); err != nil || n != 1 {
		t.Fatalf("Reconcile(all) = %d, %v; want 1", n, err)
	}
	checkTotal(t, s, "acme", "api_calls", h01, h01.Add(time.Hour), 100000)
	if n, err := s.Reconcile(t.Context(), aggregator.MinEventTime, aggregator.MaxEventTime); err != nil || n != 0 {
		t.Fatalf("final Reconcile = %d, %v; want 0", n, err)
	}
}

// testOracle applies random batches with retried events, redelivered batches
// and ids shared by tenants, and checks every increment and total against
// an oracle that counts the first copy of each (tenant, id).
func testOracle(t *testing.T, s aggregator.Store) {
	rng := rand.New(rand.NewPCG(20260131, 1))
	tenants := []string{"acme", "globex", "initech", "umbrella", "hooli"}
	meters := []string{"api_calls", "tokens", "bytes_out"}
	routes := []string{"/a", "/b", "/c"}
	start := at("2026-01-30T00:00:00Z")
	span := 72 * time.Hour

	type key struct{ tenant, id string }
	counted := map[key]schemas.Event{}
	var sent []*schemas.Batch
	nBatch := 0
	for call := range 20 {
		var batches []*schemas.Batch
		for range 1 + rng.IntN(5) {
			if len(sent) > 0 && rng.IntN(5) == 0 { // a redelivery
				batches = append(batches, sent[rng.IntN(len(sent))])
				continue
			}
			nBatch++
			b := batch(fmt.Sprintf("b%d", nBatch))
			for range rng.IntN(200) {
				e := ev(tenants[rng.IntN(len(tenants))], fmt.Sprintf("e%d", rng.IntN(1500)), meters[rng.IntN(len(meters))],
					rng.Int64N(1000), start.Add(time.Duration(rng.Int64N(int64(span)))))
				if rng.IntN(2) == 0 {
					e.Dimensions = map[string]string{"route": routes[rng.IntN(len(routes))]}
				}
				b.Events = append(b.Events, e)
			}
			batches = append(batches, b)
			sent = append(sent, b)
		}
		want := map[string]*aggregator.Increment{}
		for _, b := range batches {
			for _, e := range b.Events {
				k := key{e.Tenant, e.ID}
				if _, dup := counted[k]; dup {
					continue
				}
				counted[k] = e
				hour := e.Time.Truncate(time.Hour)
				id := inc(e.Tenant, e.Meter, hour, 0, 0)
				if want[id] == nil {
					want[id] = &aggregator.Increment{Tenant: e.Tenant, Meter: e.Meter, Hour: hour}
				}
				want[id].Value += e.Value
				want[id].Events++
			}
		}
		var wantIncs []aggregator.Increment
		for _, w := range want {
			wantIncs = append(wantIncs, *w)
		}
		slices.SortFunc(wantIncs, func(a, b aggregator.Increment) int {
			return strings.Compare(inc(a.Tenant, a.Meter, a.Hour, 0, 0), inc(b.Tenant, b.Meter, b.Hour, 0, 0))
		})
		checkIncs(t, fmt.Sprintf("call %d", call), apply(t, s, batches...), show(wantIncs)...)
	}

	total := func(tenant, meter string, from, to time.Time) (v, n int64) {
		for _, e := range counted {
			st := e.Time.Truncate(time.Second)
			if e.Tenant == tenant && e.Meter == meter && !st.Before(from) && st.Before(to) {
				v, n = v+e.Value, n+1
			}
		}
		return v, n
	}
	var want []string
	for _, tn := range slices.Sorted(slices.Values(tenants)) {
		for _, m := range slices.Sorted(slices.Values(meters)) {
			if v, n := total(tn, m, start, start.Add(span)); n > 0 {
				want = append(want, inc(tn, m, start, v, n))
			}
		}
	}
	checkTotals(t, s, start, start.Add(span), want...)
	for range 10 {
		from := start.Add(time.Duration(rng.Int64N(int64(span))))
		if rng.IntN(2) == 0 {
			from = from.Truncate(time.Hour)
		}
		to := from.Add(time.Duration(rng.Int64N(int64(30 * time.Hour))))
		tn, m := tenants[rng.IntN(len(tenants))], meters[rng.IntN(len(meters))]
		v, _ := total(tn, m, from, to)
		checkTotal(t, s, tn, m, from, to, v)
	}
	if n, err := s.Reconcile(t.Context(), start, start.Add(span)); err != nil || n != 0 {
		t.Fatalf("Reconcile = %d, %v; want 0", n, err)
	}
}
