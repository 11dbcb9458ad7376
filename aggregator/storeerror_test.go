package aggregator_test

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/nats-io/nats.go/jetstream"

	chstore "github.com/meterd/meterd/aggregator/clickhouse"
	"github.com/meterd/meterd/aggregator/sqlite"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// load publishes batches of 50 events (with repeats across batches) every
// 20 ms until stop, and keeps the oracle: the distinct events published.
type load struct {
	env  *aggEnv
	mu   sync.Mutex
	want map[string]int64 // tenant → sum of distinct events
	seen map[string]bool
	sent int // batches published (acknowledged by JetStream)

	stop func()
	done chan struct{}
}

func startLoad(t *testing.T, env *aggEnv, name string) *load {
	l := &load{env: env, want: map[string]int64{}, seen: map[string]bool{}, done: make(chan struct{})}
	ctx, cancel := context.WithCancel(t.Context())
	l.stop = func() { cancel(); <-l.done }
	go func() {
		defer close(l.done)
		for b := 0; ctx.Err() == nil; b++ {
			var events []schemas.Event
			for i := range 50 {
				tenant := fmt.Sprintf("t%d", i%5)
				id := fmt.Sprintf("e%d", (b*50+i)%4000)
				events = append(events, ev(tenant, id, int64(1+i%7), time.Duration(b%48)*time.Minute))
			}
			env.publish(t, fmt.Sprintf("%s-%d", name, b), events...)
			l.mu.Lock()
			for _, e := range events {
				if k := e.Tenant + "/" + e.ID; !l.seen[k] {
					l.seen[k] = true
					l.want[e.Tenant] += e.Value
				}
			}
			l.sent++
			l.mu.Unlock()
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return l
}

// check stops the load, waits until every batch sent is committed and
// compares the store's totals with the oracle: every event counted exactly
// once, nothing dead-lettered, the DLQ empty, the aggregator ready again.
func (l *load) check(t *testing.T) {
	t.Helper()
	l.stop()
	l.mu.Lock()
	sent := float64(l.sent)
	l.mu.Unlock()
	env := l.env
	env.waitCommitted(t, sent, 0)
	for tenant, v := range l.want {
		if got := env.total(t, tenant); got != v {
			t.Errorf("%s: total %d, want %d", tenant, got, v)
		}
	}
	info, err := env.js.Stream(t.Context(), schemas.DLQStream)
	if err != nil {
		t.Fatal(err)
	}
	if n := info.CachedInfo().State.Msgs; n != 0 {
		t.Fatalf("DLQ holds %d messages after a store outage", n)
	}
	waitFor(t, func() bool { return env.agg.Ready(t.Context()) == nil }, "not ready after the store came back")
	if got := metrictest.Value(t, env.reg, "meterd_aggregator_store_failing_seconds"); got != 0 {
		t.Fatalf("store_failing_seconds %v after the store came back", got)
	}
}

// ClickHouse loses its events table for 4 s (DETACH TABLE) under load while
// its server answers pings: the aggregator retries, /readyz fails meanwhile,
// and afterwards every event is counted exactly once and nothing is in the
// DLQ. Before, "ping works" meant "the batch is bad": 12 batches were
// dead-lettered by such an outage.
func TestAggregatorClickHouseTableDetached(t *testing.T) {
	dsn := chtest.DSN(t)
	store, err := chstore.New(t.Context(), chstore.Config{DSN: dsn})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	opts, err := clickhouse.ParseDSN(dsn)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := clickhouse.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Close() })
	env := newAggEnv(t, store, nil)
	l := startLoad(t, env, "detach")
	waitFor(t, func() bool { return metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total") >= 10 }, "nothing committed before the outage")

	if err := admin.Exec(t.Context(), "DETACH TABLE events"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return env.agg.Ready(t.Context()) != nil }, "ready while the events table is detached")
	time.Sleep(4 * time.Second)
	if f := metrictest.Value(t, env.reg, "meterd_aggregator_store_failing_seconds"); f < 1 {
		t.Errorf("store_failing_seconds %v during the outage", f)
	}
	if err := admin.Exec(t.Context(), "ATTACH TABLE events"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // load goes on after the table is back
	l.check(t)
	if errs := metrictest.Value(t, env.reg, "meterd_aggregator_store_write_errors_total"); errs < 3 {
		t.Fatalf("%v store errors: the outage did not bite", errs)
	}
}

// Another connection holds SQLite's write lock for 35 s, longer than the
// busy timeout (10 s) three times over: every write of the aggregator fails
// with SQLITE_BUSY meanwhile. Before, three such failures with a working
// ping dead-lettered the batch (10 of 800 events lost to a 65 s lock); now
// the writes are retried until the lock is gone and every event is counted
// exactly once.
func TestAggregatorSQLiteWriteLocked(t *testing.T) {
	if testing.Short() {
		t.Skip("a 35 s lock")
	}
	path := filepath.Join(t.TempDir(), "meterd.db")
	store, err := sqlite.New(sqlite.Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	env := newAggEnv(t, store, nil)
	l := startLoad(t, env, "lock")
	waitFor(t, func() bool { return metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total") >= 10 }, "nothing committed before the lock")

	// The aggregator writes all the while: wait for its transaction to end
	// instead of failing on SQLITE_BUSY ourselves.
	other, err := sql.Open("sqlite", path+"?_pragma=busy_timeout(30000)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	conn, err := other.Conn(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ExecContext(t.Context(), "BEGIN EXCLUSIVE"); err != nil {
		t.Fatal(err)
	}
	locked := time.Now()
	// The first write gives up after the busy timeout (10 s).
	for env.agg.Ready(t.Context()) == nil {
		if time.Since(locked) > 20*time.Second {
			t.Fatal("ready while the database is locked")
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(35*time.Second - time.Since(locked))
	if errs := metrictest.Value(t, env.reg, "meterd_aggregator_store_write_errors_total"); errs < 3 {
		t.Fatalf("%v store errors in 35 s: the lock did not bite", errs)
	}
	if _, err := conn.ExecContext(t.Context(), "ROLLBACK"); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	time.Sleep(time.Second)
	l.check(t)
}

// A valid batch delivered more often than the old MaxDeliver bound (a store
// outage across many aggregator restarts) is counted, not dead-lettered, and
// a durable created with that bound loses it.
func TestAggregatorRedeliveredManyTimes(t *testing.T) {
	env := newIdleAggEnv(t, openStore(t, "sqlite"), nil)
	env.publish(t, "often", ev("acme", "o1", 4, 0), ev("acme", "o2", 5, 0))
	cfg := env.agg.ConsumerConfig()
	if cfg.MaxDeliver != -1 {
		t.Fatalf("consumer MaxDeliver %d, want -1 (unlimited)", cfg.MaxDeliver)
	}
	cfg.MaxDeliver = 11 // the durable as the previous release created it
	cons, err := env.js.CreateOrUpdateConsumer(t.Context(), schemas.UsageStream, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for range 10 {
		m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			t.Fatal(err)
		}
		m.Nak()
	}
	env.start()
	env.waitCommitted(t, 1, 0)
	if got := env.total(t, "acme"); got != 9 {
		t.Fatalf("acme total %d, want 9", got)
	}
	info, err := cons.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if info.Config.MaxDeliver != -1 {
		t.Fatalf("the durable kept MaxDeliver %d", info.Config.MaxDeliver)
	}
}
