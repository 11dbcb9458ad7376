package aggregator_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/clickhouse"
	"github.com/meterd/meterd/aggregator/sqlite"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

func TestMain(m *testing.M) { chtest.Main(m) }

// stores runs fn once per store implementation.
func stores(t *testing.T, fn func(t *testing.T, newStore func(t *testing.T) aggregator.Store)) {
	for _, name := range []string{"sqlite", "clickhouse"} {
		t.Run(name, func(t *testing.T) {
			fn(t, func(t *testing.T) aggregator.Store { return openStore(t, name) })
		})
	}
}

// openStore opens an empty store of the named kind, closed at cleanup.
func openStore(tb testing.TB, name string) aggregator.Store {
	tb.Helper()
	var st aggregator.Store
	var err error
	switch name {
	case "sqlite":
		st, err = sqlite.New(sqlite.Config{Path: filepath.Join(tb.TempDir(), "meterd.db")})
	case "clickhouse":
		st, err = clickhouse.New(context.Background(), clickhouse.Config{DSN: chtest.DSN(tb), IndexDir: tb.TempDir()}) // as the aggregator runs it
	default:
		tb.Fatalf("unknown store %q", name)
	}
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { st.Close() })
	return st
}

// aggEnv is an aggregator on a real embedded JetStream.
type aggEnv struct {
	nc    *nats.Conn
	js    jetstream.JetStream
	agg   *aggregator.Aggregator
	reg   *prometheus.Registry
	store aggregator.Store

	start   func() // runs the aggregator until cleanup
	done    chan error
	running bool

	mu        sync.Mutex
	committed map[string]int64 // tenant/meter → sum of published increments
}

// newAggEnv starts an aggregator into store on a fresh JetStream.
func newAggEnv(t testing.TB, store aggregator.Store, mutate func(*aggregator.Config)) *aggEnv {
	t.Helper()
	env := newIdleAggEnv(t, store, mutate)
	env.start()
	return env
}

// newIdleAggEnv is newAggEnv without starting the aggregator: call start.
func newIdleAggEnv(t testing.TB, store aggregator.Store, mutate func(*aggregator.Config)) *aggEnv {
	t.Helper()
	ns := jstest.Start(t, jstest.Config{Streams: true})
	nc, js := ns.Conn(), ns.JetStream()
	env := &aggEnv{nc: nc, js: js, reg: prometheus.NewRegistry(), store: store, committed: map[string]int64{}}
	sub, err := nc.Subscribe(schemas.CommittedSubjectPrefix+"*", func(m *nats.Msg) {
		c, err := schemas.DecodeCommitted(m.Data) // as the enforcer reads it
		if err != nil {
			t.Errorf("committed message: %v", err)
			return
		}
		env.mu.Lock()
		env.committed[c.Tenant+"/"+c.Meter] += c.Value
		env.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Unsubscribe() })
	cfg := aggregator.Config{NATS: nc, Store: store, FetchWait: 20 * time.Millisecond, Registerer: env.reg}
	if mutate != nil {
		mutate(&cfg)
	}
	agg, err := aggregator.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	env.agg = agg
	ctx, cancel := context.WithCancel(context.Background())
	env.done = make(chan error, 1)
	env.start = func() {
		env.running = true
		go func() { env.done <- agg.Run(ctx) }()
	}
	t.Cleanup(func() {
		cancel()
		if env.running {
			if err := <-env.done; err != nil {
				t.Errorf("Run: %v", err)
			}
		}
	})
	return env
}

var t0 = time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC)

func ev(tenant, id string, value int64, at time.Duration) schemas.Event {
	return schemas.Event{ID: id, Tenant: tenant, Meter: "api_calls", Value: value, Time: t0.Add(at)}
}

// publish sends a batch with msgID as Nats-Msg-Id.
func (env *aggEnv) publish(t testing.TB, msgID string, events ...schemas.Event) {
	t.Helper()
	b := &schemas.Batch{ID: msgID, Collector: "test", SealedAt: t0, Events: events}
	data, err := schemas.EncodeBatch(b)
	if err != nil {
		t.Fatal(err)
	}
	env.publishRaw(t, msgID, schemas.BatchContentType, data)
}

