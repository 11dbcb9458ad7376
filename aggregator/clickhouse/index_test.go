package clickhouse

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/keyindex"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// eventBatch returns one batch of the events id-from .. id-(to-1) of acme,
// each of value 1, in the hour t0.
func eventBatch(name string, from, to int, t0 time.Time) []*schemas.Batch {
	b := &schemas.Batch{ID: name}
	for i := from; i < to; i++ {
		b.Events = append(b.Events, schemas.Event{ID: fmt.Sprintf("id-%d", i), Tenant: "acme", Meter: "api_calls", Value: 1, Time: t0})
	}
	return []*schemas.Batch{b}
}

func applied(t *testing.T, s aggregator.Store, batches []*schemas.Batch) int64 {
	t.Helper()
	incs, err := s.Apply(t.Context(), batches)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, i := range incs {
		n += i.Events
	}
	return n
}

var indexT0 = time.Date(2026, 11, 20, 10, 0, 0, 0, time.UTC)

// An index left beside another store (or this store's database dropped and
// created again) must not answer for the new one: its keys would drop the
// new store's events, unbilled. The store's identity tells them apart.
func TestIndexOfAnotherStoreIsRebuilt(t *testing.T) {
	dir := t.TempDir()
	first := openStore(t, Config{DSN: chtest.DSN(t), IndexDir: dir})
	if n := applied(t, first, eventBatch("b", 0, 100, indexT0)); n != 100 {
		t.Fatalf("first store counted %d of 100", n)
	}
	first.Close()
	second := openStore(t, Config{DSN: chtest.DSN(t), IndexDir: dir})
	if n := applied(t, second, eventBatch("b", 0, 100, indexT0)); n != 100 {
		t.Fatalf("a new store with the index of another counted %d of 100 new events", n)
	}
	if n := applied(t, second, eventBatch("b", 0, 100, indexT0)); n != 0 {
		t.Fatalf("the same events again counted %d", n)
	}
}

// A store closed cleanly saves its index's filter beside it; reopened on
// that index, it counts none of the events it wrote before again, and the
// new ones once. (Its catch-up from the store adds the recent keys again,
// so a filter read back wrong would not show here: keyindex's tests of the
// saved filter check that.)
func TestIndexReopenedAfterACleanClose(t *testing.T) {
	dsn, dir := chtest.DSN(t), t.TempDir()
	first := openStore(t, Config{DSN: dsn, IndexDir: dir})
	if n := applied(t, first, eventBatch("b1", 0, 100, indexT0)); n != 100 {
		t.Fatalf("first counted %d of 100", n)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "meterd-filter")); err != nil {
		t.Fatalf("no filter saved beside the index at Close: %v", err)
	}
	second := openStore(t, Config{DSN: dsn, IndexDir: dir})
	if n := applied(t, second, eventBatch("b2", 0, 150, indexT0)); n != 50 {
		t.Fatalf("reopened, counted %d, want the 50 new", n)
	}
	if n := applied(t, second, eventBatch("b3", 0, 150, indexT0)); n != 0 {
		t.Fatalf("the same events again counted %d", n)
	}
	wantIndexTotal(t, second, 150)
}

