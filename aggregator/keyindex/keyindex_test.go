package keyindex

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/sstable"
)

func open(t testing.TB, dir string, horizon time.Duration) *Index {
	t.Helper()
	ix, err := Open(Options{Dir: dir, Horizon: horizon})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ix.Close() })
	return ix
}

func keys(prefix string, n int) []Key {
	ks := make([]Key, n)
	for i := range ks {
		ks[i] = KeyOf("tenant-a", fmt.Sprintf("%s-%d", prefix, i))
	}
	return ks
}

func countHeld(t testing.TB, ix *Index, ks []Key, now time.Time) int {
	t.Helper()
	held, err := ix.Held(ks, now)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, h := range held {
		if h {
			n++
		}
	}
	return n
}

func TestKeyOfSeparatesTenantAndID(t *testing.T) {
	if KeyOf("a", "bc") == KeyOf("ab", "c") {
		t.Fatal("(a, bc) and (ab, c) share a key")
	}
	if KeyOf("a", "b") != KeyOf("a", "b") {
		t.Fatal("KeyOf is not deterministic")
	}
	long := string(make([]byte, 1000)) // longer than the stack buffer
	if KeyOf("a", long) == KeyOf("a", long+"x") {
		t.Fatal("long ids share a key")
	}
}

func TestAddHeldMarkAndReopen(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	ix := open(t, dir, time.Hour)
	if _, ok, err := ix.Mark(); err != nil || ok {
		t.Fatalf("a new index has a mark: ok=%v err=%v", ok, err)
	}
	in, out := keys("in", 1000), keys("out", 1000)
	mark := Mark{Store: "s1", Through: now}
	if err := ix.Add(in, now, mark); err != nil {
		t.Fatal(err)
	}
	held, err := ix.Held(append(append([]Key{}, in[:10]...), out[:10]...), now)
	if err != nil {
		t.Fatal(err)
	}
	for i, h := range held {
		if h != (i < 10) {
			t.Fatalf("key %d: held %v", i, h)
		}
	}
	if n := countHeld(t, ix, in, now); n != 1000 {
		t.Fatalf("held %d of the 1000 added", n)
	}
	if n := countHeld(t, ix, out, now); n != 0 {
		t.Fatalf("held %d of 1000 never added", n)
	}
	if err := ix.Close(); err != nil {
		t.Fatal(err)
	}
	ix = open(t, dir, time.Hour)
	if n := countHeld(t, ix, in, now); n != 1000 {
		t.Fatalf("after reopening: held %d of 1000", n)
	}
	m, ok, err := ix.Mark()
	if err != nil || !ok || m.Store != "s1" || !m.Through.Equal(now) {
		t.Fatalf("mark after reopening: %+v ok=%v err=%v", m, ok, err)
	}
	if err := ix.Reset(); err != nil {
		t.Fatal(err)
	}
	if n := countHeld(t, ix, in, now); n != 0 {
		t.Fatalf("after Reset: held %d", n)
	}
	if _, ok, _ := ix.Mark(); ok {
		t.Fatal("after Reset: a mark is left")
	}
}

// A key is held until the horizon after the end of the minute it was added
// in, whether or not Expire ran; Expire deletes exactly the expired keys and
// a key added again is held again.
func TestHorizon(t *testing.T) {
	ix := open(t, t.TempDir(), time.Hour)
	t0 := time.Date(2026, 12, 6, 10, 0, 30, 0, time.UTC)
	old, recent := keys("old", 500), keys("recent", 500)
	if err := ix.Add(old, t0, Mark{}); err != nil {
		t.Fatal(err)
	}
	if err := ix.Add(recent, t0.Add(30*time.Minute), Mark{}); err != nil {
		t.Fatal(err)
	}
	end := time.Date(2026, 12, 6, 11, 1, 0, 0, time.UTC) // minute 10:00 + 1 min + 1 h
	if n := countHeld(t, ix, old, end.Add(-time.Nanosecond)); n != 500 {
		t.Fatalf("just inside the horizon: held %d of 500", n)
	}
	if n := countHeld(t, ix, old, end); n != 0 {
		t.Fatalf("at the horizon: held %d of 500", n)
	}
	deleted, err := ix.Expire(context.Background(), end)
	if err != nil {
		t.Fatal(err)
	}
	if deleted != 500 {
		t.Fatalf("Expire deleted %d, want the 500 expired", deleted)
	}
	if n := countHeld(t, ix, recent, end); n != 500 {
		t.Fatalf("Expire removed recent keys: held %d of 500", n)
	}
	if err := ix.Add(old[:100], end, Mark{}); err != nil {
		t.Fatal(err)
	}
	if n := countHeld(t, ix, old, end); n != 100 {
		t.Fatalf("re-added: held %d, want 100", n)
	}
}

