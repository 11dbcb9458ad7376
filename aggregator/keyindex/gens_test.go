package keyindex

import (
	"context"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// waitMerges waits until no merge is under way and none is due.
func waitMerges(t testing.TB, ix *Index) []gen {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		ix.mu.Lock()
		merging := ix.mergeIn != nil
		gens := append([]gen(nil), ix.gens...)
		ix.mu.Unlock()
		if !merging {
			return gens
		}
		if time.Now().After(deadline) {
			t.Fatal("merges still running after 20 s")
		}
	}
}

// openSpilling opens an index in dir that spills every 100 keys, and adds
// n keys to it in Adds of 100 (a spill each) at now, the i-th with the
// Mark mark(i); it returns the keys.
func openSpilling(t *testing.T, dir string, now time.Time, n int, mark func(i int) Mark) (*Index, []Key) {
	t.Helper()
	ix, err := Open(Options{Dir: dir, Horizon: time.Hour, BufferBytes: 2 * 100 * bufferBytesPerKey})
	if err != nil {
		t.Fatal(err)
	}
	all := keys("k", n)
	for i := 0; i < len(all); i += 100 {
		if err := ix.Add(all[i:i+100], now, mark(i)); err != nil {
			t.Fatal(err)
		}
	}
	return ix, all
}

// Spills become generations, merged 8 at a time in the background: every
// key stays held, with its latest minute, their number stays small, and a
// reopened index reads them and its Mark back from their meta.
func TestGenerationsMerge(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	ix, all := openSpilling(t, dir, now, 100*70, func(i int) Mark {
		return Mark{Store: "s", Through: now.Add(time.Duration(i) * time.Millisecond)}
	})
	// The first key again, later, in another generation.
	later := now.Add(50 * time.Minute)
	if err := ix.Add(all[:1], later, Mark{Store: "s", Through: later}); err != nil {
		t.Fatal(err)
	}
	if err := ix.Flush(); err != nil {
		t.Fatal(err)
	}
	// 71 spills: 8 merges of 8 make 8 generations of class 1, merged
	// into one of class 2, sealed; 7 are left (6 of 100 keys and 1 of 1).
	gens := waitMerges(t, ix)
	sealed := slices.IndexFunc(gens, func(g gen) bool { return g.Sealed })
	if len(gens) != 8 || sealed < 0 || gens[sealed].Keys != 6400 || gens[7].Keys != 1 {
		t.Fatalf("generations %+v, want one sealed of 6400 keys and 7 of the last spills", gens)
	}
	check := func(ix *Index, when string) {
		t.Helper()
		if n := countHeld(t, ix, all, now); n != len(all) {
			t.Fatalf("%s: held %d of %d", when, n, len(all))
		}
		if n := countHeld(t, ix, keys("absent", 5000), now); n != 0 {
			t.Fatalf("%s: held %d never added", when, n)
		}
		past := now.Add(61 * time.Minute) // past the first minute's horizon, inside the later one's
		if n := countHeld(t, ix, all[:2], past); n != 1 {
			t.Fatalf("%s: held %d of [added again later, not], want 1", when, n)
		}
		if m, ok, err := ix.Mark(); err != nil || !ok || !m.Through.Equal(later) {
			t.Fatalf("%s: mark %+v ok=%v err=%v, want the last Add's", when, m, ok, err)
		}
	}
	check(ix, "merged")
	waitFilter(t, ix)
	if st := ix.Stats(); st.Generations != 8 || st.Keys != 7001 || st.Recent != 0 || st.Merges != 9 || st.FilterKeys != 7001 ||
		st.FilterCapacity != minFilterKeys || st.Building || st.Scanned != 0 || st.DiskBytes == 0 {
		t.Fatalf("stats %+v, want 8 generations of 7001 keys, none recent, 9 merges, a filter of 7001 keys for %d, no scan, bytes on disk", st, minFilterKeys)
	}
	// Nothing but whole tables was written, and none was compacted.
	if m := ix.db.Metrics(); m.Compact.Count != 0 || m.Levels[6].TablesCount == 0 {
		t.Fatalf("%d compactions, %d tables in the last level; want none, and the tables there", m.Compact.Count, m.Levels[6].TablesCount)
	}
	if err := ix.Close(); err != nil {
		t.Fatal(err)
	}
	if st := ix.Stats(); st != (Stats{}) {
		t.Fatalf("stats of a closed index %+v, want none", st)
	}
	again := open(t, dir, time.Hour)
	check(again, "reopened")
	if reread := waitMerges(t, again); len(reread) != len(gens) {
		t.Fatalf("reopened with %d generations, closed with %d", len(reread), len(gens))
	}
}

