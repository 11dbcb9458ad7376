package sqlite

import (
	"database/sql"
	"math"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/rollup"
	"github.com/meterd/meterd/aggregator/storetest"
	"github.com/meterd/meterd/schemas"
)

// corruptible lets the conformance suite damage rollups.
type corruptible struct{ *Store }

func (c corruptible) AddToRollup(t *testing.T, tenant, meter string, hour time.Time, dims map[string]string, value, events int64) {
	t.Helper()
	k := rollup.Key{Tenant: tenant, Meter: meter, Hour: rollup.Second(hour), Dims: rollup.DimsKey(dims)}
	err := c.inTx(t.Context(), func(tx *sql.Tx) error { return c.addRollups(tx, rollup.Rows{k: {Value: value, Events: events}}) })
	if err != nil {
		t.Fatalf("corrupt rollup: %v", err)
	}
}

func newStore(t testing.TB) *Store {
	s, err := New(Config{Path: filepath.Join(t.TempDir(), "meterd.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) aggregator.Store { return corruptible{newStore(t)} })
}

// TestRollupRowSaturates: a rollup row of SQLite holds its sum in one
// INTEGER; an addition beyond int64 saturates there instead of turning the
// row into a REAL that no total could read.
func TestRollupRowSaturates(t *testing.T) {
	s := corruptible{newStore(t)}
	h := time.Date(2026, 1, 31, 23, 0, 0, 0, time.UTC)
	s.AddToRollup(t, "acme", "api_calls", h, nil, math.MaxInt64-1, 1)
	s.AddToRollup(t, "acme", "api_calls", h, nil, 5, 1)
	s.AddToRollup(t, "globex", "api_calls", h, nil, 3, 1)
	var value any
	if err := s.db.QueryRow(`SELECT value FROM rollups_hourly WHERE tenant = 'acme'`).Scan(&value); err != nil || value != int64(math.MaxInt64) {
		t.Fatalf("rollup value = %#v, %v; want int64 %d", value, err, int64(math.MaxInt64))
	}
	got, err := s.Totals(t.Context(), h, h.Add(time.Hour))
	want := []aggregator.Increment{
		{Tenant: "acme", Meter: "api_calls", Hour: h, Value: math.MaxInt64, Events: 2},
		{Tenant: "globex", Meter: "api_calls", Hour: h, Value: 3, Events: 1},
	}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("Totals = %v, %v; want %v", got, err, want)
	}
}

func TestReopenKeepsEventsAndSkipsMigrations(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meterd.db")
	open := func() *Store {
		s, err := New(Config{Path: path})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	s := open()
	b := []*schemas.Batch{{ID: "b1", Events: []schemas.Event{
		{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 2, Time: time.Date(2026, 1, 31, 23, 0, 0, 0, time.UTC)},
	}}}
	if _, err := s.Apply(t.Context(), b); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	s = open()
	defer s.Close()
	incs, err := s.Apply(t.Context(), b)
	if err != nil || len(incs) != 0 {
		t.Fatalf("Apply after reopen = %v, %v; want nothing new", incs, err)
	}
	var journal string
	if err := s.db.QueryRow(`PRAGMA journal_mode`).Scan(&journal); err != nil || journal != "wal" {
		t.Errorf("journal_mode = %q, %v; want wal", journal, err)
	}
	var sync int
	if err := s.db.QueryRow(`PRAGMA synchronous`).Scan(&sync); err != nil || sync != 2 {
		t.Errorf("synchronous = %d, %v; want 2 (FULL)", sync, err)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []Config{{}, {Path: "a?b"}} {
		if err := c.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil, want an error", c)
		}
	}
}
