package storetest

import (
	"cmp"
	"encoding/hex"
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

// Shape of BenchmarkApply: calls of ApplyBatches batches of BatchEvents new
// events each, over BenchTenants tenants and the meters of Meters.
const (
	ApplyBatches = 100
	BatchEvents  = 500
	BenchTenants = 1000
)

// Meters are the meters of the benchmark data.
var Meters = []string{"api_calls", "tokens", "bytes_out"}

// BenchBatches returns ApplyBatches batches of BatchEvents events with
// random ids (new w.h.p.), random tenants, meters and dimensions, and times
// within the minute starting at start.
func BenchBatches(rng *rand.Rand, start time.Time) []*schemas.Batch {
	routes := []string{"/v1/a", "/v1/b", "/v1/c", "/v2/a", "/v2/b"}
	methods := []string{"GET", "POST"}
	var id [16]byte
	batches := make([]*schemas.Batch, ApplyBatches)
	for i := range batches {
		b := &schemas.Batch{Collector: "bench", SealedAt: start, Events: make([]schemas.Event, BatchEvents)}
		for j := range b.Events {
			for k := range 2 {
				v := rng.Uint64()
				for x := range 8 {
					id[k*8+x] = byte(v >> (8 * x))
				}
			}
			b.Events[j] = schemas.Event{
				ID:     hex.EncodeToString(id[:]),
				Tenant: fmt.Sprintf("tenant-%d", rng.IntN(BenchTenants)),
				Meter:  Meters[rng.IntN(len(Meters))],
				Value:  1 + rng.Int64N(100),
				Time:   start.Add(time.Duration(rng.Int64N(int64(time.Minute)))),
				Dimensions: map[string]string{
					"route":  routes[rng.IntN(len(routes))],
					"method": methods[rng.IntN(len(methods))],
				},
			}
		}
		b.ID = "batch-" + b.Events[0].ID
		batches[i] = b
	}
	return batches
}

// BenchmarkApply measures Apply of ApplyBatches×BatchEvents new events per
// call, each call a minute later than the one before, into a store that
// grows by that much per iteration; it reports events/s.
func BenchmarkApply(b *testing.B, s aggregator.Store) {
	rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	start := time.Date(2026, 1, 15, 0, 0, 0, 0, time.UTC)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		batches := BenchBatches(rng, start.Add(time.Duration(i)*time.Minute))
		b.StartTimer()
		incs, err := s.Apply(b.Context(), batches)
		if err != nil {
			b.Fatal(err)
		}
		var n int64
		for _, inc := range incs {
			n += inc.Events
		}
		if n != ApplyBatches*BatchEvents {
			b.Fatalf("Apply counted %d events, want %d", n, ApplyBatches*BatchEvents)
		}
	}
	b.ReportMetric(float64(b.N*ApplyBatches*BatchEvents)/b.Elapsed().Seconds(), "events/s")
}

// The monthly-total data set: MonthEvents events of January 2026 summed in
// MonthRows rollup rows, one per (tenant, meter, hour). Row n (0 <= n <
// MonthRows) is tenant "tenant-<n%1000>", meter Meters[n/1000%3], hour
// 2026-01-01T00:00Z + n/3000 hours, the dimensions MonthDims(n/3000), 5
// events if n < 1072000 else 4, and a value of 3 per event. Each store fills
// it its own fast way.
const (
	MonthRows   = BenchTenants * 3 * 744
	MonthEvents = 10_000_000
	MonthStart  = 1767225600 // 2026-01-01T00:00:00Z
	// MonthFiveEventRows is how many rows, from row 0, hold 5 events.
	MonthFiveEventRows = MonthEvents - 4*MonthRows
)

// MonthDims returns the dimensions of the rows of hour h (0 <= h < 744) of
// the monthly-total data set: {"method": "GET" if h is even else "POST",
// "route": "/v1/r<h%5>"}.
func MonthDims(h int) map[string]string {
	method := "GET"
	if h%2 == 1 {
		method = "POST"
	}
	return map[string]string{"method": method, "route": fmt.Sprintf("/v1/r%d", h%5)}
}

