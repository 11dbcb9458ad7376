package storetest

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/schemas"
)

// row formats an expected usage row the way checkUsage formats actual ones;
// start is RFC 3339.
func row(tenant, meter, start string, value, events int64, dims ...string) string {
	if dims == nil {
		dims = []string{}
	}
	return fmt.Sprintf("%s %s %s %q value=%d events=%d", tenant, meter, start, dims, value, events)
}

func showRow(r *aggregator.UsageRow) string {
	if r.Start.Location() != time.UTC {
		return fmt.Sprintf("%s %s Start %s not in UTC", r.Tenant, r.Meter, r.Start)
	}
	return row(r.Tenant, r.Meter, r.Start.Format(time.RFC3339), r.Value, r.Events, r.Dims...)
}

// uq returns a usage query; from and to are RFC 3339.
func uq(g aggregator.Granularity, tenant, meter, from, to string, groupBy ...string) aggregator.UsageQuery {
	return aggregator.UsageQuery{Tenant: tenant, Meter: meter, From: at(from), To: at(to), Granularity: g, GroupBy: groupBy}
}

func usageRows(t *testing.T, s aggregator.Store, q aggregator.UsageQuery) []string {
	t.Helper()
	got := []string{}
	err := s.Usage(t.Context(), q, func(r *aggregator.UsageRow) error {
		got = append(got, showRow(r))
		return nil
	})
	if err != nil {
		t.Fatalf("Usage(%+v): %v", q, err)
	}
	return got
}

func checkUsage(t *testing.T, s aggregator.Store, q aggregator.UsageQuery, want ...string) {
	t.Helper()
	if want == nil {
		want = []string{}
	}
	if got := usageRows(t, s, q); !slices.Equal(got, want) {
		t.Errorf("Usage(%s %q/%q [%s, %s) by %q):\n got  %s\n want %s", q.Granularity, q.Tenant, q.Meter,
			q.From.Format(time.RFC3339Nano), q.To.Format(time.RFC3339Nano), q.GroupBy,
			strings.Join(got, "\n      "), strings.Join(want, "\n      "))
	}
}

// reportData is usage around the end of January 2026 and of February 2028
// (a leap year), with dimensions route and method set on some events only,
// for the hand-computed reports of testUsage.
func reportData(t *testing.T, s aggregator.Store) {
	apply(t, s, batch("b1",
		ev("acme", "a1", "api_calls", 1, at("2026-01-31T22:59:59Z"), "route", "/a", "method", "GET"),
		ev("acme", "a2", "api_calls", 10, at("2026-01-31T23:00:00Z"), "route", "/a"),
		ev("acme", "a3", "api_calls", 100, at("2026-01-31T23:30:00.9Z"), "route", "/b", "method", "POST"), // stored as 23:30:00
		ev("acme", "a4", "api_calls", 1000, at("2026-01-31T23:59:59.999Z"), "method", "GET"),
		ev("acme", "a5", "api_calls", 10000, at("2026-02-01T00:00:00Z"), "route", "/a", "method", "GET"),
		ev("acme", "a6", "api_calls", 100000, at("2026-02-01T01:15:00Z")),
		ev("acme", "a7", "tokens", 7, at("2026-01-31T23:10:00Z"), "route", "/a"),
		ev("acme", "a8", "tokens", 0, at("2026-02-01T00:10:00Z")), // no value, still an event
		ev("globex", "g1", "api_calls", 5, at("2026-01-31T23:10:00Z"), "route", "/b"),
		ev("globex", "g2", "api_calls", 50, at("2026-02-15T12:00:00Z")),
		ev("Zeta", "z1", "api_calls", 3, at("2026-01-31T12:00:00Z")),  // 'Z' sorts before 'a'
		ev("acme-eu", "x1", "tokens", 4, at("2026-01-31T23:20:00Z"))), // after "acme"
		batch("b2",
			ev("acme", "l1", "api_calls", 2, at("2028-02-28T23:59:59Z")),
			ev("acme", "l2", "api_calls", 20, at("2028-02-29T00:00:00Z"), "route", "/a"),
			ev("acme", "l3", "api_calls", 200, at("2028-02-29T23:59:59Z")),
			ev("acme", "l4", "api_calls", 2000, at("2028-03-01T00:00:00Z"))))
}

