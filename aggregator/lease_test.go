package aggregator_test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/clickhouse"
	"github.com/meterd/meterd/aggregator/sqlite"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/internal/lease"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// oracleLoad publishes batches of 50 events whose ids repeat across batches
// and records the distinct events' totals per tenant.
type oracleLoad struct {
	env       *aggEnv
	mu        sync.Mutex
	want      map[string]int64
	seen      map[string]bool
	published int
}

func newOracleLoad(env *aggEnv) *oracleLoad {
	return &oracleLoad{env: env, want: map[string]int64{}, seen: map[string]bool{}}
}

// publish sends batch b.
func (o *oracleLoad) publish(t testing.TB, b int) {
	var events []schemas.Event
	o.mu.Lock()
	for i := range 50 {
		tenant := fmt.Sprintf("t%d", i%5)
		id := fmt.Sprintf("e%d", (b*50+i)%4000) // repeats across batches
		e := ev(tenant, id, int64(1+i%4), time.Duration(b%90)*time.Minute)
		if !o.seen[tenant+"/"+id] {
			o.seen[tenant+"/"+id] = true
			o.want[tenant] += e.Value
		}
		events = append(events, e)
	}
	o.published++
	o.mu.Unlock()
	o.env.publish(t, fmt.Sprintf("load-%d", b), events...)
}

// run publishes a batch every 10 ms from batch first until stop is called.
func (o *oracleLoad) run(t testing.TB, first int) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for b := first; ctx.Err() == nil; b++ {
			o.publish(t, b)
			time.Sleep(10 * time.Millisecond)
		}
	}()
	return func() { cancel(); <-done }
}