// A bulk load holds exactly the keys loaded, keeps the latest minute of a
// key loaded twice, adds to what the index held and records its mark.
func TestLoader(t *testing.T) {
	dir := t.TempDir()
	ix := open(t, dir, time.Hour)
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	before := keys("before", 300)
	if err := ix.Add(before, now, Mark{Store: "x"}); err != nil {
		t.Fatal(err)
	}
	l, err := ix.NewLoader()
	if err != nil {
		t.Fatal(err)
	}
	loaded := keys("loaded", 20_000)
	for _, k := range loaded {
		l.Add(k, now.Add(-2*time.Hour)) // expired at now
	}
	for _, k := range loaded[:5000] {
		l.Add(k, now) // again, later: held
	}
	if l.Len() != 25_000 {
		t.Fatalf("Len %d", l.Len())
	}
	if err := l.Finish(context.Background(), Mark{Store: "s2", Through: now}); err != nil {
		t.Fatal(err)
	}
	if n := countHeld(t, ix, loaded, now); n != 5000 {
		t.Fatalf("held %d of the loaded keys, want the 5000 loaded with a live minute", n)
	}
	if n := countHeld(t, ix, loaded, now.Add(-time.Hour)); n != 20_000 {
		t.Fatalf("an hour earlier: held %d, want 20000", n)
	}
	if n := countHeld(t, ix, before, now); n != 300 {
		t.Fatalf("keys added before the load: held %d of 300", n)
	}
	if m, _, _ := ix.Mark(); m.Store != "s2" {
		t.Fatalf("mark %+v", m)
	}
	left, _ := filepath.Glob(filepath.Join(dir, "load-*"))
	if len(left) != 0 {
		t.Fatalf("loader files left: %v", left)
	}
}

func TestLoaderAbortLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	ix := open(t, dir, time.Hour)
	l, err := ix.NewLoader()
	if err != nil {
		t.Fatal(err)
	}
	l.Add(KeyOf("t", "1"), time.Now())
	l.Abort()
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			t.Fatalf("left %s", e.Name())
		}
	}
	if n := countHeld(t, ix, []Key{KeyOf("t", "1")}, time.Now()); n != 0 {
		t.Fatal("an aborted load added a key")
	}
}

