package keyindex

import (
	"context"
	"testing"
	"time"
)

// waitFilter waits until ix has a filter in use and none being built.
func waitFilter(t testing.TB, ix *Index) *filter {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		ix.mu.Lock()
		f, building := ix.filter, ix.building
		ix.mu.Unlock()
		if f != nil && building == nil {
			return f
		}
		if time.Now().After(deadline) {
			t.Fatal("no filter built within 20 s")
		}
	}
}

// A filter never says no to a key it was given, and says yes to about 1 %
// of the others at its capacity.
func TestFilter(t *testing.T) {
	const n = 1_000_000
	f := newFilter(n)
	in, out := keys("in", n), keys("out", n)
	for i := range in {
		f.add(&in[i])
	}
	for i := range in {
		if !f.mayContain(&in[i]) {
			t.Fatalf("key %d added, not found", i)
		}
	}
	fp := 0
	for i := range out {
		if f.mayContain(&out[i]) {
			fp++
		}
	}
	if rate := float64(fp) / n; rate > 0.02 || rate < 0.001 {
		t.Fatalf("false positives %.4f, want about 0.01", rate)
	}
	if f.full() || f.added.Load() != n {
		t.Fatalf("added %d, full %v", f.added.Load(), f.full())
	}
}

// Keys the index holds are held whether or not a filter is in use: after
// a Loader's ingest (which drops the filter until a new one is built) and
// after reopening (a filter built from a scan); keys never added are not.
func TestFilterAfterLoadAndReopen(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	added, loaded, absent := keys("added", 3000), keys("loaded", 20_000), keys("absent", 20_000)
	check := func(ix *Index, when string) {
		t.Helper()
		if n := countHeld(t, ix, added, now); n != len(added) {
			t.Fatalf("%s: held %d of %d added", when, n, len(added))
		}
		if n := countHeld(t, ix, loaded, now); n != len(loaded) {
			t.Fatalf("%s: held %d of %d loaded", when, n, len(loaded))
		}
		if n := countHeld(t, ix, absent, now); n != 0 {
			t.Fatalf("%s: held %d never added", when, n)
		}
	}
	ix, err := Open(Options{Dir: dir, Horizon: time.Hour, filterKeys: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if err := ix.Add(added, now, Mark{Store: "s"}); err != nil {
		t.Fatal(err)
	}
	if err := ix.Flush(); err != nil {
		t.Fatal(err)
	}
	l, err := ix.NewLoader()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range loaded {
		l.Add(k, now)
	}
	if err := l.Finish(context.Background(), Mark{Store: "s", Through: now}); err != nil {
		t.Fatal(err)
	}
	check(ix, "after the load")
	f := waitFilter(t, ix)
	if f.added.Load() < int64(len(added)+len(loaded)) {
		t.Fatalf("the filter built after the load has %d keys, want at least %d", f.added.Load(), len(added)+len(loaded))
	}
	check(ix, "after the load, filtered")
	if err := ix.Close(); err != nil {
		t.Fatal(err)
	}
	again := open(t, dir, time.Hour)
	check(again, "reopened")
	waitFilter(t, again)
	check(again, "reopened, filtered")
	if err := again.Reset(); err != nil {
		t.Fatal(err)
	}
	waitFilter(t, again)
	if n := countHeld(t, again, append(added, loaded...), now); n != 0 {
		t.Fatalf("after Reset: held %d", n)
	}
}
