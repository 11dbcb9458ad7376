package clickhouse

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/rollup"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/schemas"
)

// tenantsOf returns n tenants of partition p of partitions.
func tenantsOf(p, partitions, n int) []string {
	var out []string
	for i := 0; len(out) < n; i++ {
		if t := fmt.Sprintf("t%d", i); schemas.Partition(t, partitions) == p {
			out = append(out, t)
		}
	}
	return out
}

// scopedBatch returns a batch of events id-from .. id-(to-1) spread over
// tenants, each of value 1, in the hour t0.
func scopedBatch(name string, tenants []string, from, to int) []*schemas.Batch {
	b := &schemas.Batch{ID: name}
	for i := from; i < to; i++ {
		b.Events = append(b.Events, schemas.Event{ID: fmt.Sprintf("id-%d", i), Tenant: tenants[i%len(tenants)], Meter: "api_calls", Value: 1, Time: indexT0})
	}
	return []*schemas.Batch{b}
}

// Stores of two partitions write one database at once: each counts its own
// events once, refuses another partition's tenant, and never repairs or
// reconciles the other's tenants, whose writes may be in progress.
func TestScopedStoresShareADatabase(t *testing.T) {
	dsn := chtest.DSN(t)
	const partitions = 2
	ten := [2][]string{tenantsOf(0, partitions, 3), tenantsOf(1, partitions, 3)}
	var st [2]*Store
	for p := range st {
		st[p] = openStore(t, Config{DSN: dsn, IndexDir: t.TempDir(), Partitions: partitions, Partition: p})
	}
	var wg sync.WaitGroup
	for p := range st {
		wg.Go(func() {
			for i := range 5 {
				// Each batch twice: the second counts nothing.
				for range 2 {
					if _, err := st[p].Apply(t.Context(), scopedBatch(fmt.Sprint("b", p, i), ten[p], i*100, i*100+100)); err != nil {
						t.Error(err)
					}
				}
			}
		})
	}
	wg.Wait()
	reader := openStore(t, Config{DSN: dsn})
	totals := func() map[string]int64 {
		t.Helper()
		incs, err := reader.Totals(t.Context(), indexT0, indexT0.Add(time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]int64{}
		for _, inc := range incs {
			out[inc.Tenant] = inc.Value
		}
		return out
	}
	got := totals()
	for p := range ten {
		for _, tn := range ten[p] {
			// 500 events over 3 tenants, i%3: 167, 167, 166.
			if got[tn] < 166 || got[tn] > 167 {
				t.Errorf("%s: %d", tn, got[tn])
			}
		}
	}
	var sum int64
	for _, v := range got {
		sum += v
	}
	if sum != 1000 {
		t.Errorf("total %d, want 1000", sum)
	}

	// Another partition's tenant is refused, nothing written.
	if _, err := st[0].Apply(t.Context(), scopedBatch("wrong", ten[1], 5000, 5001)); !errors.Is(err, aggregator.ErrInvalidEvent) {
		t.Errorf("partition 0 applying a tenant of partition 1: %v", err)
	}

	// Partition 1's write in progress: its intent is open and its events
	// landed, its rollups not yet. Partition 0 recovering (as after a
	// failover) must leave it alone; partition 1's next writer repairs it.
	in := intent{id: "inflight", startedAt: time.Now().UTC(), tenants: ten[1][:1], partition: 1,
		hours: rollup.Range{From: rollup.Second(indexT0), To: rollup.Second(indexT0) + rollup.HourSeconds}}
	if err := st[1].insertIntents(t.Context(), intentRow{in, 1}); err != nil {
		t.Fatal(err)
	}
	news, _, _ := candidates(scopedBatch("inflight", ten[1][:1], 9000, 9010), false)
	for i := range news {
		news[i].dims = rollup.DimsKey(nil)
	}
	if err := st[1].insertEvents(t.Context(), "inflight", news); err != nil {
		t.Fatal(err)
	}
	st[0].WriterChanged()
	if _, err := st[0].Apply(t.Context(), scopedBatch("b0-more", ten[0], 600, 610)); err != nil {
		t.Fatal(err)
	}
	if n, err := st[0].Reconcile(t.Context(), indexT0, indexT0.Add(time.Hour)); err != nil || n != 0 {
		t.Errorf("partition 0's Reconcile: %d rows (%v), want 0: partition 1's tenants are not its own", n, err)
	}
	if d := totals()[ten[1][0]] - got[ten[1][0]]; d != 0 {
		t.Errorf("partition 0 changed partition 1's totals by %d", d)
	}
	if open := openIntents(t, st[0]); !slices.Contains(open, "inflight") {
		t.Errorf("open intents after partition 0's recovery: %v, want partition 1's among them", open)
	}
	next := openStore(t, Config{DSN: dsn, IndexDir: t.TempDir(), Partitions: partitions, Partition: 1})
	incs, err := next.Apply(t.Context(), scopedBatch("b1-more", ten[1], 600, 600))
	if err != nil {
		t.Fatal(err)
	}
	if len(incs) != 1 || incs[0].Tenant != ten[1][0] || incs[0].Value != 10 {
		t.Errorf("partition 1's recovery counted %+v, want the 10 events in flight", incs)
	}
	if d := totals()[ten[1][0]] - got[ten[1][0]]; d != 10 {
		t.Errorf("partition 1's repaired total grew by %d, want 10", d)
	}
	if open := openIntents(t, st[0]); slices.Contains(open, "inflight") {
		t.Errorf("open intents after partition 1's recovery: %v", open)
	}
}

// An index of another partition is rebuilt rather than trusted: its keys
// are not the partition's.
func TestIndexOfAnotherPartitionIsRebuilt(t *testing.T) {
	dsn := chtest.DSN(t)
	dir := t.TempDir()
	ten := [2][]string{tenantsOf(0, 2, 2), tenantsOf(1, 2, 2)}
	p0 := openStore(t, Config{DSN: dsn, IndexDir: dir, Partitions: 2, Partition: 0})
	if n := applied(t, p0, scopedBatch("a", ten[0], 0, 50)); n != 50 {
		t.Fatalf("partition 0 counted %d of 50", n)
	}
	p0.Close()
	p1 := openStore(t, Config{DSN: dsn, IndexDir: dir, Partitions: 2, Partition: 1})
	if n := applied(t, p1, scopedBatch("b", ten[1], 0, 50)); n != 50 {
		t.Fatalf("partition 1 with partition 0's index counted %d of 50", n)
	}
	if n := applied(t, p1, scopedBatch("b", ten[1], 0, 50)); n != 0 {
		t.Fatalf("partition 1 counted %d again", n)
	}
	if m, ok, err := p1.index.Mark(); err != nil || !ok || m.Store != p1.id || p1.id == p0.id {
		t.Errorf("mark %+v %v %v; ids %s %s", m, ok, err, p0.id, p1.id)
	}
}
