package gate

import (
	"hash/maphash"
	"math/bits"
)

// Sizing of the pages of a snapshot.
const (
	// pageTarget is the mean number of blocks per page a snapshot is
	// built for: a change copies one page, so this bounds its cost.
	pageTarget = 128
	// pageMax is the mean above which a change builds the snapshot anew
	// with twice (or more) the pages: the rebuild costs O(blocked) and
	// happens once per doubling of the blocks, so it adds O(1) per change.
	pageMax = 4 * pageTarget
)

// snapshot is one immutable state of the blocklist: the blocks, split into
// pages by a hash of the tenant, so that a change copies only the pages it
// touches and the pointers to the others, never every block (with 100k
// blocked tenants, copying them all for every update cost milliseconds
// each; see "Many tenants" in the root BENCHMARKS.md).
//
// Each page is an open-addressing hash table probed linearly from the same
// hash that chose the page, so Check hashes the tenant once: one hash, one
// page, usually one slot.
type snapshot struct {
	seed    maphash.Seed // the gate's: every snapshot of a gate hashes alike
	pages   []*page      // len a power of 2; never modified once stored
	shift   uint8        // a hash's page is hash >> shift (64 with one page: 0)
	blocked int          // blocks held, over all pages
	version uint64
}

// page is some of a snapshot's blocks: an open-addressing table at most
// half full, so a probe always ends at an empty slot.
type page struct {
	slots []slot // len a power of 2
	n     int    // slots in use
}

// slot holds one block; block is nil in an empty slot.
type slot struct {
	hash   uint64
	tenant string
	block  *Block
}

// entry is a change to a page: the block to hold for tenant, nil for none.
type entry struct {
	hash   uint64
	tenant string
	block  *Block
}

// emptyPage is the page of a snapshot holding nothing in its range.
var emptyPage = &page{slots: make([]slot, 1)}

// newSnapshot returns an empty snapshot hashing with seed.
func newSnapshot(seed maphash.Seed) *snapshot {
	return &snapshot{seed: seed, pages: []*page{emptyPage}, shift: 64}
}

// pagesFor returns the number of pages to build for n blocks: a power of
// 2 giving about pageTarget blocks each.
func pagesFor(n int) int {
	if n <= pageTarget {
		return 1
	}
	return 1 << bits.Len(uint((n-1)/pageTarget))
}

// hash returns tenant's hash.
func (s *snapshot) hash(tenant string) uint64 { return maphash.String(s.seed, tenant) }

// pageOf returns the index of the page of hash h.
func (s *snapshot) pageOf(h uint64) int { return int(h >> s.shift) }

// get returns tenant's block, or nil. It allocates nothing.
func (s *snapshot) get(tenant string) *Block {
	h := s.hash(tenant)
	p := s.pages[h>>s.shift]
	mask := uint64(len(p.slots) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		sl := &p.slots[i]
		if sl.block == nil {
			return nil
		}
		if sl.hash == h && sl.tenant == tenant {
			return sl.block
		}
	}
}

// each calls f for every block held.
func (s *snapshot) each(f func(tenant string, b *Block)) {
	for _, p := range s.pages {
		for _, sl := range p.slots {
			if sl.block != nil {
				f(sl.tenant, sl.block)
			}
		}
	}
}

// newPage returns a page of entries (their blocks not nil, their tenants
// distinct).
func newPage(entries []entry) *page {
	if len(entries) == 0 {
		return emptyPage
	}
	p := &page{slots: make([]slot, 1<<bits.Len(uint(2*len(entries)-1))), n: len(entries)}
	mask := uint64(len(p.slots) - 1)
	for _, e := range entries {
		i := e.hash & mask
		for p.slots[i].block != nil {
			i = (i + 1) & mask
		}
		p.slots[i] = slot{hash: e.hash, tenant: e.tenant, block: e.block}
	}
	return p
}

// find returns the block p holds for tenant of hash h, or nil.
func (p *page) find(h uint64, tenant string) *Block {
	mask := uint64(len(p.slots) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		sl := &p.slots[i]
		if sl.block == nil || (sl.hash == h && sl.tenant == tenant) {
			return sl.block
		}
	}
}

// with returns p with changes applied (distinct tenants), or p itself when
// they change nothing.
func (p *page) with(changes []entry) *page {
	noop := true
	for _, c := range changes {
		if p.find(c.hash, c.tenant) != c.block {
			noop = false
			break
		}
	}
	if noop {
		return p
	}
	changed := func(sl slot) bool {
		for _, c := range changes {
			if c.hash == sl.hash && c.tenant == sl.tenant {
				return true
			}
		}
		return false
	}
	if len(changes) > 8 {
		set := make(map[string]bool, len(changes))
		for _, c := range changes {
			set[c.tenant] = true
		}
		changed = func(sl slot) bool { return set[sl.tenant] }
	}
	entries := make([]entry, 0, p.n+len(changes))
	for _, sl := range p.slots {
		if sl.block != nil && !changed(sl) {
			entries = append(entries, entry(sl))
		}
	}
	for _, c := range changes {
		if c.block != nil {
			entries = append(entries, c)
		}
	}
	return newPage(entries)
}

// built returns a snapshot of blocks (tenant → block; nil entries are
// skipped) at version, hashing with seed.
func built(seed maphash.Seed, blocks map[string]*Block, version uint64) *snapshot {
	n := 0
	for _, b := range blocks {
		if b != nil {
			n++
		}
	}
	pages := pagesFor(n)
	s := &snapshot{seed: seed, pages: make([]*page, pages), shift: uint8(64 - bits.TrailingZeros(uint(pages))), blocked: n, version: version}
	byPage := make([][]entry, pages)
	for t, b := range blocks {
		if b == nil {
			continue
		}
		h := s.hash(t)
		i := s.pageOf(h)
		byPage[i] = append(byPage[i], entry{hash: h, tenant: t, block: b})
	}
	for i, es := range byPage {
		s.pages[i] = newPage(es)
	}
	return s
}

// with returns a copy of s with changes applied (tenant → block to hold;
// nil = none) at version. It copies the pages changes touch and shares the
// others: O(len(s.pages) + len(changes)·pageTarget) rather than
// O(blocked), unless the blocks outgrow the pages, when it builds anew.
func (s *snapshot) with(changes map[string]*Block, version uint64) *snapshot {
	next := &snapshot{seed: s.seed, pages: make([]*page, len(s.pages)), shift: s.shift, blocked: s.blocked, version: version}
	copy(next.pages, s.pages)
	byPage := map[int][]entry{}
	for t, b := range changes {
		h := s.hash(t)
		i := s.pageOf(h)
		byPage[i] = append(byPage[i], entry{hash: h, tenant: t, block: b})
	}
	for i, es := range byPage {
		p := s.pages[i].with(es)
		next.pages[i] = p
		next.blocked += p.n - s.pages[i].n
	}
	if next.blocked > pageMax*len(next.pages) {
		all := make(map[string]*Block, next.blocked)
		next.each(func(t string, b *Block) { all[t] = b })
		return built(s.seed, all, version)
	}
	return next
}
