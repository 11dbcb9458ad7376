package keyindex

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// loadAt loads ks into ix with a Loader, each added at now, with the Mark
// of store "s" through now.
func loadAt(t testing.TB, ix *Index, ks []Key, now time.Time) {
	t.Helper()
	l, err := ix.NewLoader()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range ks {
		l.Add(k, now)
	}
	if err := l.Finish(context.Background(), Mark{Store: "s", Through: now}); err != nil {
		t.Fatal(err)
	}
}

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
// a Loader's ingest (which, here, finds no room in the filter and starts a
// new build) and after reopening (a filter built from a scan); keys never
// added are not.
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
	loadAt(t, ix, loaded, now)
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

// A Loader adds its keys to the filter as it writes them: a load into an
// empty index (a lost index rebuilt) and a small one into a filter with
// room for it (a catch-up) need no scan of the LSM; a load the filter has
// no room for gets a new filter, from a scan.
func TestLoaderFillsTheFilter(t *testing.T) {
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	ix, err := Open(Options{Dir: t.TempDir(), Horizon: time.Hour, filterKeys: 1000})
	if err != nil {
		t.Fatal(err)
	}
	defer ix.Close()
	waitFilter(t, ix)
	load := func(ks []Key) { t.Helper(); loadAt(t, ix, ks, now) }
	rebuilt, added, caught, big := keys("rebuilt", 20_000), keys("added", 3000), keys("caught", 500), keys("big", 10_000)
	all := slices.Concat(rebuilt, added, caught, big)
	check := func(when string, n int) {
		t.Helper()
		if h := countHeld(t, ix, all[:n], now); h != n {
			t.Fatalf("%s: held %d of %d", when, h, n)
		}
		if h := countHeld(t, ix, keys("absent", 20_000), now); h != 0 {
			t.Fatalf("%s: held %d never added", when, h)
		}
	}

	load(rebuilt)
	f := waitFilter(t, ix)
	if got := ix.scanned.Load(); got != 0 {
		t.Fatalf("a load into an empty index scanned %d keys for its filter, want none", got)
	}
	if f.added.Load() != int64(len(rebuilt)) || f.capacity < int64(len(rebuilt)) {
		t.Fatalf("the filter after the load: %d keys added, capacity %d; want %d and room", f.added.Load(), f.capacity, len(rebuilt))
	}
	check("after the rebuild", len(rebuilt))

	if err := ix.Add(added, now, Mark{Store: "s", Through: now}); err != nil {
		t.Fatal(err)
	}
	if err := ix.Flush(); err != nil {
		t.Fatal(err)
	}
	load(caught)
	if g := waitFilter(t, ix); g != f || ix.scanned.Load() != 0 {
		t.Fatalf("a catch-up with room in the filter replaced it (%v) or scanned %d keys", g != f, ix.scanned.Load())
	}
	check("after the catch-up", len(rebuilt)+len(added)+len(caught))

	// The new filter's scan reads the keys held before the load, and the
	// loaded ones are added as they are written.
	load(big)
	before := len(all) - len(big)
	if g := waitFilter(t, ix); g == f || ix.scanned.Load() != int64(before) {
		t.Fatalf("a load too big for the filter: replaced %v, %d keys scanned, want a new filter from a scan of %d", g != f, ix.scanned.Load(), before)
	}
	check("after a load too big for the filter", len(all))
}

