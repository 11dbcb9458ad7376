package clickhouse

import (
	"context"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/rollup"
	"github.com/meterd/meterd/aggregator/storetest"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/schemas"
	"github.com/meterd/meterd/schemas/migrations"
)

func TestMain(m *testing.M) { chtest.Main(m) }

// corruptible lets the conformance suite damage rollups.
type corruptible struct{ *Store }

func (c corruptible) AddToRollup(t *testing.T, tenant, meter string, hour time.Time, dims map[string]string, value, events int64) {
	t.Helper()
	k := rollup.Key{Tenant: tenant, Meter: meter, Hour: rollup.Second(hour), Dims: rollup.DimsKey(dims)}
	if err := c.insertRollups(t.Context(), "", rollup.Rows{k: {Value: value, Events: events}}); err != nil {
		t.Fatalf("corrupt rollup: %v", err)
	}
}

// newStore opens a store of dsn with a dedup index of its own, as the
// aggregator runs it.
func newStore(t testing.TB, dsn string) *Store {
	t.Helper()
	return openStore(t, Config{DSN: dsn, IndexDir: t.TempDir()})
}

func openStore(t testing.TB, cfg Config) *Store {
	t.Helper()
	s, err := New(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) aggregator.Store { return corruptible{newStore(t, chtest.DSN(t))} })
}

// Without a dedup index, Apply looks events up in ClickHouse.
func TestConformanceWithoutIndex(t *testing.T) {
	storetest.Run(t, func(t *testing.T) aggregator.Store {
		return corruptible{openStore(t, Config{DSN: chtest.DSN(t)})}
	})
}

// crashBatches are the batches of TestInterruptedApply: usage of two tenants
// in two hours, one of them in February.
func crashBatches() []*schemas.Batch {
	t0 := time.Date(2026, 1, 31, 23, 0, 0, 0, time.UTC)
	return []*schemas.Batch{
		{ID: "b1", Events: []schemas.Event{
			{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 1, Time: t0.Add(time.Minute)},
			{ID: "e2", Tenant: "acme", Meter: "api_calls", Value: 10, Time: t0.Add(2 * time.Minute), Dimensions: map[string]string{"route": "/a"}},
			{ID: "e3", Tenant: "globex", Meter: "tokens", Value: 100, Time: t0.Add(61 * time.Minute)},
		}},
		{ID: "b2", Events: []schemas.Event{
			{ID: "e4", Tenant: "acme", Meter: "api_calls", Value: 1000, Time: t0.Add(62 * time.Minute)},
			{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 7, Time: t0.Add(63 * time.Minute)}, // a retry
		}},
	}
}

