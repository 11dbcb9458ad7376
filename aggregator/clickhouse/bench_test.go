package clickhouse

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator/storetest"
	"github.com/meterd/meterd/internal/chtest"
)

func BenchmarkApply(b *testing.B) {
	storetest.BenchmarkApply(b, newStore(b, chtest.DSN(b)))
}

// monthStore returns a store holding the monthly-total data set (about 2.2
// million rollup rows) filled in 8 inserts, leaving parts unmerged as a live
// month has them.
func monthStore(b *testing.B) *Store {
	s := newStore(b, chtest.DSN(b))
	const chunks = 8
	for i := range chunks {
		from, n := i*storetest.MonthRows/chunks, storetest.MonthRows/chunks
		err := s.conn.Exec(b.Context(), fmt.Sprintf(`
			INSERT INTO rollups_hourly (tenant, meter, hour, dims_key, value, events)
			SELECT concat('tenant-', toString(number %% 1000)), ['api_calls', 'tokens', 'bytes_out'][intDiv(number, 1000) %% 3 + 1],
				toDateTime(%d + intDiv(number, 3000) * 3600),
				concat('{"method":"', if(intDiv(number, 3000) %% 2 = 0, 'GET', 'POST'), '","route":"/v1/r', toString(intDiv(number, 3000) %% 5), '"}'),
				3 * e, e
			FROM (SELECT number, toInt64(if(number < %d, 5, 4)) AS e FROM system.numbers WHERE number >= %d LIMIT %d)`,
			storetest.MonthStart, storetest.MonthFiveEventRows, from, n))
		if err != nil {
			b.Fatal(err)
		}
	}
	storetest.CheckMonthEvents(b, s)
	return s
}

// BenchmarkMonthlyTotal measures one total over the monthly-total data set.
func BenchmarkMonthlyTotal(b *testing.B) {
	s := monthStore(b)
	b.Run("tenant_month", func(b *testing.B) { storetest.BenchmarkMonthlyTotal(b, s) })
}

// BenchmarkReport measures one tenant's reports over the monthly-total data
// set.
func BenchmarkReport(b *testing.B) {
	storetest.BenchmarkReports(b, monthStore(b))
}

// BenchmarkLookup measures what Apply reads before it writes (the dedup
// lookup) for a call of new events, against tables of 1 and 10
// million events; calls of 50 000 events scan key_hash, calls of 1 000 go
// through the primary key.
func BenchmarkLookup(b *testing.B) {
	s := newStore(b, chtest.DSN(b))
	rng := rand.New(rand.NewPCG(1, 2))
	calls := storetest.BenchBatches(rng, time.Unix(storetest.MonthStart, 0))
	filled := 0
	for _, n := range []int{1_000_000, 10_000_000} {
		err := s.conn.Exec(b.Context(), fmt.Sprintf(`
			INSERT INTO events (tenant, id, meter, value, time, dims_key, batch_id, key_hash)
			SELECT concat('tenant-', toString(number %% 1000)), lower(hex(sipHash128(toString(number)))), 'api_calls', 1,
				toDateTime(%d + number %% 2678400), '', 'fill', sipHash64(number)
			FROM system.numbers WHERE number >= %d LIMIT %d`, storetest.MonthStart, filled, n-filled))
		if err != nil {
			b.Fatal(err)
		}
		filled = n
		for _, k := range []int{storetest.ApplyBatches, 2} {
			b.Run(fmt.Sprintf("events=%d/new=%d", n, k*storetest.BatchEvents), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					cands, index, _ := candidates(calls[:k], false)
					held, err := s.lookUp(b.Context(), cands, index)
					if err != nil {
						b.Fatal(err)
					}
					if news := len(cands) - len(held); news != k*storetest.BatchEvents {
						b.Fatalf("the lookup found %d new events, want %d", news, k*storetest.BatchEvents)
					}
				}
			})
		}
	}
}

// BenchmarkIndexLoad measures the dedup index's load from events (its
// rebuild after the index was lost), of METERD_BENCH_LOAD events (default
// 2 000 000); keys/s is the figure.
func BenchmarkIndexLoad(b *testing.B) {
	n := 2_000_000
	if v := os.Getenv("METERD_BENCH_LOAD"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil {
			b.Fatal(err)
		}
	}
	s := newStore(b, chtest.DSN(b))
	err := s.conn.Exec(b.Context(), fmt.Sprintf(`
		INSERT INTO events (tenant, id, meter, value, time, dims_key, batch_id, key_hash)
		SELECT concat('tenant-', toString(number %% 1000)), lower(hex(sipHash128(toString(number)))), 'api_calls', 1,
			toDateTime(%d + number %% 2678400), '', 'fill', 0
		FROM system.numbers LIMIT %d`, storetest.MonthStart, n))
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := s.index.Reset(); err != nil {
			b.Fatal(err)
		}
		s.pending = true
		if _, err := s.Apply(b.Context(), nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "keys/s")
}