// check compares store's totals with the oracle, and the rollups with the
// raw events.
func (o *oracleLoad) check(t *testing.T, store aggregator.Store) {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	for tenant, v := range o.want {
		got, err := store.Total(t.Context(), tenant, "api_calls", t0.Add(-24*time.Hour), t0.Add(24*time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if got != v {
			t.Errorf("%s: total %d, want %d (the distinct events of %d batches)", tenant, got, v, o.published)
		}
	}
	if n, err := store.Reconcile(t.Context(), t0.Add(-24*time.Hour), t0.Add(24*time.Hour)); err != nil || n != 0 {
		t.Errorf("rollups differ from the raw events: %d rows (%v)", n, err)
	}
}

// waitDrained waits until the durable consumer has nothing pending or
// unacknowledged.
func (env *aggEnv) waitDrained(t testing.TB, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		cons, err := env.js.Consumer(t.Context(), schemas.UsageStream, aggregator.DefaultDurable)
		if err == nil {
			info, err := cons.Info(t.Context())
			if err == nil && info.NumPending == 0 && info.NumAckPending == 0 && info.NumRedelivered == 0 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("consumer not drained within %s", within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The durable consumer deleted under load: the aggregator recreates it
// within seconds, counts the fetch errors, and every event published before
// and after is counted exactly once.
func TestAggregatorRecreatesDeletedConsumer(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t *testing.T) aggregator.Store) {
		env := newAggEnv(t, newStore(t), nil)
		load := newOracleLoad(env)
		stop := load.run(t, 0)
		env.waitCommittedAtLeast(t, 20)
		time.Sleep(1500 * time.Millisecond) // the ack floor was read: the consumer comes back after it
		if err := env.js.DeleteConsumer(t.Context(), schemas.UsageStream, aggregator.DefaultDurable); err != nil {
			t.Fatal(err)
		}
		deleted := time.Now()
		var back time.Duration
		for {
			if _, err := env.js.Consumer(t.Context(), schemas.UsageStream, aggregator.DefaultDurable); err == nil {
				back = time.Since(deleted)
				break
			}
			if time.Since(deleted) > 10*time.Second {
				t.Fatal("the consumer was not recreated within 10 s")
			}
			time.Sleep(5 * time.Millisecond)
		}
		committed := metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total")
		env.waitCommittedAtLeast(t, committed+20) // progress after the recreation
		stop()
		env.waitDrained(t, 30*time.Second)
		load.check(t, env.store)
		if n := metrictest.Value(t, env.reg, "meterd_aggregator_fetch_errors_total"); n < 1 {
			t.Errorf("fetch errors %v, want at least 1", n)
		}
		if err := env.agg.Ready(t.Context()); err != nil {
			t.Errorf("not ready after the recreation: %v", err)
		}
		t.Logf("consumer recreated %s after its deletion; %d batches published", back, load.published)
	})
}

// waitCommittedAtLeast waits until at least n batches were committed.
func (env *aggEnv) waitCommittedAtLeast(t testing.TB, n float64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total") < n {
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %v batches committed within 30 s", n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// While fetches keep failing (the stream itself is gone, so the consumer
// cannot be recreated), /readyz fails within half of StallAfter and says
// why, and the failures are counted.
func TestAggregatorUnreadyWhileFetchFails(t *testing.T) {
	env := newAggEnv(t, openStore(t, "sqlite"), func(c *aggregator.Config) { c.StallAfter = 2 * time.Second })
	env.publish(t, "b1", ev("acme", "e1", 1, 0))
	env.waitCommitted(t, 1, 0)
	if err := env.agg.Ready(t.Context()); err != nil {
		t.Fatalf("not ready before the failure: %v", err)
	}
	if err := env.js.DeleteStream(t.Context(), schemas.UsageStream); err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	for {
		err := env.agg.Ready(t.Context())
		if err != nil {
			if !strings.Contains(err.Error(), "fetch") {
				t.Errorf("readiness error %q does not name the failing fetch", err)
			}
			if d := time.Since(deleted); d > 2*time.Second {
				t.Errorf("unready %s after fetches started failing, want within StallAfter/2 = 1 s (and a poll)", d)
			}
			break
		}
		if time.Since(deleted) > 5*time.Second {
			t.Fatal("still ready 5 s after fetches started failing")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := metrictest.Value(t, env.reg, "meterd_aggregator_fetch_errors_total"); n < 1 {
		t.Errorf("fetch errors %v, want at least 1", n)
	}
}

// openPair opens two stores of the named kind on the same database, as two
// processes would.
func openPair(t *testing.T, kind string) (aggregator.Store, aggregator.Store, aggregator.Store) {
	t.Helper()
	var open func() aggregator.Store
	switch kind {
	case "sqlite":
		path := filepath.Join(t.TempDir(), "meterd.db")
		open = func() aggregator.Store {
			st, err := sqlite.New(sqlite.Config{Path: path})
			if err != nil {
				t.Fatal(err)
			}
			return st
		}
	case "clickhouse":
		dsn := chtest.DSN(t)
		open = func() aggregator.Store {
			st, err := clickhouse.New(t.Context(), clickhouse.Config{DSN: dsn, IndexDir: t.TempDir()}) // an index of its own, as a pod has
			if err != nil {
				t.Fatal(err)
			}
			return st
		}
	}
	a, b, reader := open(), open(), open()
	t.Cleanup(func() { a.Close(); b.Close(); reader.Close() })
	return a, b, reader
}

// peer is one more aggregator on an aggEnv's JetStream.
type peer struct {
	agg  *aggregator.Aggregator
	reg  *prometheus.Registry
	stop func() // cancels Run and waits for it
}

const testLeaseDuration = 2 * time.Second

// startPeer runs an aggregator into store on env's JetStream with a lease
// of holder (wrapped by wrap, if not nil).
func (env *aggEnv) startPeer(t *testing.T, holder string, store aggregator.Store, wrap func(aggregator.Lease) aggregator.Lease) *peer {
	t.Helper()
	l, err := lease.New(t.Context(), lease.Config{JS: env.js, Key: "aggregator.test.all", Holder: holder, Duration: testLeaseDuration})
	if err != nil {
		t.Fatal(err)
	}
	var al aggregator.Lease = l
	if wrap != nil {
		al = wrap(l)
	}
	p := &peer{reg: prometheus.NewRegistry()}
	p.agg, err = aggregator.New(aggregator.Config{NATS: env.nc, Store: store, FetchWait: 20 * time.Millisecond,
		AckWait: 2 * time.Second, Lease: al, Registerer: p.reg})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.agg.Run(ctx) }()
	var once sync.Once
	p.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("%s: Run: %v", holder, err)
			}
		})
	}
	t.Cleanup(p.stop)
	return p
}

func (p *peer) writer(t testing.TB) bool {
	return metrictest.Value(t, p.reg, "meterd_aggregator_writer_leases") == 1
}

// writeLog records when each successful Apply of a store returned.
type writeLog struct {
	aggregator.Store
	mu    sync.Mutex
	times []time.Time
}

func (w *writeLog) Apply(ctx context.Context, batches []*schemas.Batch) ([]aggregator.Increment, error) {
	incs, err := w.Store.Apply(ctx, batches)
	if err == nil {
		w.mu.Lock()
		w.times = append(w.times, time.Now())
		w.mu.Unlock()
	}
	return incs, err
}

