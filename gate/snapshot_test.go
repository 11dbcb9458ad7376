package gate

import (
	"fmt"
	"hash/maphash"
	"math/rand/v2"

	"github.com/nats-io/nats.go/jetstream"
	"testing"
)

// A snapshot built by a sequence of changes holds exactly what a plain map
// given the same changes holds, through growths of its pages.
func TestSnapshotWithMatchesMap(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	blocks := make([]*Block, 8)
	for i := range blocks {
		blocks[i] = &Block{Status: 402 + i}
	}
	s := newSnapshot(maphash.MakeSeed())
	model := map[string]*Block{}
	for step := range 400 {
		changes := map[string]*Block{}
		for range rng.IntN(64) + 1 {
			t := fmt.Sprintf("t%d", rng.IntN(5000))
			var b *Block
			if rng.IntN(4) > 0 || step < 150 { // grow first, then churn
				b = blocks[rng.IntN(len(blocks))]
			}
			changes[t] = b
		}
		for t, b := range changes {
			if b == nil {
				delete(model, t)
			} else {
				model[t] = b
			}
		}
		prev := s
		s = s.with(changes, uint64(step))
		if s.blocked != len(model) {
			t.Fatalf("step %d: snapshot holds %d blocks, the model %d", step, s.blocked, len(model))
		}
		for tenant, b := range model {
			if got := s.get(tenant); got != b {
				t.Fatalf("step %d: get(%s) = %p, want %p", step, tenant, got, b)
			}
		}
		for tenant := range changes {
			if model[tenant] == nil && s.get(tenant) != nil {
				t.Fatalf("step %d: %s still blocked", step, tenant)
			}
		}
		if prev.blocked > 0 && s == prev {
			t.Fatal("with modified the snapshot in place")
		}
	}
	if n := len(s.pages); n < len(model)/pageMax || n > 2*len(model)/pageTarget+1 {
		t.Errorf("%d pages for %d blocks", n, len(model))
	}
	got := 0
	s.each(func(string, *Block) { got++ })
	if got != len(model) {
		t.Errorf("each visits %d blocks, want %d", got, len(model))
	}
}

// An update copies only the page it touches: every other page of the new
// snapshot is the old one's, and the old snapshot is unchanged.
func TestSnapshotWithCopiesOnePage(t *testing.T) {
	all := map[string]*Block{}
	b := &Block{Status: 402}
	for i := range 100_000 {
		all[fmt.Sprintf("tenant-%06d", i)] = b
	}
	s := built(maphash.MakeSeed(), all, 1)
	if len(s.pages) != pagesFor(100_000) || len(s.pages) < 512 {
		t.Fatalf("%d pages for 100k blocks", len(s.pages))
	}
	for _, change := range []struct {
		tenant string
		b      *Block
	}{{"newcomer", b}, {"tenant-000042", nil}, {"tenant-000043", &Block{Status: 403}}} {
		next := s.with(map[string]*Block{change.tenant: change.b}, 2)
		copied := 0
		at := s.pageOf(s.hash(change.tenant))
		for i := range s.pages {
			if s.pages[i] != next.pages[i] {
				copied++
				if i != at {
					t.Errorf("%s: page %d copied, the change is in page %d", change.tenant, i, at)
				}
			}
		}
		if copied != 1 || next.get(change.tenant) != change.b {
			t.Errorf("%s: %d pages copied, get = %p; want 1, %p", change.tenant, copied, next.get(change.tenant), change.b)
		}
		if s.blocked != 100_000 || s.get("tenant-000042") != b || s.get("newcomer") != nil {
			t.Fatalf("%s: the old snapshot changed", change.tenant)
		}
	}
	// Unblocking a tenant not held, or blocking one with the block it
	// holds, copies nothing.
	for tenant, blk := range map[string]*Block{"nobody": nil, "tenant-000044": b} {
		next := s.with(map[string]*Block{tenant: blk}, 2)
		for i := range s.pages {
			if s.pages[i] != next.pages[i] || next.blocked != s.blocked {
				t.Errorf("%s → %p: page %d copied, %d blocks", tenant, blk, i, next.blocked)
			}
		}
	}
}

func TestPagesFor(t *testing.T) {
	for _, c := range []struct{ n, want int }{{0, 1}, {1, 1}, {128, 1}, {129, 2}, {256, 2}, {257, 4}, {100_000, 1024}, {1_000_000, 8192}} {
		if got := pagesFor(c.n); got != c.want {
			t.Errorf("pagesFor(%d) = %d, want %d", c.n, got, c.want)
		}
	}
}

// Applying live entries through the applier keeps the snapshot and its
// version exact: a put blocks, an older version is ignored, a delete
// unblocks.
func TestApplierLive(t *testing.T) {
	g := offlineGate(t)
	a := &applier{g: g, replaying: true, overlay: map[string]*Block{}}
	var replay []jetstream.KeyValueEntry
	for i := range 1000 {
		replay = append(replay, putEntry(t, fmt.Sprintf("tenant-%04d", i), 10))
	}
	a.apply(append(replay, nil))
	if s := g.snap.Load(); s.blocked != 1000 || s.version != 1000 || len(s.pages) != pagesFor(1000) {
		t.Fatalf("after the replay: %d blocks, version %d, %d pages", s.blocked, s.version, len(s.pages))
	}
	a.apply([]jetstream.KeyValueEntry{putEntry(t, "tenant-0007", 9), delEntry("tenant-0008", 11), putEntry(t, "newcomer", 12)})
	s := g.snap.Load()
	if s.blocked != 1000 || s.version != 1002 {
		t.Errorf("after 2 changes: %d blocks, version %d; want 1000, 1002", s.blocked, s.version)
	}
	if g.Check("tenant-0007").Block.Decision.Version != 10 || g.Check("tenant-0008").Block != nil || g.Check("newcomer").Block == nil {
		t.Errorf("verdicts after the changes: %+v %+v %+v", g.Check("tenant-0007"), g.Check("tenant-0008"), g.Check("newcomer"))
	}
	if got := g.Snapshot(); len(got) != 1000 || got[0].Tenant != "newcomer" || got[999].Tenant != "tenant-0999" {
		t.Errorf("Snapshot: %d decisions, first %s", len(got), got[0].Tenant)
	}
}
