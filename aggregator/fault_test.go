package aggregator_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/clickhouse"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// ClickHouse stopped for 30 s under load and started again: the aggregator
// holds its messages (no redelivery storm, nothing dead-lettered), readiness
// says why, and once ClickHouse is back every event is counted exactly once.
func TestAggregatorClickHouseOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("a 30 s outage")
	}
	srv := chtest.NewServer(t)
	store, err := clickhouse.New(t.Context(), clickhouse.Config{DSN: srv.DSN("outage"), IndexDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	env := newAggEnv(t, store, func(c *aggregator.Config) { c.AckWait = 3 * time.Second })

	var (
		mu        sync.Mutex
		want      = map[string]int64{}
		seen      = map[string]bool{}
		published int
	)
	publish := func(b int) {
		var events []schemas.Event
		for i := range 100 {
			tenant := fmt.Sprintf("t%d", i%7)
			id := fmt.Sprintf("e%d", (b*100+i)%15000) // repeats across batches
			e := ev(tenant, id, int64(1+i%5), time.Duration(b%120)*time.Minute)
			mu.Lock()
			if !seen[tenant+"/"+id] {
				seen[tenant+"/"+id] = true
				want[tenant] += e.Value
			}
			mu.Unlock()
			events = append(events, e)
		}
		env.publish(t, fmt.Sprintf("outage-%d", b), events...)
		mu.Lock()
		published++
		mu.Unlock()
	}
	ctx, stopLoad := context.WithCancel(t.Context())
	loadDone := make(chan struct{})
	go func() { // steady load through the whole test
		defer close(loadDone)
		for b := 0; ctx.Err() == nil; b++ {
			publish(b)
			time.Sleep(20 * time.Millisecond)
		}
	}()
	waitFor(t, func() bool { return metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total") >= 20 }, "no batch committed before the outage")

	srv.Stop()
	outageStart := time.Now()
	waitFor(t, func() bool { return env.agg.Ready(t.Context()) != nil }, "ready while ClickHouse is down")
	for time.Since(outageStart) < 30*time.Second {
		time.Sleep(500 * time.Millisecond)
	}
	committedDuringOutage := metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total")
	srv.Start()
	time.Sleep(2 * time.Second) // load goes on after the restart
	stopLoad()
	<-loadDone

	mu.Lock()
	total := float64(published)
	mu.Unlock()
	deadline := time.Now().Add(60 * time.Second)
	for metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total") < total {
		if time.Now().After(deadline) {
			t.Fatalf("committed %v of %v batches after the outage", metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total"), total)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total"); got != total {
		t.Fatalf("committed %v batches, published %v", got, total)
	}
	if d := metrictest.Value(t, env.reg, "meterd_aggregator_dead_lettered_total"); d != 0 {
		t.Fatalf("%v batches dead-lettered by an outage", d)
	}
	if committedDuringOutage >= total {
		t.Fatalf("everything was committed during the outage (%v of %v): the outage did not bite", committedDuringOutage, total)
	}
	for tenant, v := range want {
		if got := env.total(t, tenant); got != v {
			t.Errorf("%s: total %d, want %d", tenant, got, v)
		}
	}
	if err := env.agg.Ready(t.Context()); err != nil {
		t.Fatalf("not ready after the outage: %v", err)
	}
}