func (w *writeLog) WriterChanged() {
	if wc, ok := w.Store.(interface{ WriterChanged() }); ok {
		wc.WriterChanged()
	}
}

func (w *writeLog) writes() []time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]time.Time(nil), w.times...)
}

func waitWriter(t *testing.T, p *peer, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for !p.writer(t) {
		if time.Since(start) > within {
			t.Fatalf("no writer lease within %s", within)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// Two aggregators on the same store and stream: the second waits for the
// lease, writes nothing while the first runs, takes over when it stops, and
// the totals are exact.
func TestTwoAggregatorsOneWriter(t *testing.T) {
	for _, kind := range []string{"sqlite", "clickhouse"} {
		t.Run(kind, func(t *testing.T) {
			stA, stB, reader := openPair(t, kind)
			env := newIdleAggEnv(t, reader, nil)
			logA, logB := &writeLog{Store: stA}, &writeLog{Store: stB}
			a := env.startPeer(t, "a", logA, nil)
			waitWriter(t, a, 5*time.Second)
			b := env.startPeer(t, "b", logB, nil)
			load := newOracleLoad(env)
			stopLoad := load.run(t, 0)
			time.Sleep(2 * testLeaseDuration) // longer than a lease: b must still wait
			if b.writer(t) {
				t.Fatal("b holds the lease while a runs")
			}
			if err := b.agg.Ready(t.Context()); err != nil {
				t.Errorf("the standby is not ready: %v", err)
			}
			if n := metrictest.Value(t, a.reg, "meterd_aggregator_batches_committed_total"); n < 10 {
				t.Fatalf("a committed %v batches", n)
			}
			a.stop()
			stopped := time.Now()
			// A clean stop releases the lease: b takes over at its next poll.
			if d := waitWriter(t, b, 5*time.Second); d > testLeaseDuration {
				t.Errorf("b took over %s after a released the lease", d)
			}
			time.Sleep(testLeaseDuration)
			stopLoad()
			env.waitDrained(t, 30*time.Second)
			load.check(t, reader)
			wa, wb := logA.writes(), logB.writes()
			if len(wb) == 0 {
				t.Fatal("b never wrote")
			}
			if wb[0].Before(stopped) {
				t.Errorf("b wrote at %s, before a stopped at %s", wb[0].Format(time.StampMicro), stopped.Format(time.StampMicro))
			}
			t.Logf("%d batches; a wrote %d times, b %d times", load.published, len(wa), len(wb))
		})
	}
}

// frozen simulates SIGSTOP of one aggregator: from its next write on, its
// store calls and lease renewals block until wake, and the write then runs
// with the deadline it had but a context whose timer has not fired, as in a
// process that just woke.
type frozen struct {
	aggregator.Store
	freezeNext atomic.Bool
	frozenAt   atomic.Int64
	wake       chan struct{}
	// woke counts writes that reached the real store after the wake, and
	// landed those that succeeded.
	woke, landed atomic.Int64
}

func (z *frozen) isFrozen() bool { return z.frozenAt.Load() != 0 }

func (z *frozen) Apply(ctx context.Context, batches []*schemas.Batch) ([]aggregator.Increment, error) {
	if z.freezeNext.CompareAndSwap(true, false) {
		z.frozenAt.Store(time.Now().UnixNano())
		<-z.wake
		z.woke.Add(1)
		d, ok := ctx.Deadline()
		incs, err := z.Store.Apply(stillCtx{Context: context.WithoutCancel(ctx), deadline: d, ok: ok}, batches)
		if err == nil {
			z.landed.Add(1)
		}
		return incs, err
	}
	return z.Store.Apply(ctx, batches)
}

func (z *frozen) WriterChanged() {
	if wc, ok := z.Store.(interface{ WriterChanged() }); ok {
		wc.WriterChanged()
	}
}

// stillCtx has a deadline but was never cancelled.
type stillCtx struct {
	context.Context
	deadline time.Time
	ok       bool
}

func (c stillCtx) Deadline() (time.Time, bool) { return c.deadline, c.ok }

// frozenLease blocks renewals while z is frozen.
type frozenLease struct {
	aggregator.Lease
	z *frozen
}

func (l frozenLease) Renew(ctx context.Context) (time.Time, error) {
	if l.z.isFrozen() {
		select {
		case <-l.z.wake:
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
	return l.Lease.Renew(ctx)
}

// The lease holder frozen in the middle of a write, past its lease: the
// standby takes over within the lease, the zombie's write is refused when it
// wakes, it stops consuming, and every event counts once.
func TestZombieAggregatorCannotWrite(t *testing.T) {
	for _, kind := range []string{"sqlite", "clickhouse"} {
		t.Run(kind, func(t *testing.T) {
			stA, stB, reader := openPair(t, kind)
			env := newIdleAggEnv(t, reader, nil)
			z := &frozen{Store: stA, wake: make(chan struct{})}
			a := env.startPeer(t, "a", z, func(l aggregator.Lease) aggregator.Lease { return frozenLease{l, z} })
			waitWriter(t, a, 5*time.Second)
			b := env.startPeer(t, "b", stB, nil)
			load := newOracleLoad(env)
			stopLoad := load.run(t, 0)
			time.Sleep(500 * time.Millisecond)
			z.freezeNext.Store(true)
			for !z.isFrozen() {
				time.Sleep(time.Millisecond)
			}
			frozenAt := time.Unix(0, z.frozenAt.Load())
			waitWriter(t, b, 3*testLeaseDuration)
			takeover := time.Since(frozenAt)
			if takeover > testLeaseDuration+testLeaseDuration/2 {
				t.Errorf("b took over %s after a froze, want within the lease (%s) and a poll", takeover, testLeaseDuration)
			}
			committedB := metrictest.Value(t, b.reg, "meterd_aggregator_batches_committed_total")
			for metrictest.Value(t, b.reg, "meterd_aggregator_batches_committed_total") < committedB+10 {
				time.Sleep(5 * time.Millisecond)
			}
			close(z.wake) // SIGCONT
			deadline := time.Now().Add(10 * time.Second)
			for z.woke.Load() == 0 || a.writer(t) || metrictest.Value(t, a.reg, "meterd_aggregator_lease_lost_total") != 1 {
				if time.Now().After(deadline) {
					t.Fatalf("a after waking: %d writes, writer %v, lost %v", z.woke.Load(), a.writer(t), metrictest.Value(t, a.reg, "meterd_aggregator_lease_lost_total"))
				}
				time.Sleep(5 * time.Millisecond)
			}
			if n := z.landed.Load(); n != 0 {
				t.Errorf("the zombie's write landed after it woke (%d)", n)
			}
			time.Sleep(testLeaseDuration)
			if a.writer(t) || !b.writer(t) {
				t.Errorf("after the wake a writer %v, b writer %v; want b alone", a.writer(t), b.writer(t))
			}
			stopLoad()
			env.waitDrained(t, 30*time.Second)
			load.check(t, reader)
			t.Logf("%d batches; b took over %s after a froze", load.published, takeover.Round(time.Millisecond))
		})
	}
}

// A store write whose deadline passed on the clock is refused even when its
// context was never cancelled (a process that just woke), on both stores.
func TestStoresRefuseWritesPastTheirDeadline(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t *testing.T) aggregator.Store) {
		st := newStore(t)
		ctx := stillCtx{Context: t.Context(), deadline: time.Now().Add(-time.Millisecond), ok: true}
		_, err := st.Apply(ctx, []*schemas.Batch{{ID: "b1", Events: []schemas.Event{ev("acme", "e1", 5, 0)}}})
		// SQLite refuses to commit; the ClickHouse client also gives up at
		// once on its connection's deadline.
		if err == nil {
			t.Fatal("Apply past its deadline succeeded")
		}
		if got, err := st.Total(t.Context(), "acme", "api_calls", t0, t0.Add(time.Hour)); err != nil || got != 0 {
			t.Fatalf("total %d (%v) after a refused write, want 0", got, err)
		}
		if _, err := st.Apply(t.Context(), []*schemas.Batch{{ID: "b1", Events: []schemas.Event{ev("acme", "e1", 5, 0)}}}); err != nil {
			t.Fatal(err)
		}
		if got := mustTotal(t, st, "acme"); got != 5 {
			t.Fatalf("total %d after the retry, want 5", got)
		}
	})
}

func mustTotal(t *testing.T, st aggregator.Store, tenant string) int64 {
	t.Helper()
	v, err := st.Total(t.Context(), tenant, "api_calls", t0.Add(-24*time.Hour), t0.Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// gatedStore holds every Apply until its gate is closed.
type gatedStore struct {
	aggregator.Store
	gate chan struct{}
}

func (s gatedStore) Apply(ctx context.Context, batches []*schemas.Batch) ([]aggregator.Increment, error) {
	<-s.gate
	return s.Store.Apply(ctx, batches)
}

// Fetches that keep failing with the stream intact (the durable replaced
// by a push consumer of the same name, which a pull cannot read): the
// consumer lag counts the batches stored after the last one fetched instead
// of reading 0, /readyz fails and names the fetch.
func TestAggregatorLagWhileFetchFails(t *testing.T) {
	store := gatedStore{openStore(t, "sqlite"), make(chan struct{})}
	env := newAggEnv(t, store, func(c *aggregator.Config) { c.StallAfter = 2 * time.Second; c.FetchBatch = 1; c.CatchUpBatch = 1 })
	var open sync.Once
	release := func() { open.Do(func() { close(store.gate) }) }
	t.Cleanup(release)
	// The first flush waits at the gate, the second group waits in the
	// channel to the writer, and the reader with the third behind them, so
	// the consumer can be replaced before the next fetch.
	for i := range 3 {
		env.publish(t, fmt.Sprintf("b%d", i), ev("acme", fmt.Sprintf("e%d", i), 1, 0))
	}
	time.Sleep(300 * time.Millisecond)
	if err := env.js.DeleteConsumer(t.Context(), schemas.UsageStream, aggregator.DefaultDurable); err != nil {
		t.Fatal(err)
	}
	if _, err := env.js.CreateOrUpdatePushConsumer(t.Context(), schemas.UsageStream, jetstream.ConsumerConfig{
		Durable: aggregator.DefaultDurable, DeliverSubject: "elsewhere", AckPolicy: jetstream.AckExplicitPolicy,
	}); err != nil {
		t.Fatal(err)
	}
	for i := 3; i < 13; i++ {
		env.publish(t, fmt.Sprintf("b%d", i), ev("acme", fmt.Sprintf("e%d", i), 1, 0))
	}
	release()
	deadline := time.Now().Add(5 * time.Second)
	var err error
	for err = env.agg.Ready(t.Context()); err == nil; err = env.agg.Ready(t.Context()) {
		if time.Now().After(deadline) {
			t.Fatal("still ready 5 s after fetches started failing")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(err.Error(), "fetch failing") {
		t.Errorf("readiness error %q does not name the failing fetch", err)
	}
	// b0 to b2 were fetched; the 10 behind them were not.
	if lag := metrictest.Value(t, env.reg, "meterd_aggregator_consumer_lag_messages"); lag != 10 {
		t.Errorf("consumer lag %v messages while fetches fail, want 10", lag)
	}
	if n := metrictest.Value(t, env.reg, "meterd_aggregator_fetch_errors_total"); n < 1 {
		t.Errorf("fetch errors %v, want at least 1", n)
	}
}

// slowPrepare is a store whose preparation takes longer than the lease (a
// dedup index rebuilt at a billion events takes minutes).
type slowPrepare struct {
	aggregator.Store
	took        time.Duration
	calls       atomic.Int32
	hadDeadline atomic.Bool
}

func (s *slowPrepare) Prepare(ctx context.Context) error {
	s.calls.Add(1)
	if _, ok := ctx.Deadline(); ok {
		s.hadDeadline.Store(true)
	}
	select {
	case <-time.After(s.took):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// A store's preparation that outlasts the lease (three lease durations)
// runs once, without a write's deadline, while the lease is renewed; the
// aggregator then writes and counts every event once. Bounded by a write's
// deadline, the same work could never finish: the writer lost its lease at
// each try and started over.
func TestPreparationLongerThanTheLease(t *testing.T) {
	store := &slowPrepare{Store: openStore(t, "sqlite"), took: 3 * testLeaseDuration}
	env := newIdleAggEnv(t, store.Store, nil)
	o := newOracleLoad(env)
	for b := range 20 {
		o.publish(t, b)
	}
	p := env.startPeer(t, "slow", store, nil)
	waitWriter(t, p, 10*time.Second)
	start := time.Now()
	for metrictest.Value(t, p.reg, "meterd_aggregator_batches_committed_total") < 20 {
		if time.Since(start) > 30*time.Second {
			t.Fatalf("%v of 20 batches committed 30 s after the lease was taken (preparation: %d calls)",
				metrictest.Value(t, p.reg, "meterd_aggregator_batches_committed_total"), store.calls.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := store.calls.Load(); n != 1 {
		t.Errorf("Prepare called %d times, want once (the lease was kept while it ran)", n)
	}
	if store.hadDeadline.Load() {
		t.Error("Prepare ran with a deadline")
	}
	if n := metrictest.Value(t, p.reg, "meterd_aggregator_lease_lost_total"); n != 0 {
		t.Errorf("the lease was lost %v times during the preparation", n)
	}
	p.stop()
	o.check(t, store.Store)
}