// BenchmarkMonthlyTotal measures Total of one tenant's meter over January
// from the monthly-total data set, which the caller filled into s.
func BenchmarkMonthlyTotal(b *testing.B, s aggregator.Store) {
	tenant, meter := 42, 0
	var want int64
	for h := range 744 {
		n := h*3000 + meter*1000 + tenant
		events := int64(4)
		if n < MonthFiveEventRows {
			events = 5
		}
		want += 3 * events
	}
	from := time.Unix(MonthStart, 0).UTC()
	to := from.AddDate(0, 1, 0)
	name := fmt.Sprintf("tenant-%d", tenant)
	b.ReportAllocs()
	for b.Loop() {
		got, err := s.Total(b.Context(), name, Meters[meter], from, to)
		if err != nil {
			b.Fatal(err)
		}
		if got != want {
			b.Fatalf("Total = %d, want %d", got, want)
		}
	}
}

// CheckMonthEvents fails b unless s holds MonthEvents events in January.
func CheckMonthEvents(b *testing.B, s aggregator.Store) {
	from := time.Unix(MonthStart, 0).UTC()
	totals, err := s.Totals(b.Context(), from, from.AddDate(0, 1, 0))
	if err != nil {
		b.Fatal(err)
	}
	var events int64
	for _, t := range totals {
		events += t.Events
	}
	if len(totals) != BenchTenants*len(Meters) || events != MonthEvents {
		b.Fatalf("the data set holds %d events of %d (tenant, meter) pairs, want %d of %d", events, len(totals), MonthEvents, BenchTenants*len(Meters))
	}
}

// BenchmarkReports measures three usage reports of one tenant over January
// from the monthly-total data set, which the caller filled into s: monthly
// for all meters (3 rows from 2 232 rollup rows), daily over the 31 days (93
// rows) and daily grouped by route (465 rows). Every row is checked.
func BenchmarkReports(b *testing.B, s aggregator.Store) {
	const tenant = 42
	from := time.Unix(MonthStart, 0).UTC()
	q := aggregator.UsageQuery{Tenant: fmt.Sprintf("tenant-%d", tenant), From: from, To: from.AddDate(0, 1, 0)}
	for _, bc := range []struct {
		name    string
		g       aggregator.Granularity
		groupBy []string
	}{
		{"tenant_month", aggregator.Monthly, nil},
		{"tenant_31_days", aggregator.Daily, nil},
		{"tenant_31_days_by_route", aggregator.Daily, []string{"route"}},
	} {
		q := q
		q.Granularity, q.GroupBy = bc.g, bc.groupBy
		want := monthReport(q, tenant)
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				i := 0
				err := s.Usage(b.Context(), q, func(r *aggregator.UsageRow) error {
					if i >= len(want) {
						return fmt.Errorf("row %d: %s, want no more rows", i, showRow(r))
					}
					w := &want[i]
					if r.Tenant != w.Tenant || r.Meter != w.Meter || !r.Start.Equal(w.Start) || !slices.Equal(r.Dims, w.Dims) ||
						r.Value != w.Value || r.Events != w.Events {
						return fmt.Errorf("row %d: %s, want %s", i, showRow(r), showRow(w))
					}
					i++
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
				if i != len(want) {
					b.Fatalf("Usage returned %d rows, want %d", i, len(want))
				}
			}
		})
	}
}

// monthReport returns the rows of q over the monthly-total data set, which
// selects tenant.
func monthReport(q aggregator.UsageQuery, tenant int) []aggregator.UsageRow {
	type key struct {
		meter string
		start time.Time
		dims  string
	}
	sums := map[key]*aggregator.UsageRow{}
	for h := range 744 {
		dims := make([]string, len(q.GroupBy))
		for i, d := range q.GroupBy {
			dims[i] = MonthDims(h)[d]
		}
		for m, meter := range Meters {
			n := h*3000 + m*1000 + tenant
			events := int64(4)
			if n < MonthFiveEventRows {
				events = 5
			}
			k := key{meter, q.Granularity.BucketStart(time.Unix(MonthStart+int64(h)*3600, 0)), strings.Join(dims, "\x00")}
			if sums[k] == nil {
				sums[k] = &aggregator.UsageRow{Tenant: q.Tenant, Meter: meter, Start: k.start, Dims: dims}
			}
			sums[k].Value += 3 * events
			sums[k].Events += events
		}
	}
	rows := slices.SortedFunc(maps.Values(sums), func(a, b *aggregator.UsageRow) int {
		return cmp.Or(strings.Compare(a.Meter, b.Meter), a.Start.Compare(b.Start), slices.Compare(a.Dims, b.Dims))
	})
	out := make([]aggregator.UsageRow, len(rows))
	for i, r := range rows {
		out[i] = *r
	}
	return out
}