func testUsage(t *testing.T, s aggregator.Store) {
	reportData(t, s)
	const (
		hour  = aggregator.Hourly
		day   = aggregator.Daily
		month = aggregator.Monthly
	)
	for _, tc := range []struct {
		name string
		q    aggregator.UsageQuery
		want []string
	}{
		{"month", uq(month, "acme", "", "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"), []string{
			row("acme", "api_calls", "2026-01-01T00:00:00Z", 1111, 4),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 110000, 2),
			row("acme", "tokens", "2026-01-01T00:00:00Z", 7, 1),
			row("acme", "tokens", "2026-02-01T00:00:00Z", 0, 1),
		}},
		{"day, all tenants and meters, in byte order", uq(day, "", "", "2026-01-31T00:00:00Z", "2026-02-02T00:00:00Z"), []string{
			row("Zeta", "api_calls", "2026-01-31T00:00:00Z", 3, 1),
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 1111, 4),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 110000, 2),
			row("acme", "tokens", "2026-01-31T00:00:00Z", 7, 1),
			row("acme", "tokens", "2026-02-01T00:00:00Z", 0, 1),
			row("acme-eu", "tokens", "2026-01-31T00:00:00Z", 4, 1),
			row("globex", "api_calls", "2026-01-31T00:00:00Z", 5, 1),
		}},
		{"hour", uq(hour, "acme", "api_calls", "2026-01-31T22:00:00Z", "2026-02-01T02:00:00Z"), []string{
			row("acme", "api_calls", "2026-01-31T22:00:00Z", 1, 1),
			row("acme", "api_calls", "2026-01-31T23:00:00Z", 1110, 3),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 10000, 1),
			row("acme", "api_calls", "2026-02-01T01:00:00Z", 100000, 1),
		}},
		// Bounds off the hour: the partial hours come from raw events, and
		// a bucket's Start is not clipped to From.
		{"hour, partial hours", uq(hour, "acme", "api_calls", "2026-01-31T22:59:59Z", "2026-02-01T01:15:00Z"), []string{
			row("acme", "api_calls", "2026-01-31T22:00:00Z", 1, 1),
			row("acme", "api_calls", "2026-01-31T23:00:00Z", 1110, 3),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 10000, 1),
		}},
		{"hour, sub-second bounds", uq(hour, "acme", "api_calls", "2026-01-31T23:30:00.5Z", "2026-02-01T01:15:00.1Z"), []string{
			row("acme", "api_calls", "2026-01-31T23:00:00Z", 1000, 1), // a3 is stored at 23:30:00
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 10000, 1),
			row("acme", "api_calls", "2026-02-01T01:00:00Z", 100000, 1), // to rounds up to 01:15:01
		}},
		{"day, partial hours merged with whole hours", uq(day, "acme", "api_calls", "2026-01-31T22:30:00Z", "2026-02-01T01:30:00Z"), []string{
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 1111, 4),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 110000, 2),
		}},
		{"day, one partial range across midnight", uq(day, "acme", "", "2026-01-31T23:30:00Z", "2026-02-01T00:30:00Z"), []string{
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 1100, 2),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 10000, 1),
			row("acme", "tokens", "2026-02-01T00:00:00Z", 0, 1),
		}},
		{"month, partial hours", uq(month, "", "api_calls", "2026-01-31T23:05:00Z", "2026-02-15T12:00:01Z"), []string{
			row("acme", "api_calls", "2026-01-01T00:00:00Z", 1100, 2),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 110000, 2),
			row("globex", "api_calls", "2026-01-01T00:00:00Z", 5, 1),
			row("globex", "api_calls", "2026-02-01T00:00:00Z", 50, 1),
		}},
		{"group by route", uq(day, "acme", "api_calls", "2026-01-31T00:00:00Z", "2026-02-02T00:00:00Z", "route"), []string{
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 1000, 1, ""),
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 11, 2, "/a"),
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 100, 1, "/b"),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 100000, 1, ""),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 10000, 1, "/a"),
		}},
		{"group by route and method", uq(day, "acme", "api_calls", "2026-01-31T00:00:00Z", "2026-02-02T00:00:00Z", "route", "method"), []string{
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 1000, 1, "", "GET"),
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 10, 1, "/a", ""),
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 1, 1, "/a", "GET"),
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 100, 1, "/b", "POST"),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 100000, 1, "", ""),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 10000, 1, "/a", "GET"),
		}},
		{"group by method and route", uq(day, "acme", "api_calls", "2026-01-31T00:00:00Z", "2026-02-02T00:00:00Z", "method", "route"), []string{
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 10, 1, "", "/a"),
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 1000, 1, "GET", ""),
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 1, 1, "GET", "/a"),
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 100, 1, "POST", "/b"),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 100000, 1, "", ""),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 10000, 1, "GET", "/a"),
		}},
		{"group by route, partial hours", uq(hour, "acme", "api_calls", "2026-01-31T22:59:59Z", "2026-01-31T23:45:00Z", "route"), []string{
			row("acme", "api_calls", "2026-01-31T22:00:00Z", 1, 1, "/a"),
			row("acme", "api_calls", "2026-01-31T23:00:00Z", 10, 1, "/a"),
			row("acme", "api_calls", "2026-01-31T23:00:00Z", 100, 1, "/b"),
		}},
		{"group by route, partial hours merged with whole hours", uq(day, "acme", "api_calls", "2026-01-31T22:30:00Z", "2026-02-01T01:30:00Z", "route"), []string{
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 1000, 1, ""),
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 11, 2, "/a"), // a1 from events, a2 from rollups
			row("acme", "api_calls", "2026-01-31T00:00:00Z", 100, 1, "/b"),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 100000, 1, ""),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 10000, 1, "/a"),
		}},
		{"group by a dimension no event has", uq(month, "globex", "", "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", "region"), []string{
			row("globex", "api_calls", "2026-01-01T00:00:00Z", 5, 1, ""),
			row("globex", "api_calls", "2026-02-01T00:00:00Z", 50, 1, ""),
		}},
		{"all tenants, one meter", uq(month, "", "api_calls", "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"), []string{
			row("Zeta", "api_calls", "2026-01-01T00:00:00Z", 3, 1),
			row("acme", "api_calls", "2026-01-01T00:00:00Z", 1111, 4),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 110000, 2),
			row("globex", "api_calls", "2026-01-01T00:00:00Z", 5, 1),
			row("globex", "api_calls", "2026-02-01T00:00:00Z", 50, 1),
		}},
		{"all tenants, other meter", uq(month, "", "tokens", "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"), []string{
			row("acme", "tokens", "2026-01-01T00:00:00Z", 7, 1),
			row("acme", "tokens", "2026-02-01T00:00:00Z", 0, 1),
			row("acme-eu", "tokens", "2026-01-01T00:00:00Z", 4, 1),
		}},
		{"one tenant, every meter", uq(month, "globex", "", "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"), []string{
			row("globex", "api_calls", "2026-01-01T00:00:00Z", 5, 1),
			row("globex", "api_calls", "2026-02-01T00:00:00Z", 50, 1),
		}},
		{"unknown tenant", uq(month, "nobody", "", "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"), nil},
		{"unknown meter", uq(month, "acme", "nothing", "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"), nil},
		{"month end, hour bounds", uq(month, "acme", "api_calls", "2026-01-31T23:00:00Z", "2026-02-01T01:00:00Z"), []string{
			row("acme", "api_calls", "2026-01-01T00:00:00Z", 1110, 3),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 10000, 1),
		}},
		{"month end, last and first second", uq(month, "acme", "api_calls", "2026-01-31T23:59:59Z", "2026-02-01T00:00:01Z"), []string{
			row("acme", "api_calls", "2026-01-01T00:00:00Z", 1000, 1),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 10000, 1),
		}},
		{"leap year, month", uq(month, "acme", "api_calls", "2028-01-01T00:00:00Z", "2028-04-01T00:00:00Z"), []string{
			row("acme", "api_calls", "2028-02-01T00:00:00Z", 222, 3),
			row("acme", "api_calls", "2028-03-01T00:00:00Z", 2000, 1),
		}},
		{"leap year, day", uq(day, "acme", "api_calls", "2028-02-28T00:00:00Z", "2028-03-02T00:00:00Z"), []string{
			row("acme", "api_calls", "2028-02-28T00:00:00Z", 2, 1),
			row("acme", "api_calls", "2028-02-29T00:00:00Z", 220, 2),
			row("acme", "api_calls", "2028-03-01T00:00:00Z", 2000, 1),
		}},
		{"leap year, day by route", uq(day, "acme", "api_calls", "2028-02-29T00:00:00Z", "2028-03-01T00:00:00Z", "route"), []string{
			row("acme", "api_calls", "2028-02-29T00:00:00Z", 200, 1, ""),
			row("acme", "api_calls", "2028-02-29T00:00:00Z", 20, 1, "/a"),
		}},
		{"leap year, hour", uq(hour, "acme", "api_calls", "2028-02-29T23:00:00Z", "2028-03-01T01:00:00Z"), []string{
			row("acme", "api_calls", "2028-02-29T23:00:00Z", 200, 1),
			row("acme", "api_calls", "2028-03-01T00:00:00Z", 2000, 1),
		}},
		{"all of time", uq(month, "acme", "api_calls", "1900-01-01T00:00:00Z", "2200-01-01T00:00:00Z"), []string{
			row("acme", "api_calls", "2026-01-01T00:00:00Z", 1111, 4),
			row("acme", "api_calls", "2026-02-01T00:00:00Z", 110000, 2),
			row("acme", "api_calls", "2028-02-01T00:00:00Z", 222, 3),
			row("acme", "api_calls", "2028-03-01T00:00:00Z", 2000, 1),
		}},
		{"empty range", uq(day, "acme", "", "2026-02-01T00:00:00Z", "2026-02-01T00:00:00Z"), nil},
		{"reversed range", uq(day, "acme", "", "2026-02-01T00:00:00Z", "2026-01-01T00:00:00Z"), nil},
		{"range without events", uq(hour, "", "", "2026-03-01T00:00:00Z", "2026-03-01T10:30:00Z"), nil},
	} {
		t.Run(tc.name, func(t *testing.T) { checkUsage(t, s, tc.q, tc.want...) })
	}

	t.Run("an error of fn stops Usage", func(t *testing.T) {
		stop := errors.New("stop")
		calls := 0
		err := s.Usage(t.Context(), uq(day, "", "", "2026-01-31T00:00:00Z", "2026-02-02T00:00:00Z"), func(r *aggregator.UsageRow) error {
			calls++
			if got, want := showRow(r), row("Zeta", "api_calls", "2026-01-31T00:00:00Z", 3, 1); got != want {
				t.Errorf("first row = %s, want %s", got, want)
			}
			return stop
		})
		if !errors.Is(err, stop) || calls != 1 {
			t.Errorf("Usage = %v after %d calls of fn, want the error of fn after 1", err, calls)
		}
		// The store is still usable afterwards.
		checkUsage(t, s, uq(month, "globex", "", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
			row("globex", "api_calls", "2026-01-01T00:00:00Z", 5, 1))
	})

	t.Run("invalid queries", func(t *testing.T) {
		valid := uq(day, "acme", "", "2026-01-31T00:00:00Z", "2026-02-02T00:00:00Z")
		for _, mutate := range []func(q *aggregator.UsageQuery){
			func(q *aggregator.UsageQuery) { q.Granularity = 0 },
			func(q *aggregator.UsageQuery) { q.Granularity = aggregator.Monthly + 1 },
			func(q *aggregator.UsageQuery) { q.GroupBy = []string{""} },
			func(q *aggregator.UsageQuery) { q.GroupBy = []string{"route", `a"b`} },
			func(q *aggregator.UsageQuery) { q.GroupBy = []string{"x') --"} },
			func(q *aggregator.UsageQuery) { q.GroupBy = []string{`a\`} },
			func(q *aggregator.UsageQuery) { q.GroupBy = []string{"1route"} },
		} {
			q := valid
			mutate(&q)
			err := s.Usage(t.Context(), q, func(*aggregator.UsageRow) error {
				t.Errorf("Usage(%+v) called fn", q)
				return nil
			})
			if err == nil {
				t.Errorf("Usage(%+v) succeeded, want an error", q)
			}
		}
	})
}

// testUsageStorableRange reports usage at the first and the last second a
// store holds, with month, day and hour buckets.
func testUsageStorableRange(t *testing.T, s aggregator.Store) {
	last := aggregator.MaxEventTime.Add(-time.Second) // 2106-02-07T06:28:14Z
	apply(t, s, batch("b1",
		ev("acme", "e1", "api_calls", 1, aggregator.MinEventTime),
		ev("acme", "e2", "api_calls", 10, at("2106-01-31T23:59:59Z")),
		ev("acme", "e3", "api_calls", 100, at("2106-02-06T23:59:59Z")),
		ev("acme", "e4", "api_calls", 1000, at("2106-02-07T00:00:00Z")),
		ev("acme", "e5", "api_calls", 10000, last)))
	all := func(g aggregator.Granularity) aggregator.UsageQuery {
		return aggregator.UsageQuery{Tenant: "acme", From: aggregator.MinEventTime, To: aggregator.MaxEventTime, Granularity: g}
	}
	checkUsage(t, s, all(aggregator.Monthly),
		row("acme", "api_calls", "1970-01-01T00:00:00Z", 1, 1),
		row("acme", "api_calls", "2106-01-01T00:00:00Z", 10, 1),
		row("acme", "api_calls", "2106-02-01T00:00:00Z", 11100, 3))
	checkUsage(t, s, all(aggregator.Daily),
		row("acme", "api_calls", "1970-01-01T00:00:00Z", 1, 1),
		row("acme", "api_calls", "2106-01-31T00:00:00Z", 10, 1),
		row("acme", "api_calls", "2106-02-06T00:00:00Z", 100, 1),
		row("acme", "api_calls", "2106-02-07T00:00:00Z", 11000, 2))
	checkUsage(t, s, all(aggregator.Hourly),
		row("acme", "api_calls", "1970-01-01T00:00:00Z", 1, 1),
		row("acme", "api_calls", "2106-01-31T23:00:00Z", 10, 1),
		row("acme", "api_calls", "2106-02-06T23:00:00Z", 100, 1),
		row("acme", "api_calls", "2106-02-07T00:00:00Z", 1000, 1),
		row("acme", "api_calls", "2106-02-07T06:00:00Z", 10000, 1))
	// The same from raw events: bounds off the hour.
	for _, g := range []aggregator.Granularity{aggregator.Monthly, aggregator.Daily, aggregator.Hourly} {
		q := aggregator.UsageQuery{Tenant: "acme", From: last.Add(-time.Minute), To: aggregator.MaxEventTime, Granularity: g}
		start := g.BucketStart(last).Format(time.RFC3339)
		checkUsage(t, s, q, row("acme", "api_calls", start, 10000, 1))
	}
}

// testUsageDimensionValues groups by dimensions whose values hold quotes,
// backslashes, control characters, NUL, unicode and text that looks like
// another dimension, and whose names hold '.' and '-': every store decodes
// them to the values sent, from the rollups and from the raw events alike.
func testUsageDimensionValues(t *testing.T, s aggregator.Store) {
	h := at("2026-01-31T23:00:00Z")
	apply(t, s, batch("b1",
		ev("acme", "w1", "api_calls", 1, h.Add(10*time.Minute), "a.b", `say "hi"`, "route", `C:\path\`),
		ev("acme", "w2", "api_calls", 2, h.Add(11*time.Minute), "a.b", "line\nbreak\ttab\x01\x00nul\u007f", "x-y", "é😀\u2028"),
		ev("acme", "w3", "api_calls", 4, h.Add(12*time.Minute), "a.b", `"route":"evil"`, "xroute", "no", "a.route", "no"),
		ev("acme", "w4", "api_calls", 8, h.Add(13*time.Minute), "a.b", "\xffbad"), // invalid UTF-8 is stored as U+FFFD
		ev("acme", "w5", "api_calls", 16, h.Add(14*time.Minute), "a.b", "é", "route", ""),
		ev("acme", "w6", "api_calls", 32, h.Add(15*time.Minute), "route", `{"a.b":"nested"}`, "X-Y", `\u0041`)))
	for _, r := range []struct{ name, from, to string }{
		{"rollups", "2026-01-31T23:00:00Z", "2026-02-01T00:00:00Z"},
		{"raw events", "2026-01-31T23:00:01Z", "2026-01-31T23:59:00Z"},
	} {
		t.Run(r.name, func(t *testing.T) {
			start := "2026-01-31T23:00:00Z"
			checkUsage(t, s, uq(aggregator.Hourly, "acme", "api_calls", r.from, r.to, "a.b", "route"),
				row("acme", "api_calls", start, 32, 1, "", `{"a.b":"nested"}`),
				row("acme", "api_calls", start, 4, 1, `"route":"evil"`, ""),
				row("acme", "api_calls", start, 2, 1, "line\nbreak\ttab\x01\x00nul\u007f", ""),
				row("acme", "api_calls", start, 1, 1, `say "hi"`, `C:\path\`),
				row("acme", "api_calls", start, 16, 1, "é", ""),
				row("acme", "api_calls", start, 8, 1, "\ufffdbad", ""))
			checkUsage(t, s, uq(aggregator.Hourly, "acme", "api_calls", r.from, r.to, "route"),
				row("acme", "api_calls", start, 30, 4, ""),
				row("acme", "api_calls", start, 1, 1, `C:\path\`),
				row("acme", "api_calls", start, 32, 1, `{"a.b":"nested"}`))
			checkUsage(t, s, uq(aggregator.Daily, "acme", "api_calls", r.from, r.to, "x-y", "X-Y", "a.route"),
				row("acme", "api_calls", "2026-01-31T00:00:00Z", 25, 3, "", "", ""),
				row("acme", "api_calls", "2026-01-31T00:00:00Z", 4, 1, "", "", "no"),
				row("acme", "api_calls", "2026-01-31T00:00:00Z", 32, 1, "", `\u0041`, ""),
				row("acme", "api_calls", "2026-01-31T00:00:00Z", 2, 1, "é😀\u2028", "", ""))
		})
	}
}

// testUsageCorrection checks that rollup rows whose sums cancel out, by
// corrections or by Reconcile, leave no row in reports.
func testUsageCorrection(t *testing.T, s aggregator.Store) {
	c, ok := s.(Corrupter)
	if !ok {
		t.Skip("the store under test does not implement storetest.Corrupter")
	}
	monthEnd(t, s)
	h23 := at("2026-01-31T23:00:00Z")
	q := uq(aggregator.Hourly, "acme", "api_calls", "2026-01-31T23:00:00Z", "2026-02-01T00:00:00Z", "route")
	c.AddToRollup(t, "acme", "api_calls", h23, map[string]string{"route": "/z"}, 9, 1)   // no such events
	c.AddToRollup(t, "acme", "api_calls", h23, map[string]string{"route": "/y"}, 5, 2)   // a correction and
	c.AddToRollup(t, "acme", "api_calls", h23, map[string]string{"route": "/y"}, -5, -2) // its reversal
	checkUsage(t, s, q,
		row("acme", "api_calls", "2026-01-31T23:00:00Z", 1110, 3, ""),
		row("acme", "api_calls", "2026-01-31T23:00:00Z", 9, 1, "/z"))
	if n, err := s.Reconcile(t.Context(), h23, h23.Add(time.Hour)); err != nil || n != 1 {
		t.Fatalf("Reconcile = %d, %v; want 1", n, err)
	}
	checkUsage(t, s, q, row("acme", "api_calls", "2026-01-31T23:00:00Z", 1110, 3, ""))
	checkUsage(t, s, uq(aggregator.Monthly, "", "", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
		row("acme", "api_calls", "2026-01-01T00:00:00Z", 1111, 4),
		row("acme", "tokens", "2026-01-01T00:00:00Z", 7, 1),
		row("globex", "api_calls", "2026-01-01T00:00:00Z", 5, 1))
}

// testUsageOracle checks Usage for random queries against sums computed
// here from random events.
func testUsageOracle(t *testing.T, s aggregator.Store) {
	rng := rand.New(rand.NewPCG(20280229, 2))
	tenants := []string{"acme", "globex", "Initech", "umbrella"}
	meters := []string{"api_calls", "tokens", "bytes_out"}
	dimValues := map[string][]string{"route": {"/a", "/b", "/c"}, "method": {"GET", "POST"}, "region": {"eu", "us-east-1"}}
	start := at("2028-01-20T00:00:00Z")
	span := 50 * 24 * time.Hour // across the ends of January and of February 2028
	var events []schemas.Event
	for call := range 5 {
		var batches []*schemas.Batch
		for b := range 4 {
			bt := batch(fmt.Sprintf("b%d-%d", call, b))
			for i := range 100 {
				e := ev(tenants[rng.IntN(len(tenants))], fmt.Sprintf("e%d-%d-%d", call, b, i), meters[rng.IntN(len(meters))],
					rng.Int64N(1000), start.Add(time.Duration(rng.Int64N(int64(span)))))
				for _, d := range slices.Sorted(maps.Keys(dimValues)) {
					if rng.IntN(3) > 0 {
						if e.Dimensions == nil {
							e.Dimensions = map[string]string{}
						}
						e.Dimensions[d] = dimValues[d][rng.IntN(len(dimValues[d]))]
					}
				}
				bt.Events = append(bt.Events, e)
			}
			batches = append(batches, bt)
			events = append(events, bt.Events...)
		}
		apply(t, s, batches...)
	}

	names := slices.Sorted(maps.Keys(dimValues))
	for i := range 40 {
		q := aggregator.UsageQuery{Granularity: aggregator.Granularity(1 + rng.IntN(3))}
		if rng.IntN(2) == 0 {
			q.Tenant = tenants[rng.IntN(len(tenants))]
		}
		if rng.IntN(2) == 0 {
			q.Meter = meters[rng.IntN(len(meters))]
		}
		q.From = start.Add(time.Duration(rng.Int64N(int64(span))) - 24*time.Hour)
		switch rng.IntN(3) {
		case 0:
			q.From = q.From.Truncate(time.Hour)
		case 1:
			q.From = q.From.Truncate(24 * time.Hour)
		}
		q.To = q.From.Add(time.Duration(rng.Int64N(int64(40 * 24 * time.Hour))))
		if rng.IntN(2) == 0 {
			q.To = q.To.Truncate(time.Hour)
		}
		for _, j := range rng.Perm(len(names))[:rng.IntN(len(names)+1)] {
			q.GroupBy = append(q.GroupBy, names[j])
		}

		type key struct {
			tenant, meter string
			start         time.Time
			dims          string // "\x00"-joined
		}
		sums := map[key]*aggregator.UsageRow{}
		for _, e := range events {
			st := e.Time.Truncate(time.Second)
			if (q.Tenant != "" && e.Tenant != q.Tenant) || (q.Meter != "" && e.Meter != q.Meter) || st.Before(q.From) || !st.Before(q.To) {
				continue
			}
			dims := make([]string, len(q.GroupBy))
			for j, d := range q.GroupBy {
				dims[j] = e.Dimensions[d]
			}
			k := key{e.Tenant, e.Meter, q.Granularity.BucketStart(st), strings.Join(dims, "\x00")}
			if sums[k] == nil {
				sums[k] = &aggregator.UsageRow{Tenant: e.Tenant, Meter: e.Meter, Start: k.start, Dims: dims}
			}
			sums[k].Value += e.Value
			sums[k].Events++
		}
		rows := slices.SortedFunc(maps.Values(sums), func(a, b *aggregator.UsageRow) int {
			return cmp.Or(strings.Compare(a.Tenant, b.Tenant), strings.Compare(a.Meter, b.Meter), a.Start.Compare(b.Start),
				slices.Compare(a.Dims, b.Dims))
		})
		var want []string
		for _, r := range rows {
			want = append(want, showRow(r))
		}
		t.Run(fmt.Sprint(i), func(t *testing.T) { checkUsage(t, s, q, want...) })
	}
}