// TestInterruptedApply leaves the writes of an Apply unfinished at each
// step, as a crash or a failed insert would, and applies the same batches
// again, in a new process or in the same store: every event counts once and
// the repaired usage is returned as increments.
func TestInterruptedApply(t *testing.T) {
	t0 := time.Date(2026, 1, 31, 23, 0, 0, 0, time.UTC)
	full := []string{
		"acme api_calls 2026-01-31T23:00:00Z value=11 events=2",
		"acme api_calls 2026-02-01T00:00:00Z value=1000 events=1",
		"globex tokens 2026-02-01T00:00:00Z value=100 events=1",
	}
	for _, tc := range []struct {
		name     string
		events   int  // how many of the new events were written
		rollups  bool // whether their rollups were written
		sameProc bool // whether the same store applies again
		want     []string
	}{
		{name: "after the intent", want: full},
		{name: "after some events", events: 2, want: full},
		{name: "after some events, same store", events: 2, sameProc: true, want: full},
		{name: "after the events", events: 4, want: full},
		// The rollups were complete: nothing is left to count, and the
		// increments of the failed call are not reported (the enforcer
		// reseeds from Totals).
		{name: "after the rollups", events: 4, rollups: true, want: nil},
	} {
		// The events written and not in the dedup index are found again by
		// the index's catch-up (the index kept) or its rebuild (the index lost
		// with the process), or by the lookup in events (no index).
		for _, ix := range []string{"kept", "lost", "none"} {
			t.Run(tc.name+"/index "+ix, func(t *testing.T) {
				dsn := chtest.DSN(t)
				ctx := t.Context()
				cfg := Config{DSN: dsn}
				if ix != "none" {
					cfg.IndexDir = t.TempDir()
				}
				s := openStore(t, cfg)
				batches := crashBatches()
				// What write does, stopped part of the way.
				news, index, in := candidates(batches, s.index != nil)
				dims, rows := sumAll(news)
				for i := range news {
					news[i].dims = dims[i]
				}
				if held, err := s.lookUp(ctx, news, index); err != nil || len(news) != 4 || len(held) != 0 {
					t.Fatalf("lookup of %d candidates: %d held, %v; want 4 new", len(news), len(held), err)
				}
				if err := s.openIntent(ctx, in); err != nil {
					t.Fatal(err)
				}
				if tc.events > 0 {
					if err := s.insertEvents(ctx, in.id, news[:tc.events]); err != nil {
						t.Fatal(err)
					}
				}
				if tc.rollups {
					if err := s.insertRollups(ctx, in.id+"-rollups", rows); err != nil {
						t.Fatal(err)
					}
				}
				if tc.sameProc {
					s.pending = true // as a failed Apply leaves it
				} else {
					s.Close()
					if ix == "lost" {
						cfg.IndexDir = t.TempDir()
					}
					s = openStore(t, cfg)
				}

				incs, err := s.Apply(ctx, batches)
				if err != nil {
					t.Fatal(err)
				}
				var got []string
				for _, i := range incs {
					got = append(got, fmt.Sprintf("%s %s %s value=%d events=%d", i.Tenant, i.Meter, i.Hour.Format(time.RFC3339), i.Value, i.Events))
				}
				if !slices.Equal(got, tc.want) {
					t.Errorf("increments after the interruption:\n got  %q\n want %q", got, tc.want)
				}
				if incs, err := s.Apply(ctx, batches); err != nil || len(incs) != 0 {
					t.Errorf("second Apply = %v, %v; want nothing", incs, err)
				}
				totals, err := s.Totals(ctx, t0, t0.Add(2*time.Hour))
				if err != nil {
					t.Fatal(err)
				}
				want := []aggregator.Increment{
					{Tenant: "acme", Meter: "api_calls", Hour: t0, Value: 1011, Events: 3},
					{Tenant: "globex", Meter: "tokens", Hour: t0, Value: 100, Events: 1},
				}
				if !slices.EqualFunc(totals, want, func(a, b aggregator.Increment) bool {
					return a.Tenant == b.Tenant && a.Meter == b.Meter && a.Hour.Equal(b.Hour) && a.Value == b.Value && a.Events == b.Events
				}) {
					t.Errorf("Totals = %v, want %v", totals, want)
				}
				if n, err := s.Reconcile(ctx, t0, t0.Add(2*time.Hour)); err != nil || n != 0 {
					t.Errorf("Reconcile = %d, %v; want 0", n, err)
				}
				// The last Apply's intent stays open until Close.
				if got := openIntents(t, s); len(got) != 1 || got[0] != s.open.id {
					t.Errorf("open intents %q, want the last Apply's", got)
				}
				s.Close()
				if got := openIntents(t, openStore(t, cfg)); len(got) != 0 {
					t.Errorf("open intents after Close: %q", got)
				}
			})
		}
	}
}