func (env *aggEnv) publishRaw(t testing.TB, msgID, contentType string, data []byte) {
	t.Helper()
	msg := &nats.Msg{Subject: schemas.UsageSubject(0), Data: data, Header: nats.Header{}}
	msg.Header.Set(schemas.HeaderContentType, contentType)
	if _, err := env.js.PublishMsg(context.Background(), msg, jetstream.WithMsgID(msgID)); err != nil {
		t.Fatal(err)
	}
}

// waitCommitted waits until n batches were committed or dead-lettered, for
// 20 s and 20 ms per batch at most.
func (env *aggEnv) waitCommitted(t testing.TB, batches, deadLettered float64) {
	t.Helper()
	deadline := time.Now().Add(20*time.Second + time.Duration(batches+deadLettered)*20*time.Millisecond)
	for time.Now().Before(deadline) {
		b := metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total")
		d := metrictest.Value(t, env.reg, "meterd_aggregator_dead_lettered_total")
		if b >= batches && d >= deadLettered {
			if b != batches || d != deadLettered {
				t.Fatalf("committed %v batches and dead-lettered %v, want %v and %v", b, d, batches, deadLettered)
			}
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out: committed %v batches, dead-lettered %v; want %v and %v",
		metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total"), metrictest.Value(t, env.reg, "meterd_aggregator_dead_lettered_total"), batches, deadLettered)
}

func (env *aggEnv) total(t *testing.T, tenant string) int64 {
	t.Helper()
	v, err := env.store.Total(t.Context(), tenant, "api_calls", t0.Add(-24*time.Hour), t0.Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestAggregatorExactlyOnce(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t *testing.T) aggregator.Store) {
		env := newAggEnv(t, newStore(t), nil)
		env.publish(t, "b1", ev("acme", "e1", 5, 0), ev("acme", "e2", 7, time.Hour), ev("globex", "e1", 100, 0))
		// A retried client event (same tenant and id) in a later batch.
		env.publish(t, "b2", ev("acme", "e1", 5, 0), ev("acme", "e3", 1, 2*time.Hour))
		// The same batch again under another message id: past the
		// duplicate window JetStream no longer drops it.
		env.publish(t, "b1-replayed-after-window", ev("acme", "e1", 5, 0), ev("acme", "e2", 7, time.Hour), ev("globex", "e1", 100, 0))
		env.waitCommitted(t, 3, 0)
		if got := env.total(t, "acme"); got != 13 {
			t.Fatalf("acme total %d, want 13", got)
		}
		if got := env.total(t, "globex"); got != 100 {
			t.Fatalf("globex total %d, want 100", got)
		}
		if got := metrictest.Value(t, env.reg, "meterd_aggregator_events_duplicate_total"); got != 4 {
			t.Fatalf("duplicates %v, want 4", got)
		}
		waitFor(t, func() bool {
			env.mu.Lock()
			defer env.mu.Unlock()
			return env.committed["acme/api_calls"] == 13 && env.committed["globex/api_calls"] == 100
		}, "committed increments acme 13 and globex 100: %v", env.committed)
	})
}

// A poison message among good ones goes to the DLQ with its reason and does
// not hold up the ones behind it.
func TestAggregatorPoisonToDLQ(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t *testing.T) aggregator.Store) {
		env := newAggEnv(t, newStore(t), nil)
		start := time.Now()
		env.publish(t, "good-1", ev("acme", "p1", 1, 0))
		env.publishRaw(t, "poison-type", "application/x-unknown", []byte(`whatever`))
		env.publishRaw(t, "poison-json", schemas.BatchContentType, []byte(`{"batch_id":"x","events":[{`))
		env.publish(t, "poison-event", schemas.Event{ID: "p9", Tenant: "acme", Meter: "Bad Meter", Value: 1, Time: t0})
		env.publish(t, "good-2", ev("acme", "p2", 2, 0))
		env.waitCommitted(t, 2, 3)
		if elapsed := time.Since(start); elapsed > 5*time.Second {
			t.Fatalf("good batches took %s behind the poison ones", elapsed)
		}
		if got := env.total(t, "acme"); got != 3 {
			t.Fatalf("acme total %d, want 3", got)
		}
		cons, err := env.js.OrderedConsumer(t.Context(), schemas.DLQStream, jetstream.OrderedConsumerConfig{})
		if err != nil {
			t.Fatal(err)
		}
		reasons := map[string]string{}
		for range 3 {
			m, err := cons.Next(jetstream.FetchMaxWait(2 * time.Second))
			if err != nil {
				t.Fatal(err)
			}
			reasons[m.Headers().Get(schemas.HeaderDLQStreamSeq)] = m.Headers().Get(schemas.HeaderDLQReason)
		}
		if len(reasons) != 3 {
			t.Fatalf("DLQ: %v", reasons)
		}
		for k, r := range reasons {
			if r == "" {
				t.Fatalf("DLQ message %q without a reason", k)
			}
		}
		info, err := env.js.Stream(t.Context(), schemas.DLQStream)
		if err != nil {
			t.Fatal(err)
		}
		if n := info.CachedInfo().State.Msgs; n != 3 {
			t.Fatalf("DLQ holds %d messages, want 3", n)
		}
	})
}