// loadRandom fills ix with n distinct keys in bulk.
func loadRandom(b testing.TB, ix *Index, n int, at time.Time) {
	l, err := ix.NewLoader()
	if err != nil {
		b.Fatal(err)
	}
	var k Key
	for i := range n {
		binary.BigEndian.PutUint64(k[:], uint64(i))
		l.Add(KeyOf("bench", string(k[:8])), at)
	}
	if err := l.Finish(context.Background(), Mark{Store: "bench"}); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkHeld looks up batches of 50 000 keys (absent, as new events are,
// or present, as a redelivered batch is) in indexes of 1 and 10 million
// keys. ns/op is per batch; ns/key is per key.
func BenchmarkHeld(b *testing.B) {
	for _, size := range []int{1_000_000, 10_000_000} {
		ix := open(b, b.TempDir(), time.Hour)
		now := time.Now()
		loadRandom(b, ix, size, now)
		absent := keys("absent", 50_000)
		var present []Key
		var k Key
		for i := range 50_000 {
			binary.BigEndian.PutUint64(k[:], uint64(i*(size/50_000)))
			present = append(present, KeyOf("bench", string(k[:8])))
		}
		for _, c := range []struct {
			name string
			ks   []Key
			want int
		}{{"absent", absent, 0}, {"present", present, 50_000}} {
			b.Run(fmt.Sprintf("%s/keys=%d", c.name, size), func(b *testing.B) {
				for b.Loop() {
					if n := countHeld(b, ix, c.ks, now); n != c.want {
						b.Fatalf("held %d, want %d", n, c.want)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(c.ks)), "ns/key")
			})
		}
	}
}

// BenchmarkSteady runs the aggregator's use of the index at a steady state:
// an index bulk-loaded with METERD_BENCH_KEYS keys (default 10 million)
// takes rounds of 10 000 new events, each keyed (KeyOf), looked up (Held,
// all absent) and added (Add), as a write of a catch-up flush does. Flushes
// and compactions run in the background, so besides wall time per key it
// reports the process's CPU time per key (user and system, every goroutine).
// Variants of the LSM's options run in the same process, for A/B.
func BenchmarkSteady(b *testing.B) {
	size := benchKeys(b)
	const round = 10_000
	type variant struct {
		name     string
		tune     func(*pebble.Options)
		buffer   int64 // BufferBytes; 0 for the default
		nofilter bool
	}
	variants := []variant{
		{name: "current"},
		// Tables not compressed.
		{name: "nocompress", tune: func(o *pebble.Options) {
			for i := range o.Levels {
				o.Levels[i].Compression = func() *sstable.CompressionProfile { return sstable.NoCompression }
			}
		}},
		// Bloom filters of 16 bits a key (1.6 times the memory).
		{name: "bloom16", tune: func(o *pebble.Options) {
			for i := range o.Levels {
				o.Levels[i].FilterPolicy = bloom.FilterPolicy(16)
			}
		}},
		// A buffer of 128 MiB.
		{name: "buffer128", buffer: 128 << 20},
		// Buffers of 256 and 512 MiB.
		{name: "buffer256", buffer: 256 << 20},
		{name: "buffer512", buffer: 512 << 20},
		// A buffer of 128 MiB, and L0 compacted after 8 spills.
		{name: "buffer128-l0x8", buffer: 128 << 20, tune: func(o *pebble.Options) {
			o.L0CompactionThreshold, o.L0StopWritesThreshold = 8, 32
		}},
		// L0 compacted into the base level after 8 spills, not 4.
		{name: "l0x8", tune: func(o *pebble.Options) {
			o.L0CompactionThreshold, o.L0StopWritesThreshold = 8, 32
		}},
		// Without the in-memory filter: every lookup probes the LSM.
		{name: "nofilter", nofilter: true},
		// Levels 4 times (not 10 times) the one above.
		{name: "mult4", tune: func(o *pebble.Options) { o.Experimental.LevelMultiplier = 4 }},
	}
	if only := os.Getenv("METERD_BENCH_VARIANTS"); only != "" {
		variants = slices.DeleteFunc(variants, func(v variant) bool {
			return !slices.Contains(strings.Split(only, ","), v.name)
		})
	}
	for _, v := range variants {
		b.Run(fmt.Sprintf("%s/keys=%d", v.name, size), func(b *testing.B) {
			ix, err := Open(Options{Dir: b.TempDir(), Horizon: time.Hour, BufferBytes: v.buffer, tune: v.tune, noFilter: v.nofilter})
			if err != nil {
				b.Fatal(err)
			}
			defer ix.Close()
			now := time.Now()
			loadRandom(b, ix, size, now)
			if !v.nofilter {
				waitFilter(b, ix) // the steady state has one
			}
			ks := make([]Key, round)
			var id [8]byte
			next := uint64(1) << 40
			cpu0 := cpuTime(b)
			b.ResetTimer()
			for b.Loop() {
				for i := range ks {
					binary.BigEndian.PutUint64(id[:], next)
					next++
					ks[i] = KeyOf("bench", string(id[:]))
				}
				if n := countHeld(b, ix, ks, now); n != 0 {
					b.Fatalf("held %d new keys", n)
				}
				if err := ix.Add(ks, now, Mark{Store: "bench", Through: now}); err != nil {
					b.Fatal(err)
				}
			}
			// The compactions and merges the rounds started are part of
			// their cost.
			for quiet := 0; quiet < 2; time.Sleep(100 * time.Millisecond) {
				ix.mu.Lock()
				merging := ix.mergeIn != nil
				ix.mu.Unlock()
				if ix.db.Metrics().Compact.NumInProgress == 0 && !merging {
					quiet++
				} else {
					quiet = 0
				}
			}
			b.StopTimer()
			keys := float64(b.N * round)
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/keys, "ns/key")
			b.ReportMetric(float64((cpuTime(b)-cpu0).Nanoseconds())/keys, "cpu-ns/key")
		})
	}
}

// benchKeys returns METERD_BENCH_KEYS, or 10 million.
func benchKeys(b *testing.B) int {
	if v := os.Getenv("METERD_BENCH_KEYS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			b.Fatal(err)
		}
		return n
	}
	return 10_000_000
}