// The index's metrics follow its keys: every key counted once, on disk or
// in memory, a filter holding them, and a second store on the same
// registry refused rather than reporting two indexes as one.
func TestIndexMetrics(t *testing.T) {
	dsn, reg := chtest.DSN(t), prometheus.NewRegistry()
	s := openStore(t, Config{DSN: dsn, IndexDir: t.TempDir(), Registerer: reg})
	if n := applied(t, s, eventBatch("b1", 0, 100, indexT0)); n != 100 {
		t.Fatalf("counted %d of 100", n)
	}
	if n := applied(t, s, eventBatch("b2", 50, 120, indexT0)); n != 20 {
		t.Fatalf("counted %d, want the 20 new", n)
	}
	metrictest.Check(t, reg, 8)
	keys := func() float64 {
		return metrictest.Value(t, reg, "meterd_aggregator_dedup_index_keys") + metrictest.Value(t, reg, "meterd_aggregator_dedup_index_recent_keys")
	}
	if n := keys(); n != 120 {
		t.Errorf("index keys %g on disk and in memory, want the 120 written", n)
	}
	// The filter holds the keys on disk; a spill writes the recent ones.
	if err := s.index.Flush(); err != nil {
		t.Fatal(err)
	}
	if n, g := keys(), metrictest.Value(t, reg, "meterd_aggregator_dedup_index_generations"); n != 120 || g < 1 || metrictest.Value(t, reg, "meterd_aggregator_dedup_index_disk_bytes") <= 0 {
		t.Errorf("after a spill: %g keys in %g generations, want 120 in at least 1, with bytes on disk", n, g)
	}
	if r := metrictest.Value(t, reg, "meterd_aggregator_dedup_index_recent_keys"); r != 0 {
		t.Errorf("%g keys still in memory after a spill", r)
	}
	if f, c := metrictest.Value(t, reg, "meterd_aggregator_dedup_index_filter_keys"), metrictest.Value(t, reg, "meterd_aggregator_dedup_index_filter_capacity_keys"); f != 120 || c < f {
		t.Errorf("filter of %g keys for %g, want the 120 on disk", f, c)
	}
	refused := t.TempDir()
	if _, err := New(t.Context(), Config{DSN: dsn, IndexDir: refused, Registerer: reg}); err == nil || !strings.Contains(err.Error(), "dedup index metrics") {
		t.Errorf("a second store's index on the same registry: %v, want refused", err)
	}
	// The refused store closed its index: another may open it.
	ix, err := keyindex.Open(keyindex.Options{Dir: refused})
	if err != nil {
		t.Fatalf("the refused store's index is still open: %v", err)
	}
	ix.Close()
	// Close takes the metrics away, so the next store may register them.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	metrictest.Check(t, reg, 0)
	openStore(t, Config{DSN: dsn, IndexDir: t.TempDir(), Registerer: reg})
	metrictest.Check(t, reg, 8)

	// So may a partition's next store, with the partition's label as
	// meterd aggregator --share-partitions gives them (on a registry of
	// their own: one keeps a name's label names for its lifetime).
	reg = prometheus.NewRegistry()
	p3 := prometheus.WrapRegistererWith(prometheus.Labels{"partition": "3"}, reg)
	for i := range 2 {
		s := openStore(t, Config{DSN: dsn, IndexDir: t.TempDir(), Registerer: p3})
		if n := applied(t, s, eventBatch(fmt.Sprintf("p3-%d", i), 200+10*i, 207+10*i, indexT0)); n != 7 {
			t.Fatalf("counted %d of 7", n)
		}
		if n := metrictest.Value(t, reg, "meterd_aggregator_dedup_index_recent_keys", "partition", "3"); n != 7 {
			t.Errorf("partition 3's index holds %g recent keys, want 7", n)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		metrictest.Check(t, reg, 0)
	}
}

// A writer whose index missed what another writer wrote while it stood by
// (a failover and back) catches up from the store when told the writer
// changed: nothing the other wrote counts twice.
func TestIndexCatchesUpAfterWriterChanged(t *testing.T) {
	dsn := chtest.DSN(t)
	a := newStore(t, dsn)
	b := newStore(t, dsn)
	if n := applied(t, a, eventBatch("a1", 0, 50, indexT0)); n != 50 {
		t.Fatalf("a counted %d of 50", n)
	}
	b.WriterChanged()
	if n := applied(t, b, eventBatch("b1", 0, 120, indexT0)); n != 70 {
		t.Fatalf("b counted %d, want the 70 that a had not written", n)
	}
	a.WriterChanged()
	if n := applied(t, a, eventBatch("a2", 0, 150, indexT0)); n != 30 {
		t.Fatalf("a counted %d after the writer changed, want the 30 new", n)
	}
	wantIndexTotal(t, a, 150)
}

// wantIndexTotal fails t unless acme's api_calls in indexT0's hour total want.
func wantIndexTotal(t *testing.T, s *Store, want int64) {
	t.Helper()
	total, err := s.Total(t.Context(), "acme", "api_calls", indexT0, indexT0.Add(time.Hour))
	if err != nil || total != want {
		t.Fatalf("total %d, %v; want %d", total, err, want)
	}
}

// A new writer's Prepare (outside the write's deadline) catches its index
// up with the other writer's events; its first write catches up again from
// Prepare's mark less a short margin, finding an insert that landed after
// Prepare read, and counts none of them again; a write after a later
// change of writer syncs again.
func TestPrepareCatchesUpBeforeTheFirstWrite(t *testing.T) {
	dsn := chtest.DSN(t)
	a := newStore(t, dsn)
	b := newStore(t, dsn)
	if err := b.Prepare(t.Context()); err != nil { // b's first start: the index is loaded
		t.Fatal(err)
	}
	if n := applied(t, b, eventBatch("b0", 0, 10, indexT0)); n != 10 {
		t.Fatalf("b counted %d of 10", n)
	}
	if n := applied(t, a, eventBatch("a1", 0, 50, indexT0)); n != 40 {
		t.Fatalf("a counted %d, want the 40 that b had not written", n)
	}
	b.WriterChanged()
	if err := b.Prepare(t.Context()); err != nil {
		t.Fatal(err)
	}
	if !b.prepared {
		t.Fatal("Prepare after a change of writer did not sync the index")
	}
	// a writes once more after b's Prepare read, as a zombie's insert that
	// lands late would: b's first write must still find these events.
	if n := applied(t, a, eventBatch("a-late", 50, 60, indexT0)); n != 10 {
		t.Fatalf("a counted %d of its 10 late events", n)
	}
	if n := applied(t, b, eventBatch("b1", 0, 120, indexT0)); n != 60 {
		t.Fatalf("b counted %d after Prepare, want the 60 that a had not written", n)
	}
	if b.prepared {
		t.Fatal("the first write after Prepare left it set")
	}
	if err := b.Prepare(t.Context()); err != nil || b.prepared {
		t.Fatalf("Prepare with nothing to recover: %v, prepared %v; want a no-op", err, b.prepared)
	}
	a.WriterChanged()
	if n := applied(t, a, eventBatch("a2", 0, 150, indexT0)); n != 30 {
		t.Fatalf("a counted %d after the writer changed, want the 30 new", n)
	}
	wantIndexTotal(t, a, 150)
}

// Events written before the store had an index (by a version without one,
// or with the index turned off) are found by the index's first load.
func TestIndexLoadsEventsWrittenWithoutIt(t *testing.T) {
	dsn := chtest.DSN(t)
	plain := openStore(t, Config{DSN: dsn})
	if n := applied(t, plain, eventBatch("b", 0, 80, indexT0)); n != 80 {
		t.Fatalf("counted %d of 80", n)
	}
	plain.Close()
	s := newStore(t, dsn)
	if n := applied(t, s, eventBatch("b", 0, 100, indexT0)); n != 20 {
		t.Fatalf("with a new index: counted %d, want the 20 new", n)
	}
}

// The index's load reads keys computed by the server: they must be
// keyindex.KeyOf's, byte for byte, or a loaded index would miss every event.
func TestServerComputesIndexKeys(t *testing.T) {
	s := newStore(t, chtest.DSN(t))
	for _, c := range []struct{ tenant, id string }{
		{"acme", "e1"}, {"a", "bc"}, {"ab", "c"}, {"t-1.x_y", "ce:6:/s/src:héllo 🙂"}, {"t", strings.Repeat("x", 1000)},
	} {
		var got string
		if err := s.conn.QueryRow(t.Context(), `SELECT substring(SHA256(concat(?, '\0', ?)), 1, 16)`, c.tenant, c.id).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if want := keyindex.KeyOf(c.tenant, c.id); got != string(want[:]) {
			t.Errorf("(%q, %q): server key %x, KeyOf %x", c.tenant, c.id, got, want)
		}
	}
}
