package storetest

import (
	"errors"
	"math"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/schemas"
)

// maxI64 is a saturated total (internal/saturating.Max): the true sum is at
// least this large.
const maxI64 = math.MaxInt64

// testMaxValueSumsExactly sends events of the largest value an event may
// have (schemas.MaxValue), in whole hours and at partial edges: every
// total, increment and report is exact; one more is refused.
func testMaxValueSumsExactly(t *testing.T, s aggregator.Store) {
	const v = schemas.MaxValue
	incs := apply(t, s, batch("b1",
		ev("acme", "m1", "api_calls", v, at("2026-01-31T22:10:00Z")),
		ev("acme", "m2", "api_calls", v, at("2026-01-31T22:20:00Z")),
		ev("acme", "m3", "api_calls", v, at("2026-01-31T23:00:00Z"), "region", "eu"),
		ev("acme", "m4", "api_calls", v, at("2026-01-31T23:40:00Z")),
		ev("acme", "m5", "api_calls", v, at("2026-02-01T00:30:00Z"))))
	checkIncs(t, "increments", incs,
		inc("acme", "api_calls", at("2026-01-31T22:00:00Z"), 2*v, 2),
		inc("acme", "api_calls", at("2026-01-31T23:00:00Z"), 2*v, 2),
		inc("acme", "api_calls", at("2026-02-01T00:00:00Z"), v, 1))
	checkTotal(t, s, "acme", "api_calls", at("2026-01-31T22:00:00Z"), at("2026-02-01T01:00:00Z"), 5*v)
	checkTotal(t, s, "acme", "api_calls", at("2026-01-31T22:15:00Z"), at("2026-02-01T00:45:00Z"), 4*v) // two edges
	checkTotals(t, s, aggregator.MinEventTime, aggregator.MaxEventTime, inc("acme", "api_calls", aggregator.MinEventTime, 5*v, 5))
	checkUsage(t, s, uq(aggregator.Daily, "", "", "2026-01-31T22:15:00Z", "2026-02-01T00:45:00Z"),
		row("acme", "api_calls", "2026-01-31T00:00:00Z", 3*v, 3),
		row("acme", "api_calls", "2026-02-01T00:00:00Z", v, 1))
	_, err := s.Apply(t.Context(), []*schemas.Batch{batch("b2", ev("acme", "m6", "api_calls", v+1, t0))})
	if !errors.Is(err, aggregator.ErrInvalidEvent) {
		t.Errorf("Apply of a value of MaxValue + 1: error = %v, want ErrInvalidEvent", err)
	}
}

// testSumsSaturate builds totals at and beyond 2^63 behind the store's back
// (no accepted event can: see testMaxValueSumsExactly) and checks that every
// total, report and repair answers, saturated at math.MaxInt64 where the
// true sum is beyond it, exact below, never negative, and that the other
// tenants' totals and reports are untouched. The store's own sum() wrapped
// (2^63 − 1 and 1 gave -2^63, a tenant never blocked) or failed every query
// covering the row ("integer overflow").
//
// The big rows are kept apart (another hour or dimensions) from the rows
// they add up with: a rollup row itself holds at most 2^63 − 1, which takes
// 2^31 events of MaxValue in one hour with the same dimensions.
func testSumsSaturate(t *testing.T, s aggregator.Store) {
	c, ok := s.(Corrupter)
	if !ok {
		t.Skip("the store under test does not implement storetest.Corrupter")
	}
	h22, h23, h00 := at("2026-01-31T22:00:00Z"), at("2026-01-31T23:00:00Z"), at("2026-02-01T00:00:00Z")
	apply(t, s, batch("b1",
		ev("acme", "e1", "api_calls", 1, at("2026-02-01T00:30:00Z")),
		ev("globex", "g1", "api_calls", 5, at("2026-01-31T23:10:00Z")),
		ev("globex", "g2", "api_calls", 7, at("2026-02-01T00:30:00Z"))))
	c.AddToRollup(t, "acme", "api_calls", h23, nil, maxI64, 1)
	c.AddToRollup(t, "acme", "tokens", h22, nil, maxI64, 1)
	c.AddToRollup(t, "acme", "tokens", h23, map[string]string{"region": "eu"}, maxI64, maxI64)

	// 2^63 − 1 alone is exact; with the event of 1 (a whole hour or an edge)
	// it saturates instead of wrapping to -2^63.
	checkTotal(t, s, "acme", "api_calls", h23, h00, maxI64)
	checkTotal(t, s, "acme", "api_calls", h23, h00.Add(time.Hour), maxI64)
	checkTotal(t, s, "acme", "api_calls", h23, h00.Add(45*time.Minute), maxI64)
	checkTotal(t, s, "acme", "api_calls", h00, h00.Add(time.Hour), 1)
	checkTotal(t, s, "acme", "tokens", h22, h00, maxI64) // 2 · (2^63 − 1)
	checkTotal(t, s, "globex", "api_calls", h22, h00.Add(45*time.Minute), 12)
	all := []string{
		inc("acme", "api_calls", h22, maxI64, 2),
		inc("acme", "tokens", h22, maxI64, maxI64),
		inc("globex", "api_calls", h22, 12, 2),
	}
	checkTotals(t, s, h22, h00.Add(time.Hour), all...)
	checkTotals(t, s, h22, h00.Add(45*time.Minute), all...)
	checkTenantTotals(t, s, "globex", h22, h00.Add(45*time.Minute), all[2])
	checkTenantTotals(t, s, "acme", h22, h00.Add(45*time.Minute), all[:2]...)

	for _, g := range []aggregator.Granularity{aggregator.Hourly, aggregator.Daily} {
		q := uq(g, "", "", "2026-01-31T22:00:00Z", "2026-02-01T00:45:00Z")
		if g == aggregator.Hourly {
			checkUsage(t, s, q,
				row("acme", "api_calls", "2026-01-31T23:00:00Z", maxI64, 1),
				row("acme", "api_calls", "2026-02-01T00:00:00Z", 1, 1),
				row("acme", "tokens", "2026-01-31T22:00:00Z", maxI64, 1),
				row("acme", "tokens", "2026-01-31T23:00:00Z", maxI64, maxI64),
				row("globex", "api_calls", "2026-01-31T23:00:00Z", 5, 1),
				row("globex", "api_calls", "2026-02-01T00:00:00Z", 7, 1))
			continue
		}
		checkUsage(t, s, q,
			row("acme", "api_calls", "2026-01-31T00:00:00Z", maxI64, 1),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 1, 1),
			row("acme", "tokens", "2026-01-31T00:00:00Z", maxI64, maxI64),
			row("globex", "api_calls", "2026-01-31T00:00:00Z", 5, 1),
			row("globex", "api_calls", "2026-02-01T00:00:00Z", 7, 1))
	}
	checkUsage(t, s, uq(aggregator.Monthly, "acme", "tokens", "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", "region"),
		row("acme", "tokens", "2026-01-01T00:00:00Z", maxI64, 1, ""),
		row("acme", "tokens", "2026-01-01T00:00:00Z", maxI64, maxI64, "eu"))

	// The repair compares sums beyond int64 too: the rows without events
	// go, and every total is the events' again.
	n, err := s.Reconcile(t.Context(), aggregator.MinEventTime, aggregator.MaxEventTime)
	if err != nil || n != 3 {
		t.Fatalf("Reconcile = %d, %v; want 3", n, err)
	}
	checkTotals(t, s, h22, h00.Add(time.Hour),
		inc("acme", "api_calls", h22, 1, 1),
		inc("globex", "api_calls", h22, 12, 2))
}