// BenchmarkReopen reopens an index bulk-loaded with METERD_BENCH_KEYS keys
// (default 10 million) and waits for its in-memory filter: read from the
// file Close saved it in ("saved"), or built by a scan of every key
// ("scan", the file removed first). It reports the wall and process CPU
// time from Open until the filter is in use, and Close's time (which saves
// the filter, both ways).
func BenchmarkReopen(b *testing.B) {
	size := benchKeys(b)
	dir := b.TempDir()
	ix := open(b, dir, time.Hour)
	now := time.Now()
	loadRandom(b, ix, size, now)
	waitFilter(b, ix)
	if err := ix.Close(); err != nil {
		b.Fatal(err)
	}
	for _, scan := range []bool{true, false} {
		name := "saved"
		if scan {
			name = "scan"
		}
		b.Run(fmt.Sprintf("%s/keys=%d", name, size), func(b *testing.B) {
			var ready, cpu, closing time.Duration
			for b.Loop() {
				if scan {
					if err := os.Remove(filepath.Join(dir, filterFile)); err != nil {
						b.Fatal(err)
					}
				}
				start, cpu0 := time.Now(), cpuTime(b)
				ix, err := Open(Options{Dir: dir, Horizon: time.Hour})
				if err != nil {
					b.Fatal(err)
				}
				waitFilter(b, ix)
				ready += time.Since(start)
				cpu += cpuTime(b) - cpu0
				if !scan && ix.scanned.Load() != 0 {
					b.Fatalf("scanned %d keys with the filter saved", ix.scanned.Load())
				}
				// Keys loaded are held, through the filter; others are not.
				ix.mu.Lock()
				f := ix.filter
				ix.mu.Unlock()
				var k Key
				for i := range 1000 {
					binary.BigEndian.PutUint64(k[:], uint64(i*(size/1000)))
					if present, absent := KeyOf("bench", string(k[:8])), KeyOf("absent", string(k[:8])); !f.mayContain(&present) ||
						countHeld(b, ix, []Key{present, absent}, now) != 1 {
						b.Fatalf("key %d of the index not held, or a key never added held", i*(size/1000))
					}
				}
				start = time.Now()
				if err := ix.Close(); err != nil {
					b.Fatal(err)
				}
				closing += time.Since(start)
			}
			n := float64(b.N)
			b.ReportMetric(ready.Seconds()*1000/n, "ms-to-filter")
			b.ReportMetric(cpu.Seconds()*1000/n, "cpu-ms-to-filter")
			b.ReportMetric(closing.Seconds()*1000/n, "ms-close")
		})
	}
}

// cpuTime is the process's CPU time so far, user and system.
func cpuTime(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// waitSpill waits for the spill under way, if any.
func waitSpill(ix *Index) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	for ix.writing {
		ix.written.Wait()
	}
}

