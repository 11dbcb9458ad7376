package aggregator_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	ch "github.com/ClickHouse/clickhouse-go/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/clickhouse"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// BenchmarkHistory measures the aggregator (JetStream → ClickHouse) with
// history in the store: for each size it fills events with that many
// events of the past (one month, 1000 tenants, by INSERT … SELECT on the
// server), then, for each way of looking events up (the local dedup index,
// and the lookup in ClickHouse), publishes a backlog of new events and
// drains it. It reports events/s over the whole drain and over its first
// and last quarter (a drain whose last quarter is slower than its first is
// not sustained), the CPU per 50 000 events of this process (aggregator and
// embedded NATS) and of the ClickHouse server, and for the index the time
// its first load from the history took.
//
// Sizes and the backlog come from the environment, for the long runs of
// BENCHMARKS.md:
//
//	METERD_BENCH_HISTORY   sizes, comma-separated (default 0,10000000)
//	METERD_BENCH_EVENTS    new events per run (default 2000000)
//	METERD_BENCH_MODES     index,lookup (default both)
//	METERD_BENCH_LIMIT     longest drain (default 10m)
//	METERD_BENCH_SUSTAIN   if set (a duration, e.g. 5m), each run is a
//	                       sustained one instead of a backlog's drain: new
//	                       events are published for that long, as fast as
//	                       the aggregator commits them (at most 200 000
//	                       ahead), and it reports events/s minute by minute
//	METERD_BENCH_PROFILE   with SUSTAIN, a path prefix: each minute's CPU
//	                       profile of this process goes to
//	                       <prefix>-h<size>-<run>-m<N>.pprof
//
// Run it with -benchtime 1x: b.N does not scale anything.
func BenchmarkHistory(b *testing.B) {
	sizes := envInts(b, "METERD_BENCH_HISTORY", "0,10000000")
	events := envInts(b, "METERD_BENCH_EVENTS", "2000000")[0]
	modes := strings.Split(envOr("METERD_BENCH_MODES", "index,lookup"), ",")
	limit, err := time.ParseDuration(envOr("METERD_BENCH_LIMIT", "10m"))
	if err != nil {
		b.Fatal(err)
	}
	sustain, err := time.ParseDuration(envOr("METERD_BENCH_SUSTAIN", "0s"))
	if err != nil {
		b.Fatal(err)
	}
	dsn := chtest.DSN(b)
	filled := int64(0)
	for _, size := range sizes {
		fillHistory(b, dsn, filled, size)
		filled = size
		for run, mode := range modes {
			b.Run(fmt.Sprintf("history=%d/%s", size, mode), func(b *testing.B) {
				benchmarkHistory(b, dsn, mode, fmt.Sprintf("h%d-%d-", size, run), size, events, limit, sustain)
			})
		}
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func envInts(b *testing.B, name, def string) []int64 {
	var out []int64
	for _, f := range strings.Split(envOr(name, def), ",") {
		n, err := strconv.ParseInt(strings.TrimSpace(f), 10, 64)
		if err != nil {
			b.Fatalf("%s: %v", name, err)
		}
		out = append(out, n)
	}
	return out
}

// fillHistory adds the events from .. to-1 of the history to the store of
// dsn, in inserts of 20 million, and waits for the server's merges.
func fillHistory(b *testing.B, dsn string, from, to int64) {
	if to <= from {
		return
	}
	st, err := clickhouse.New(b.Context(), clickhouse.Config{DSN: dsn}) // creates the tables
	if err != nil {
		b.Fatal(err)
	}
	st.Close()
	opts, err := ch.ParseDSN(dsn)
	if err != nil {
		b.Fatal(err)
	}
	conn, err := ch.Open(opts)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	ctx := ch.Context(b.Context(), ch.WithSettings(ch.Settings{
		"min_insert_block_size_rows": 20_000_000, "min_insert_block_size_bytes": 4 << 30, "max_execution_time": 3600,
	}))
	const chunk = 20_000_000
	for n := from; n < to; n += chunk {
		err := conn.Exec(ctx, fmt.Sprintf(`
			INSERT INTO events (tenant, id, meter, value, time, dims_key, batch_id, key_hash)
			SELECT concat('tenant-', toString(number %% 1000)), lower(hex(sipHash128(toString(number)))), 'api_calls', 1,
				toDateTime(1767225600 + number %% 2678400), '{"method":"GET"}', 'history', 0
			FROM system.numbers WHERE number >= %d LIMIT %d`, n, min(chunk, to-n)))
		if err != nil {
			b.Fatal(err)
		}
	}
	filledIn := time.Since(start)
	for deadline := time.Now().Add(30 * time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
		var merges uint64
		if err := conn.QueryRow(b.Context(), `SELECT count() FROM system.merges WHERE database = currentDatabase()`).Scan(&merges); err != nil {
			b.Fatal(err)
		}
		if merges == 0 {
			break
		}
	}
	var rows, bytes, parts uint64
	if err := conn.QueryRow(b.Context(), `SELECT sum(rows), sum(bytes_on_disk), count() FROM system.parts
		WHERE database = currentDatabase() AND table = 'events' AND active`).Scan(&rows, &bytes, &parts); err != nil {
		b.Fatal(err)
	}
	b.Logf("history: %d events (%d added in %s, merged after %s), %d parts, %.2f GiB on disk",
		rows, to-from, filledIn.Round(time.Second), time.Since(start).Round(time.Second), parts, float64(bytes)/(1<<30))
}

func benchmarkHistory(b *testing.B, dsn, mode, prefix string, history, events int64, limit, sustain time.Duration) {
	cfg := clickhouse.Config{DSN: dsn}
	if mode == "index" {
		cfg.IndexDir = filepath.Join(b.TempDir(), "index")
		// As the README sizes it: the Bloom filters (10 bits a key) fit.
		cfg.IndexCacheBytes = 256<<20 + (history+events)*3/2
	}
	store, err := clickhouse.New(b.Context(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { store.Close() })
	if mode == "index" {
		// The first write loads the index from the history.
		start := time.Now()
		if _, err := store.Apply(b.Context(), nil); err != nil {
			b.Fatal(err)
		}
		load := time.Since(start)
		b.ReportMetric(load.Seconds(), "index-load-s")
		b.Logf("index: loaded in %s, %.2f GiB on disk", load.Round(time.Millisecond), float64(dirBytes(b, cfg.IndexDir))/(1<<30))
	}
	env := newIdleAggEnv(b, store, nil)
	if sustain > 0 {
		benchmarkSustained(b, env, mode, prefix, sustain)
		return
	}
	const perBatch = 500
	batches := int(events / perBatch)
	publishBacklog(b, env.js, prefix, batches, perBatch)
	b.ResetTimer()
	client, server, serverOK := processCPU(b), time.Duration(0), false
	server, serverOK = chtest.ServerCPU()
	start := time.Now()
	env.start()
	var quarters [4]time.Duration
	deadline := start.Add(limit)
	committed := func() float64 { return metrictest.Value(b, env.reg, "meterd_aggregator_batches_committed_total") }
	for q := range quarters {
		want := float64(batches * (q + 1) / 4)
		for last := time.Now(); committed() < want && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if time.Since(last) >= 10*time.Second {
				last = time.Now()
				b.Logf("%s: %.0f events committed after %s", mode, committed()*perBatch, time.Since(start).Round(time.Second))
			}
		}
		if committed() < want {
			// Too slow to drain within the limit: the rate so far is the
			// figure, and the store is not checked.
			done := committed() * perBatch
			b.ReportMetric(done/time.Since(start).Seconds(), "events/s")
			b.ReportMetric((processCPU(b)-client).Seconds()*50_000/done, "client-cpu-s/50k")
			if now, ok := chtest.ServerCPU(); serverOK && ok {
				b.ReportMetric((now-server).Seconds()*50_000/done, "server-cpu-s/50k")
			}
			b.Logf("%s: drained only %.0f of %d events within %s", mode, done, batches*perBatch, limit)
			return
		}
		quarters[q] = time.Since(start)
	}
	b.StopTimer()
	n := float64(batches * perBatch)
	b.ReportMetric(n/quarters[3].Seconds(), "events/s")
	b.ReportMetric(n/4/quarters[0].Seconds(), "first-quarter-events/s")
	b.ReportMetric(n/4/(quarters[3]-quarters[2]).Seconds(), "last-quarter-events/s")
	b.ReportMetric((processCPU(b)-client).Seconds()*50_000/n, "client-cpu-s/50k")
	if now, ok := chtest.ServerCPU(); serverOK && ok {
		b.ReportMetric((now-server).Seconds()*50_000/n, "server-cpu-s/50k")
	}
	checkCounted(b, store, mode, int64(n))
}

// checkCounted fails b unless the store counts at least n events of the
// benchmark's hour (every event is new: the store counted each once; the
// hour also holds the events of earlier runs).
func checkCounted(b *testing.B, store aggregator.Store, mode string, n int64) {
	var total int64
	incs, err := store.Totals(context.Background(), t0.Add(-time.Hour), t0.Add(2*time.Hour))
	if err != nil {
		b.Fatal(err)
	}
	for _, i := range incs {
		if strings.HasPrefix(i.Tenant, "tenant-") {
			total += i.Events
		}
	}
	if total < n {
		b.Fatalf("%s: the store counts %d events of the %d new", mode, total, n)
	}
}

// benchmarkSustained publishes new events for d, keeping at most 400
// batches (200 000 events) ahead of the aggregator's commits, and reports
// the events committed per second over the whole run and in its first and
// last minute (logging every minute's), with the CPU per 50 000 events.
// Publishing runs in this process too, so its CPU is in the client's.
func benchmarkSustained(b *testing.B, env *aggEnv, mode, prefix string, d time.Duration) {
	const perBatch, ahead = 500, 400
	committed := func() int { return int(metrictest.Value(b, env.reg, "meterd_aggregator_batches_committed_total")) }
	client := processCPU(b)
	server, serverOK := chtest.ServerCPU()
	// Committed batches leave METERD_USAGE as they do beside a running
	// aggregator: its 4 GiB bound holds about 3 minutes at this rate.
	trim, err := aggregator.NewTrimmer(aggregator.TrimmerConfig{NATS: env.nc, Every: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	ctx, stopTrim := context.WithCancel(b.Context())
	trimmed := make(chan error, 1)
	go func() { trimmed <- trim.Run(ctx) }()
	defer func() {
		stopTrim()
		if err := <-trimmed; err != nil && !errors.Is(err, context.Canceled) {
			b.Errorf("trimmer: %v", err)
		}
	}()
	b.ResetTimer()
	start := time.Now()
	env.start()
	events := make([]schemas.Event, perBatch)
	published, minute := 0, 0
	var perMinute []float64
	profile := minuteProfiles(b, prefix)
	defer profile(-1)
	profile(0)
	lastClient, lastServer := client, server
	for time.Since(start) < d {
		if m := int(time.Since(start) / time.Minute); m > minute {
			minute = m
			profile(m)
			perMinute = append(perMinute, float64(committed()*perBatch))
			n := len(perMinute)
			done := perMinute[n-1]
			if n > 1 {
				done -= perMinute[n-2]
			}
			nowClient := processCPU(b)
			nowServer, _ := chtest.ServerCPU()
			b.Logf("%s: minute %d: %.0f events/s, CPU per 50 000 events %.3f s client, %.3f s server", mode, n, done/60,
				(nowClient-lastClient).Seconds()*50_000/done, (nowServer-lastServer).Seconds()*50_000/done)
			lastClient, lastServer = nowClient, nowServer
		}
		if published-committed() >= ahead {
			time.Sleep(2 * time.Millisecond)
			continue
		}
		msgs := make([]*nats.Msg, 0, 64)
		for range 64 {
			msgs = append(msgs, batchMsg(b, prefix, published, events))
			published++
		}
		publishAll(b, env.js, msgs)
	}
	for deadline := time.Now().Add(5 * time.Minute); committed() < published; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			b.Fatalf("%s: %d of %d batches committed 5 minutes after the last publish", mode, committed(), published)
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	n := float64(published * perBatch)
	b.ReportMetric(n/elapsed.Seconds(), "events/s")
	if len(perMinute) >= 2 {
		last := len(perMinute) - 1
		b.ReportMetric(perMinute[0]/60, "first-minute-events/s")
		b.ReportMetric((perMinute[last]-perMinute[last-1])/60, "last-minute-events/s")
	}
	b.ReportMetric((processCPU(b)-client).Seconds()*50_000/n, "client-cpu-s/50k")
	if now, ok := chtest.ServerCPU(); serverOK && ok {
		b.ReportMetric((now-server).Seconds()*50_000/n, "server-cpu-s/50k")
	}
	checkCounted(b, env.store, mode, int64(n))
}

// minuteProfiles returns a function that, given minute m, ends the CPU
// profile of the minute before and starts m's, in
// $METERD_BENCH_PROFILE-<run>m<m>.pprof (m < 0 only ends it); without that
// variable it does nothing.
func minuteProfiles(b *testing.B, run string) func(m int) {
	prefix := os.Getenv("METERD_BENCH_PROFILE")
	var f *os.File
	return func(m int) {
		if prefix == "" {
			return
		}
		if f != nil {
			pprof.StopCPUProfile()
			if err := f.Close(); err != nil {
				b.Error(err)
			}
			f = nil
		}
		if m < 0 {
			return
		}
		var err error
		if f, err = os.Create(fmt.Sprintf("%s-%sm%d.pprof", prefix, run, m)); err != nil {
			b.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
	}
}

// publishBacklog publishes batches of new events whose ids start with
// prefix: the payload of benchmarkAggregator.
func publishBacklog(b *testing.B, js jetstream.JetStream, prefix string, batches, perBatch int) {
	events := make([]schemas.Event, perBatch)
	var pending []*nats.Msg
	for i := range batches {
		pending = append(pending, batchMsg(b, prefix, i, events))
		if len(pending) == 256 || i == batches-1 {
			publishAll(b, js, pending)
			pending = pending[:0]
		}
	}
}

// batchMsg is batch i of len(events) new events (events is its scratch
// space), on the subject of partition i % 16.
func batchMsg(b *testing.B, prefix string, i int, events []schemas.Event) *nats.Msg {
	meters := []string{"api_calls", "tokens", "bytes_out"}
	perBatch := len(events)
	for j := range events {
		n := i*perBatch + j
		events[j] = schemas.Event{
			ID: fmt.Sprintf("%s%012d", prefix, n), Tenant: fmt.Sprintf("tenant-%04d", n%1000),
			Meter: meters[n%3], Value: int64(n%7 + 1), Time: t0.Add(time.Duration(n%3600) * time.Second),
			Dimensions: map[string]string{"route": fmt.Sprintf("/v1/r%d", n%20), "method": "GET", "status": "200"},
		}
	}
	id := fmt.Sprintf("%sbatch-%d", prefix, i)
	data, err := schemas.EncodeBatch(&schemas.Batch{ID: id, Collector: "bench", SealedAt: t0, Events: events})
	if err != nil {
		b.Fatal(err)
	}
	msg := &nats.Msg{Subject: schemas.UsageSubject(i % 16), Data: data, Header: nats.Header{}}
	msg.Header.Set(schemas.HeaderContentType, schemas.BatchContentType)
	msg.Header.Set("Batch-Id", id) // the Nats-Msg-Id of publishAll
	return msg
}

// publishAll publishes msgs asynchronously and again, one by one, those
// whose acknowledgement failed (a server that fsyncs every write falls
// behind a fast publisher, which then stalls): every message of a backlog
// must be in the stream, or the drain waits for it forever.
func publishAll(b *testing.B, js jetstream.JetStream, msgs []*nats.Msg) {
	futures := make([]jetstream.PubAckFuture, len(msgs))
	for i, msg := range msgs {
		f, err := js.PublishMsgAsync(msg, jetstream.WithMsgID(msg.Header.Get("Batch-Id")))
		if err != nil {
			futures[i] = nil
			continue
		}
		futures[i] = f
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(time.Minute):
		b.Fatal("a backlog's publish did not complete within a minute")
	}
	for i, f := range futures {
		if f != nil {
			select {
			case <-f.Ok():
				continue
			case <-f.Err():
			}
		}
		if _, err := js.PublishMsg(context.Background(), msgs[i], jetstream.WithMsgID(msgs[i].Header.Get("Batch-Id"))); err != nil {
			b.Fatal(err)
		}
	}
}

func dirBytes(b *testing.B, dir string) int64 {
	var n int64
	err := filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n += fi.Size()
		}
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	return n
}

var _ aggregator.Store = (*clickhouse.Store)(nil)