// openIntents returns the ids of the open intents.
func openIntents(t *testing.T, s *Store) []string {
	t.Helper()
	rows, err := s.conn.Query(t.Context(), `SELECT apply_id FROM applies GROUP BY apply_id HAVING sum(sign) != 0 ORDER BY apply_id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return ids
}

func TestMigrationsAreAppliedOnce(t *testing.T) {
	dsn := chtest.DSN(t)
	newStore(t, dsn)
	s := newStore(t, dsn)
	ms, err := migrations.Load(migrations.ClickHouse, "clickhouse")
	if err != nil {
		t.Fatal(err)
	}
	var rows, versions uint64
	if err := s.conn.QueryRow(t.Context(), `SELECT count(), uniqExact(version) FROM schema_migrations`).Scan(&rows, &versions); err != nil {
		t.Fatal(err)
	}
	if rows != uint64(len(ms)) || versions != uint64(len(ms)) {
		t.Errorf("schema_migrations holds %d rows of %d versions, want %d of %d", rows, versions, len(ms), len(ms))
	}
	var tables []string
	r, err := s.conn.Query(t.Context(), `SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name`)
	if err != nil {
		t.Fatal(err)
	}
	for r.Next() {
		var name string
		r.Scan(&name)
		tables = append(tables, name)
	}
	if want := []string{"applies", "events", "rollups_hourly", "schema_migrations", "store_identity"}; !slices.Equal(tables, want) {
		t.Errorf("tables = %v, want %v", tables, want)
	}
}

// A migration may run and then fail to be recorded: every one must run
// again without harm, the guarded DROP COLUMN included.
func TestMigrationsRunAgainWhenUnrecorded(t *testing.T) {
	dsn := chtest.DSN(t)
	s := newStore(t, dsn)
	if err := s.conn.Exec(t.Context(), `DROP TABLE schema_migrations`); err != nil {
		t.Fatal(err)
	}
	s = newStore(t, dsn)
	var columns []string
	r, err := s.conn.Query(t.Context(), `SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'events' ORDER BY name`)
	if err != nil {
		t.Fatal(err)
	}
	for r.Next() {
		var name string
		r.Scan(&name)
		columns = append(columns, name)
	}
	if want := []string{"batch_id", "dims_key", "id", "inserted_at", "key_hash", "meter", "tenant", "time", "value"}; !slices.Equal(columns, want) {
		t.Errorf("columns of events = %v, want %v", columns, want)
	}
}

func TestNewCreatesTheDatabase(t *testing.T) {
	dsn := chtest.DSN(t) + "_created"
	s := newStore(t, dsn)
	t.Cleanup(func() {
		s.conn.Exec(context.Background(), "DROP DATABASE IF EXISTS "+strings.TrimPrefix(dsn[strings.LastIndex(dsn, "/"):], "/"))
	})
	if err := s.Ping(t.Context()); err != nil {
		t.Fatal(err)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, dsn := range []string{"", "clickhouse://127.0.0.1:9000", "clickhouse://127.0.0.1:9000/bad-name", "http://127.0.0.1:8123/db", "::"} {
		if err := (Config{DSN: dsn}).Validate(); err == nil {
			t.Errorf("Validate(%q) = nil, want an error", dsn)
		}
	}
	if err := (Config{DSN: "clickhouse://127.0.0.1:9000/meterd?dial_timeout=1s"}).Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

func TestKeyHashIsFNV1a(t *testing.T) {
	h := fnv.New64a()
	h.Write([]byte("acme\x00e1"))
	if got, want := keyHash("acme", "e1"), h.Sum64(); got != want {
		t.Errorf("keyHash = %x, want %x", got, want)
	}
}

// An event the events table holds twice (as a second writer leaves it) and
// delivered again: Apply neither panics nor subtracts it twice, and the new
// events of the call count once.
func TestApplyWithEventStoredTwice(t *testing.T) {
	ctx := t.Context()
	s := openStore(t, Config{DSN: chtest.DSN(t)}) // the lookup in events

	t0 := time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC)
	first := []*schemas.Batch{{ID: "b1", Events: []schemas.Event{
		{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 5, Time: t0},
	}}}
	if _, err := s.Apply(ctx, first); err != nil {
		t.Fatal(err)
	}
	// The second copy of e1, written directly as a writer beside this one
	// would have.
	dup, _, _ := candidates(first, false)
	dup[0].dims = rollup.DimsKey(nil)
	if err := s.insertEvents(ctx, "duplicate", dup); err != nil {
		t.Fatal(err)
	}
	again := []*schemas.Batch{{ID: "b2", Events: []schemas.Event{
		{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 5, Time: t0},
		{ID: "e2", Tenant: "acme", Meter: "api_calls", Value: 7, Time: t0.Add(time.Minute)},
	}}}
	incs, err := s.Apply(ctx, again)
	if err != nil {
		t.Fatal(err)
	}
	if len(incs) != 1 || incs[0].Value != 7 || incs[0].Events != 1 {
		t.Fatalf("increments %+v, want e2's value 7 in 1 event", incs)
	}
	if total, err := s.Total(ctx, "acme", "api_calls", t0, t0.Add(time.Hour)); err != nil || total != 12 {
		t.Fatalf("total %d (%v), want 12", total, err)
	}
}