// Close keeps the filter, and Open uses it instead of a scan when it was
// written for the generations in the LSM. A filter of other generations
// (here, one from before the last keys were added), a corrupted one and
// none at all (a crash: Open removed the file) are not used: the index
// scans, and every key stays held.
func TestFilterKeptAcrossClose(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	file := filepath.Join(dir, filterFile)
	var all []Key
	reopen := func(when string, wantScan bool) *Index {
		t.Helper()
		// Filters with room for every key: none fills up and is rebuilt.
		ix, err := Open(Options{Dir: dir, Horizon: time.Hour, filterKeys: 100_000})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ix.Close() })
		if _, err := os.Stat(file); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%s: the filter's file is still there after Open (%v)", when, err)
		}
		waitFilter(t, ix)
		// The filter in use came from a scan of every key, or from the file.
		want := int64(0)
		if wantScan {
			want = int64(len(all))
		}
		if scanned := ix.scanned.Load(); scanned != want {
			t.Fatalf("%s: %d keys scanned for the filter, want %d", when, scanned, want)
		}
		if n := countHeld(t, ix, all, now); n != len(all) {
			t.Fatalf("%s: held %d of %d", when, n, len(all))
		}
		if n := countHeld(t, ix, keys("absent", 20_000), now); n != 0 {
			t.Fatalf("%s: held %d never added", when, n)
		}
		return ix
	}
	add := func(ix *Index, ks []Key) {
		t.Helper()
		if err := ix.Add(ks, now, Mark{Store: "s", Through: now}); err != nil {
			t.Fatal(err)
		}
		all = append(all, ks...)
	}
	// What the last Close saved: the file, and its filter's counts.
	var added, capacity int64
	closeIndex := func(ix *Index) []byte {
		t.Helper()
		if err := ix.Close(); err != nil {
			t.Fatal(err)
		}
		saved, err := os.ReadFile(file)
		if err != nil {
			t.Fatalf("no filter saved at Close: %v", err)
		}
		added, capacity = ix.filter.added.Load(), ix.filter.capacity
		return saved
	}
	// A filter read back has the counts it was saved with.
	sameCounts := func(ix *Index, when string) {
		t.Helper()
		ix.mu.Lock()
		defer ix.mu.Unlock()
		if ix.filter.added.Load() != added || ix.filter.capacity != capacity {
			t.Fatalf("%s: filter of %d keys added, capacity %d; saved with %d and %d", when,
				ix.filter.added.Load(), ix.filter.capacity, added, capacity)
		}
	}

	ix := reopen("new", true) // a scan of nothing
	add(ix, keys("a", 3000))
	loadAt(t, ix, keys("loaded", 20_000), now)
	all = append(all, keys("loaded", 20_000)...)
	waitFilter(t, ix)
	closeIndex(ix)

	// A temporary file left by a save cut short is removed too.
	if err := os.WriteFile(file+".tmp", []byte("cut short"), 0o644); err != nil {
		t.Fatal(err)
	}
	ix = reopen("reopened", false)
	sameCounts(ix, "reopened")
	if _, err := os.Stat(file + ".tmp"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the temporary file is still there after Open (%v)", err)
	}
	add(ix, keys("b", 3000))
	stale := closeIndex(ix)

	ix = reopen("reopened again", false)
	add(ix, keys("c", 3000)) // not in the stale filter
	saved := closeIndex(ix)
	if err := os.WriteFile(file, stale, 0o644); err != nil {
		t.Fatal(err)
	}
	ix = reopen("with the filter of other generations", true)
	closeIndex(ix)

	corrupt := bytes.Clone(saved)
	corrupt[len(corrupt)/2] ^= 0x10
	if err := os.WriteFile(file, corrupt, 0o644); err != nil {
		t.Fatal(err)
	}
	ix = reopen("with a corrupted filter", true)
	saved = closeIndex(ix)
	if err := os.WriteFile(file, saved[:len(saved)-1], 0o644); err != nil {
		t.Fatal(err)
	}
	ix = reopen("with a torn filter", true)
	closeIndex(ix)
	ix = reopen("after a clean close", false)
	sameCounts(ix, "after a clean close")

	// A crash: a copy of the open index's directory, with no filter.
	crashed := t.TempDir()
	if out, err := exec.Command("cp", "-a", dir+"/.", crashed).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	closeIndex(ix)
	dir, file = crashed, filepath.Join(crashed, filterFile)
	ix = reopen("after a crash", true)

	// An index without a filter saves none.
	if err := ix.Close(); err != nil {
		t.Fatal(err)
	}
	none, err := Open(Options{Dir: dir, Horizon: time.Hour, noFilter: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := none.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(file); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("an index without a filter saved one (%v)", err)
	}
}

