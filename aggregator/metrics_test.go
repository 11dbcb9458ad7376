package aggregator_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// Every metric the aggregator and its reconciler export follows the naming
// rules.
func TestMetricNames(t *testing.T) {
	env := newAggEnv(t, openStore(t, "sqlite"), nil)
	if _, err := aggregator.NewReconciler(aggregator.ReconcilerConfig{Store: env.store, Registerer: env.reg}); err != nil {
		t.Fatal(err)
	}
	trim, err := aggregator.NewTrimmer(aggregator.TrimmerConfig{NATS: env.nc, Registerer: env.reg})
	if err != nil {
		t.Fatal(err)
	}
	if err := trim.Trim(t.Context()); err != nil {
		t.Fatal(err)
	}
	metrictest.Check(t, env.reg, 19)
}

// slowStore holds every Apply for a while, as a stuck store would.
type slowStore struct {
	aggregator.Store
	delay time.Duration
}

func (s slowStore) Apply(ctx context.Context, batches []*schemas.Batch) ([]aggregator.Increment, error) {
	time.Sleep(s.delay)
	return s.Store.Apply(ctx, batches)
}

// The consumer lag in time is the age of the batch being written, growing
// while its flush is stuck, and 0 once the aggregator caught up.
func TestConsumerLagSeconds(t *testing.T) {
	env := newIdleAggEnv(t, slowStore{openStore(t, "sqlite"), time.Second}, nil)
	before := time.Now()
	env.publish(t, "b1", ev("acme", "e1", 1, 0))
	time.Sleep(300 * time.Millisecond)
	env.start()
	lag := func() float64 { return metrictest.Value(t, env.reg, "meterd_aggregator_consumer_lag_seconds") }
	deadline := time.Now().Add(10 * time.Second)
	for lag() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no consumer lag within 10 s of a fetch")
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // the flush is held for 1 s
	if got, atMost := lag(), time.Since(before).Seconds(); got < 0.8 || got > atMost {
		t.Errorf("consumer lag %.3f s during a stuck flush of a batch published %.3f s ago, want at least 0.8 s and at most that", got, atMost)
	}
	env.waitCommitted(t, 1, 0)
	deadline = time.Now().Add(10 * time.Second)
	for lag() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("consumer lag %.3f s 10 s after catching up, want 0", lag())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A committed increment carries the seal time of the oldest batch of its
// flush: the start of freshness.
func TestCommittedSealedAt(t *testing.T) {
	env := newIdleAggEnv(t, openStore(t, "sqlite"), nil)
	got := make(chan schemas.Committed, 10)
	sub, err := env.nc.Subscribe(schemas.CommittedSubjectPrefix+"*", func(m *nats.Msg) {
		var c schemas.Committed
		if err := json.Unmarshal(m.Data, &c); err != nil {
			t.Errorf("committed message: %v", err)
		}
		got <- c
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	for i, sealed := range []time.Time{t0.Add(time.Second), t0, t0.Add(2 * time.Second)} {
		id := fmt.Sprintf("b%d", i)
		data, err := schemas.EncodeBatch(&schemas.Batch{ID: id, Collector: "test", SealedAt: sealed,
			Events: []schemas.Event{ev("acme", "e"+id, 1, 0)}})
		if err != nil {
			t.Fatal(err)
		}
		env.publishRaw(t, id, schemas.BatchContentType, data)
	}
	env.start()
	env.waitCommitted(t, 3, 0)
	select {
	case c := <-got:
		if c.Value != 3 || !c.SealedAt.Equal(t0) {
			t.Errorf("committed %+v, want value 3 sealed at %s (the oldest batch of the flush)", c, t0)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no committed increment")
	}
}

// carryStore returns, with its first Apply, usage repaired from an earlier
// interrupted write: more events than the call holds, and a negative
// correction, as the ClickHouse store's carry does.
type carryStore struct {
	aggregator.Store
	once sync.Once
}

func (s *carryStore) Apply(ctx context.Context, batches []*schemas.Batch) ([]aggregator.Increment, error) {
	incs, err := s.Store.Apply(ctx, batches)
	s.once.Do(func() {
		incs = append(incs,
			aggregator.Increment{Tenant: "initech", Meter: "api_calls", Hour: t0, Value: 50, Events: 50},
			aggregator.Increment{Tenant: "globex", Meter: "api_calls", Hour: t0, Value: -7, Events: -7})
	})
	return incs, err
}

// Increments that carry repaired usage are published as they are, and the
// counters, which cannot go down, take what they can (a negative Add
// panicked the aggregator in the zombie test).
func TestCommittedCarriedRepairs(t *testing.T) {
	env := newIdleAggEnv(t, &carryStore{Store: openStore(t, "sqlite")}, nil)
	env.publish(t, "b1", ev("acme", "e1", 1, 0))
	env.start()
	env.waitCommitted(t, 1, 0)
	deadline := time.Now().Add(5 * time.Second)
	for {
		env.mu.Lock()
		got := map[string]int64{"acme": env.committed["acme/api_calls"], "initech": env.committed["initech/api_calls"], "globex": env.committed["globex/api_calls"]}
		env.mu.Unlock()
		if got["acme"] == 1 && got["initech"] == 50 && got["globex"] == -7 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("committed %v, want acme 1, initech 50, globex -7", got)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if d := metrictest.Value(t, env.reg, "meterd_aggregator_events_duplicate_total"); d != 0 {
		t.Errorf("duplicates %v, want 0", d)
	}
}