// Many batches with random repeats: the store's totals equal the oracle of
// distinct events.
func TestAggregatorOracle(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t *testing.T) aggregator.Store) {
		env := newAggEnv(t, newStore(t), func(c *aggregator.Config) { c.FetchBatch = 7 })
		want := map[string]int64{}
		seen := map[string]bool{}
		const batches = 60
		for b := range batches {
			var events []schemas.Event
			for i := range 50 {
				tenant := fmt.Sprintf("t%d", (b+i)%5)
				id := fmt.Sprintf("e%d", (b*50+i)%1700) // ids repeat across batches
				e := ev(tenant, id, int64(i%4), time.Duration(i)*time.Minute)
				if !seen[tenant+"/"+id] {
					seen[tenant+"/"+id] = true
					want[tenant] += e.Value
				}
				events = append(events, e)
			}
			env.publish(t, fmt.Sprintf("batch-%d", b), events...)
		}
		env.waitCommitted(t, batches, 0)
		for tenant, v := range want {
			if got := env.total(t, tenant); got != v {
				t.Errorf("%s: total %d, want %d", tenant, got, v)
			}
		}
	})
}

func waitFor(t *testing.T, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out: "+format, args...)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// recordingStore records the batch ids of every successful Apply.
type recordingStore struct {
	aggregator.Store
	mu     sync.Mutex
	groups [][]string
}

func (s *recordingStore) Apply(ctx context.Context, batches []*schemas.Batch) ([]aggregator.Increment, error) {
	incs, err := s.Store.Apply(ctx, batches)
	if err == nil {
		ids := make([]string, len(batches))
		for i, b := range batches {
			ids[i] = b.ID
		}
		s.mu.Lock()
		s.groups = append(s.groups, ids)
		s.mu.Unlock()
	}
	return incs, err
}

// A backlog is written in flushes of CatchUpBatch until less than that
// waits, then in flushes of FetchBatch, in the order of the stream.
func TestAggregatorCatchesUp(t *testing.T) {
	store := &recordingStore{Store: openStore(t, "sqlite")}
	env := newIdleAggEnv(t, store, func(c *aggregator.Config) { c.FetchBatch, c.CatchUpBatch = 4, 40 })
	const batches = 150
	for i := range batches {
		env.publish(t, fmt.Sprintf("b%03d", i), ev("acme", fmt.Sprintf("e%d", i), 1, 0))
	}
	env.start()
	env.waitCommitted(t, batches, 0)
	store.mu.Lock()
	defer store.mu.Unlock()
	var order []string
	sizes := map[int]int{}
	for _, g := range store.groups {
		order = append(order, g...)
		sizes[len(g)]++
	}
	if !slices.IsSorted(order) || len(order) != batches {
		t.Errorf("batches written in the order %v", order)
	}
	// The first fetch knows of no backlog; 146 wait after it: 40, 40, 40
	// (26 wait), then flushes of 4 at most.
	if sizes[40] != 3 || len(store.groups) < 3+26/4 {
		t.Errorf("flush sizes %v (count of flushes by size), want 3 of 40 and the rest of 4 at most", sizes)
	}
	for n := range sizes {
		if n != 40 && n > 4 {
			t.Errorf("flush sizes %v: a flush of %d", sizes, n)
		}
	}
	if got := env.total(t, "acme"); got != batches {
		t.Errorf("acme total %d, want %d", got, batches)
	}
}
