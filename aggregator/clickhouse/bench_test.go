package clickhouse

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/ext"

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

// BenchmarkNarrowKeyTable weighs a design the dedup index was chosen over: a
// narrow table of the events' keys ordered by key_hash with small granules
// (index_granularity 256), so that a lookup of K keys reads about K granules
// of 256 keys instead of the events table's 8 192-row granules. It fills the
// table with METERD_BENCH_NARROW keys (sizes, comma-separated; default
// 10000000) and measures a lookup of 50 000 absent keys (a call of new
// events) through the primary key, as Apply would make it, and the rows the
// server read for it (system.query_log is not on every server, so the
// figure is the query's own read_rows from its progress).
func BenchmarkNarrowKeyTable(b *testing.B) {
	sizes := []int{10_000_000}
	if v := os.Getenv("METERD_BENCH_NARROW"); v != "" {
		sizes = sizes[:0]
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(f)
			if err != nil {
				b.Fatal(err)
			}
			sizes = append(sizes, n)
		}
	}
	s := newStore(b, chtest.DSN(b))
	err := s.conn.Exec(b.Context(), `CREATE TABLE bench_keys (key_hash UInt64, tenant String, id String)
		ENGINE = MergeTree ORDER BY key_hash SETTINGS index_granularity = 256`)
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	filled := 0
	for _, n := range sizes {
		ctx := clickhouse.Context(b.Context(), clickhouse.WithSettings(clickhouse.Settings{"max_execution_time": 3600}))
		start := time.Now()
		err := s.conn.Exec(ctx, fmt.Sprintf(`INSERT INTO bench_keys (key_hash, tenant, id)
			SELECT sipHash64(number), concat('tenant-', toString(number %% 1000)), lower(hex(sipHash128(toString(number))))
			FROM system.numbers WHERE number >= %d LIMIT %d`, filled, n-filled))
		if err != nil {
			b.Fatal(err)
		}
		b.Logf("narrow key table: %d keys added in %s", n-filled, time.Since(start).Round(time.Second))
		filled = n
		b.Run(fmt.Sprintf("keys=%d/new=50000", n), func(b *testing.B) {
			var read uint64
			for b.Loop() {
				hashes := make([]uint64, 50_000)
				for i := range hashes {
					hashes[i] = rng.Uint64() // absent: the table's keys are sipHash64 of 0..n-1
				}
				tbl, err := ext.NewTable("incoming_events", ext.Column("key_hash", "UInt64"))
				if err == nil {
					_, err = tbl.Block().Columns[0].Append(hashes)
				}
				if err != nil {
					b.Fatal(err)
				}
				read = 0
				ctx := clickhouse.Context(b.Context(), clickhouse.WithExternalTable(tbl),
					clickhouse.WithProgress(func(p *clickhouse.Progress) { read += p.Rows }))
				rows, err := s.conn.Query(ctx, `SELECT tenant, id FROM bench_keys PREWHERE key_hash IN incoming_events`)
				if err != nil {
					b.Fatal(err)
				}
				found := 0
				for rows.Next() {
					found++
				}
				if err := rows.Err(); err != nil {
					b.Fatal(err)
				}
				rows.Close()
				if found > 1 { // 50 000 random 64-bit keys among at most 10^9: a collision is 1 in 10^5
					b.Fatalf("found %d of 50 000 absent keys", found)
				}
			}
			b.ReportMetric(float64(read), "rows-read")
			b.ReportMetric(float64(read)/50_000, "rows-read/key")
		})
	}
}