// A filter saved for as many generations as the LSM holds, but not the
// same ones, is not used: here Expire deleted one and a spill wrote
// another with as many keys.
func TestFilterOfOtherGenerations(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, filterFile)
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	old := now.Add(-3 * time.Hour)
	x, y, z := keys("x", 3000), keys("y", 3000), keys("z", 3000)
	step := func(ix *Index, err error) *Index {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return ix
	}
	reopen := func() *Index {
		t.Helper()
		ix := step(Open(Options{Dir: dir, Horizon: time.Hour, filterKeys: 100_000}))
		t.Cleanup(func() { ix.Close() })
		waitFilter(t, ix)
		return ix
	}
	ix := reopen()
	step(ix, ix.Add(x, old, Mark{Store: "s", Through: old}))
	step(ix, ix.Flush())
	step(ix, ix.Add(y, now, Mark{Store: "s", Through: now}))
	step(ix, ix.Close())
	saved, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}

	ix = reopen()
	if n, err := ix.Expire(context.Background(), now); err != nil || n != len(x) {
		t.Fatalf("Expire deleted %d keys (%v), want the %d of x", n, err, len(x))
	}
	step(ix, ix.Add(z, now, Mark{Store: "s", Through: now}))
	step(ix, ix.Close())
	if len(ix.gens) != 2 {
		t.Fatalf("%d generations after Expire and a spill, want 2 as before", len(ix.gens))
	}
	if err := os.WriteFile(file, saved, 0o644); err != nil {
		t.Fatal(err)
	}

	ix = reopen()
	if ix.scanned.Load() != int64(len(y)+len(z)) {
		t.Fatalf("scanned %d keys, want the %d of y and z: a filter of other generations was used", ix.scanned.Load(), len(y)+len(z))
	}
	if n := countHeld(t, ix, z, now); n != len(z) {
		t.Fatalf("held %d of the %d keys of the newest generation", n, len(z))
	}
}

// The mapping of keys to bits is part of the saved filter's format: a
// change to it must change filterMagic, then these words.
func TestFilterLayout(t *testing.T) {
	f := newFilter(1)
	k := KeyOf("acme", "evt-1")
	f.add(&k)
	var words [8]uint64
	for i := range words {
		words[i] = f.words[i].Load()
	}
	want := [8]uint64{0, 0x10000000000, 0x10, 0x8000002, 0x100000200000, 0x100000000000, 0, 0}
	if words != want || filterMagic != [8]byte{'m', 'e', 't', 'e', 'r', 'd', 'f', '1'} {
		t.Fatalf("a key's bits are %#x (format %q), want %#x: if the mapping changed, change filterMagic and this test", words, filterMagic[:], want)
	}
}

// The index says at Info what its filter cost an operator: saved at
// Close, read back at Open (or built by a scan), with keys and durations.
func TestFilterLogs(t *testing.T) {
	dir := t.TempDir()
	var logs bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&logs, nil))
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	for i := range 2 {
		ix, err := Open(Options{Dir: dir, Horizon: time.Hour, Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		waitFilter(t, ix)
		if err := ix.Add(keys(fmt.Sprint("round", i), 500), now, Mark{Store: "s", Through: now}); err != nil {
			t.Fatal(err)
		}
		if err := ix.Close(); err != nil {
			t.Fatal(err)
		}
	}
	var lines []string
	for l := range strings.Lines(logs.String()) {
		var rec struct {
			Level, Msg, Component string
			Keys                  *int64
		}
		if err := json.Unmarshal([]byte(l), &rec); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		if rec.Level == "INFO" && rec.Component == "keyindex" && rec.Keys != nil {
			lines = append(lines, fmt.Sprintf("%s %d", rec.Msg, *rec.Keys))
		}
	}
	want := []string{"filter: built by a scan 0", "filter: saved 500", "filter: read back 500", "filter: saved 1000"}
	if !slices.Equal(lines, want) {
		t.Fatalf("Info lines with keys:\n%s\nwant:\n%s\nall logs:\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"), logs.String())
	}
}
