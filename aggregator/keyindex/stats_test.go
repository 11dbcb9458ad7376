package keyindex

import (
	"testing"
	"time"
)

// Stats follows keys from memory to disk, and a build's scan.
func TestStats(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	ix := open(t, dir, time.Hour)
	if err := ix.Add(keys("a", 10), now, Mark{Store: "s", Through: now}); err != nil {
		t.Fatal(err)
	}
	if st := ix.Stats(); st.Recent != 10 || st.Keys != 0 || st.Generations != 0 {
		t.Fatalf("before a spill: %+v, want 10 recent keys, none on disk", st)
	}
	if err := ix.Flush(); err != nil {
		t.Fatal(err)
	}
	if st := ix.Stats(); st.Recent != 0 || st.Keys != 10 || st.Generations != 1 {
		t.Fatalf("after a spill: %+v, want 10 keys on disk in 1 generation", st)
	}
	// A filter dropped is built again by a scan of the keys on disk (once
	// the build of Open, which scanned nothing, is over).
	waitFilter(t, ix)
	ix.mu.Lock()
	ix.filter = nil
	ix.startBuild(0)
	ix.mu.Unlock()
	waitFilter(t, ix)
	if st := ix.Stats(); st.Scanned != 10 || st.FilterKeys != 10 || st.Building {
		t.Fatalf("after a build: %+v, want 10 keys scanned into the filter", st)
	}
	if err := ix.Close(); err != nil {
		t.Fatal(err)
	}
}