// A crash between a merge's ingest and the deletion of its inputs leaves
// the keys twice: still held, once each, and merged again later.
func TestGenerationsMergeInterrupted(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	ix, all := openSpilling(t, dir, now, 100*7, func(int) Mark { return Mark{Store: "s", Through: now} })
	if err := ix.Flush(); err != nil {
		t.Fatal(err)
	}
	// Seven generations: one short of a merge. Merge them by hand, and
	// ingest the result without deleting them.
	ix.mu.Lock()
	in := append([]gen(nil), ix.gens...)
	id := ix.nextGen
	ix.nextGen++
	db := ix.db
	ix.mu.Unlock()
	if len(in) != 7 {
		t.Fatalf("%d generations, want 7", len(in))
	}
	paths, out, err := ix.writeMerge(context.Background(), db, id, in, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if out.Keys != int64(len(all)) {
		t.Fatalf("the merge wrote %d keys, want %d", out.Keys, len(all))
	}
	if err := db.Ingest(context.Background(), paths); err != nil {
		t.Fatal(err)
	}
	if err := ix.Close(); err != nil {
		t.Fatal(err)
	}
	again, err := Open(Options{Dir: dir, Horizon: time.Hour, BufferBytes: 2 * 100 * bufferBytesPerKey})
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	// The 7 and their merge are 8 generations of class 0: merged at
	// once, each key once.
	if gens := waitMerges(t, again); len(gens) != 1 || gens[0].Keys != int64(len(all)) {
		t.Fatalf("reopened: generations %+v, want one of %d keys", gens, len(all))
	}
	if n := countHeld(t, again, all, now); n != len(all) {
		t.Fatalf("held %d of %d", n, len(all))
	}
	more := keys("more", 100)
	if err := again.Add(more, now, Mark{Store: "s", Through: now}); err != nil {
		t.Fatal(err)
	}
	if err := again.Flush(); err != nil {
		t.Fatal(err)
	}
	if gens := waitMerges(t, again); len(gens) != 2 {
		t.Fatalf("%d generations after the next spill, want 2", len(gens))
	}
	if n := countHeld(t, again, append(all, more...), now); n != len(all)+len(more) {
		t.Fatalf("after merging again: held %d of %d", n, len(all)+len(more))
	}
}

// Expire deletes a generation whose keys have all expired whole, but keeps
// the one with the latest Mark.
func TestExpireDropsGenerations(t *testing.T) {
	dir := t.TempDir()
	ix := open(t, dir, time.Hour)
	t0 := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	old, marked := keys("old", 300), keys("marked", 200)
	if err := ix.Add(old, t0, Mark{}); err != nil {
		t.Fatal(err)
	}
	if err := ix.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := ix.Add(marked, t0.Add(time.Minute), Mark{Store: "s", Through: t0}); err != nil {
		t.Fatal(err)
	}
	if err := ix.Flush(); err != nil {
		t.Fatal(err)
	}
	end := t0.Add(2*time.Hour + 2*time.Minute) // both expired
	deleted, err := ix.Expire(context.Background(), end)
	if err != nil {
		t.Fatal(err)
	}
	if deleted != len(old) {
		t.Fatalf("Expire deleted %d, want the %d of the generation without the Mark", deleted, len(old))
	}
	if n := countHeld(t, ix, append(old, marked...), t0.Add(time.Minute)); n != len(marked) {
		t.Fatalf("before the horizon: held %d, want only the %d of the kept generation", n, len(marked))
	}
	if err := ix.Close(); err != nil {
		t.Fatal(err)
	}
	again := open(t, dir, time.Hour)
	if m, ok, err := again.Mark(); err != nil || !ok || m.Store != "s" {
		t.Fatalf("mark after Expire and reopening: %+v ok=%v err=%v", m, ok, err)
	}
	if gens := waitMerges(t, again); len(gens) != 1 {
		t.Fatalf("%d generations after Expire, want 1", len(gens))
	}
}

// An index of an earlier format (keys without a generation) is emptied
// when opened: it has no Mark, so its store loads it again.
func TestOpenEarlierFormat(t *testing.T) {
	dir := t.TempDir()
	db, err := pebble.Open(dir, &pebble.Options{Logger: logger{slog.New(slog.DiscardHandler)}})
	if err != nil {
		t.Fatal(err)
	}
	k := KeyOf("t", "1")
	if err := db.Set(k[:], []byte{0, 0, 0, 1}, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := db.Set([]byte("\x00meterd-keyindex-mark"), []byte(`{"store":"s"}`), pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	ix := open(t, dir, time.Hour)
	if _, ok, err := ix.Mark(); err != nil || ok {
		t.Fatalf("an index of the earlier format kept its mark: ok=%v err=%v", ok, err)
	}
	if n := countHeld(t, ix, []Key{k}, time.Unix(60, 0)); n != 0 {
		t.Fatal("an index of the earlier format kept its keys")
	}
	if err := ix.Add([]Key{k}, time.Unix(60, 0), Mark{Store: "s2"}); err != nil {
		t.Fatal(err)
	}
	if n := countHeld(t, ix, []Key{k}, time.Unix(60, 0)); n != 1 {
		t.Fatal("the emptied index does not hold a key added to it")
	}
}

// A Loader writes one generation per eighth of the horizon its keys' minutes
// fall in: sealed when it rebuilds an empty index (merged, they would span
// the horizon), merged with the spills when it catches up.
func TestLoaderGenerations(t *testing.T) {
	ix := open(t, t.TempDir(), 80*time.Minute) // slices of 10 minutes
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	load := func(ks []Key, at func(i int) time.Time) {
		t.Helper()
		l, err := ix.NewLoader()
		if err != nil {
			t.Fatal(err)
		}
		for i, k := range ks {
			l.Add(k, at(i))
		}
		if err := l.Finish(context.Background(), Mark{Store: "s", Through: now}); err != nil {
			t.Fatal(err)
		}
	}
	rebuilt := keys("rebuilt", 3000)
	load(rebuilt, func(i int) time.Time { return now.Add(-time.Duration(i%3) * 10 * time.Minute) })
	gens := waitMerges(t, ix)
	// Three slices, and the Mark's own (empty) generation.
	var sealed []gen
	for _, g := range gens {
		if g.Sealed {
			sealed = append(sealed, g)
		}
	}
	if len(sealed) != 3 || sealed[0].Keys != 1000 || sealed[0].Max-sealed[0].Min != 0 {
		t.Fatalf("generations after a rebuild: %+v, want 3 sealed of 1000 keys, one minute each", gens)
	}
	caught := keys("caught", 100)
	load(caught, func(int) time.Time { return now })
	gens = waitMerges(t, ix)
	if g := gens[len(gens)-2]; g.Sealed || g.Keys != 100 {
		t.Fatalf("generations after a catch-up: %+v, want the catch-up's unsealed, of 100 keys", gens)
	}
	if n := countHeld(t, ix, append(rebuilt, caught...), now); n != len(rebuilt)+len(caught) {
		t.Fatalf("held %d of %d", n, len(rebuilt)+len(caught))
	}
	// Expire at 11:01, the horizon of 9:40's minute: the oldest slice
	// goes whole.
	deleted, err := ix.Expire(context.Background(), now.Add(61*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if deleted != 1000 {
		t.Fatalf("Expire deleted %d, want the 1000 of the oldest slice", deleted)
	}
}