// Keys stay held while spills write them in the background, and Adds go on
// meanwhile: every key added is held at every moment after its Add, and
// all of them, with the last Mark, after a reopening.
func TestHeldWhileSpilling(t *testing.T) {
	dir := t.TempDir()
	// A small filter first: it fills up, and new ones are built meanwhile.
	ix, err := Open(Options{Dir: dir, Horizon: time.Hour, BufferBytes: 2 * 1000 * bufferBytesPerKey, filterKeys: 1000})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	var (
		mu    sync.Mutex
		added []Key
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 200 {
			ks := keys(fmt.Sprintf("g%d-", i), 250)
			if err := ix.Add(ks, now, Mark{Store: "s", Through: now.Add(time.Duration(i) * time.Second)}); err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			added = append(added, ks...)
			mu.Unlock()
		}
	}()
	for checking := true; checking; {
		select {
		case <-done:
			checking = false
		default:
		}
		mu.Lock()
		ks := slices.Clone(added)
		mu.Unlock()
		if n := countHeld(t, ix, ks, now); n != len(ks) {
			t.Fatalf("held %d of the %d keys added", n, len(ks))
		}
	}
	if f := waitFilter(t, ix); f.capacity < 200*250 {
		t.Fatalf("filter of capacity %d: never rebuilt as it filled up", f.capacity)
	}
	if n := countHeld(t, ix, keys("absent", 10_000), now); n != 0 {
		t.Fatalf("held %d keys never added", n)
	}
	if err := ix.Close(); err != nil {
		t.Fatal(err)
	}
	again := open(t, dir, time.Hour)
	if n := countHeld(t, again, added, now); n != 200*250 {
		t.Fatalf("after reopening: held %d of %d", n, 200*250)
	}
	if m, ok, err := again.Mark(); err != nil || !ok || !m.Through.Equal(now.Add(199*time.Second)) {
		t.Fatalf("mark after reopening: %+v ok=%v err=%v, want the last Add's", m, ok, err)
	}
}

// The recent keys are spilled when they reach half of BufferBytes, with the
// Mark of the Add that made them reach it; a crash (here: a copy of the
// directory taken while the index is open) keeps exactly the spilled keys
// and their Mark, never keys beyond what the Mark read back says.
func TestSpillKeepsTheMarkWithItsKeys(t *testing.T) {
	dir := t.TempDir()
	ix, err := Open(Options{Dir: dir, Horizon: time.Hour, BufferBytes: 2 * 100 * bufferBytesPerKey})
	if err != nil {
		t.Fatal(err)
	}
	defer ix.Close()
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	a, b, c := keys("a", 60), keys("b", 60), keys("c", 30)
	for i, ks := range [][]Key{a, b, c} { // a: 60 kept; b: 120 spilled; c: 30 kept
		if err := ix.Add(ks, now, Mark{Store: "s", Through: now.Add(time.Duration(i) * time.Minute)}); err != nil {
			t.Fatal(err)
		}
	}
	// The spill b started runs in the background; the crash comes after it.
	waitSpill(ix)
	if m, ok, err := ix.Mark(); err != nil || !ok || !m.Through.Equal(now.Add(2*time.Minute)) {
		t.Fatalf("mark while open: %+v ok=%v err=%v", m, ok, err)
	}
	if n := countHeld(t, ix, append(append(append([]Key{}, a...), b...), c...), now); n != 150 {
		t.Fatalf("held %d of 150 while open", n)
	}
	crashed := t.TempDir()
	if out, err := exec.Command("cp", "-a", dir+"/.", crashed).CombinedOutput(); err != nil {
		t.Fatalf("copy: %v: %s", err, out)
	}
	after := open(t, crashed, time.Hour)
	m, ok, err := after.Mark()
	if err != nil || !ok || !m.Through.Equal(now.Add(time.Minute)) {
		t.Fatalf("mark after the crash: %+v ok=%v err=%v, want the second Add's", m, ok, err)
	}
	if n := countHeld(t, after, append(append([]Key{}, a...), b...), now); n != 120 {
		t.Fatalf("after the crash: held %d of the 120 spilled", n)
	}
	if n := countHeld(t, after, c, now); n != 0 {
		t.Fatalf("after the crash: held %d of the 30 never spilled", n)
	}
	// A key added again keeps its latest minute, in memory and spilled.
	later := now.Add(50 * time.Minute)
	if err := ix.Add(a[:1], later, Mark{Store: "s", Through: later}); err != nil {
		t.Fatal(err)
	}
	past := now.Add(61 * time.Minute) // past a's first minute's horizon, inside its second's
	if n := countHeld(t, ix, a[:2], past); n != 1 {
		t.Fatalf("in memory: held %d of [re-added, not re-added], want 1", n)
	}
	if err := ix.Flush(); err != nil {
		t.Fatal(err)
	}
	if n := countHeld(t, ix, a[:2], past); n != 1 {
		t.Fatalf("spilled: held %d of [re-added, not re-added], want 1", n)
	}
	if names, _ := filepath.Glob(filepath.Join(dir, spillPrefix+"*")); len(names) != 0 {
		t.Fatalf("spill tables left: %v", names)
	}
}
