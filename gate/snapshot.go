package gate

import (
	"hash/maphash"
	"maps"
	"math/bits"
)

// Sizing of the shards of a snapshot.
const (
	// shardTarget is the mean number of blocks per shard a snapshot is
	// built for: a change copies one shard, so this bounds its cost.
	shardTarget = 128
	// shardMax is the mean above which a change builds the snapshot anew
	// with twice (or more) the shards: the rebuild costs O(blocked) and
	// happens once per doubling of the blocks, so it adds O(1) per change.
	shardMax = 4 * shardTarget
)

// snapshot is one immutable state of the blocklist: the blocks, split into
// shards by a hash of the tenant, so that a change copies only the shards
// it touches and the pointers to the others, never every block (with 100k
// blocked tenants, copying them all for every update would cost
// milliseconds each; see BENCHMARKS.md "Many tenants"). Check finds a
// tenant with one hash and one lookup in a small map.
type snapshot struct {
	seed    maphash.Seed        // the gate's: every snapshot of a gate shards alike
	shards  []map[string]*Block // len a power of 2; never modified once stored; nil = empty
	blocked int                 // blocks held, over all shards
	version uint64
}

// newSnapshot returns an empty snapshot sharding with seed.
func newSnapshot(seed maphash.Seed) *snapshot {
	return &snapshot{seed: seed, shards: make([]map[string]*Block, 1)}
}

// shardsFor returns the number of shards to build for n blocks: a power of
// 2 giving about shardTarget blocks each.
func shardsFor(n int) int {
	if n <= shardTarget {
		return 1
	}
	return 1 << bits.Len(uint((n-1)/shardTarget))
}

// shard returns the index of tenant's shard.
func (s *snapshot) shard(tenant string) int {
	return int(maphash.String(s.seed, tenant) & uint64(len(s.shards)-1))
}

// get returns tenant's block, or nil.
func (s *snapshot) get(tenant string) *Block {
	return s.shards[s.shard(tenant)][tenant]
}

// each calls f for every block held.
func (s *snapshot) each(f func(tenant string, b *Block)) {
	for _, m := range s.shards {
		for t, b := range m {
			f(t, b)
		}
	}
}

// built returns a snapshot of blocks (tenant → block; nil entries are
// skipped) at version, sharded with seed.
func built(seed maphash.Seed, blocks map[string]*Block, version uint64) *snapshot {
	n := 0
	for _, b := range blocks {
		if b != nil {
			n++
		}
	}
	s := &snapshot{seed: seed, shards: make([]map[string]*Block, shardsFor(n)), blocked: n, version: version}
	for t, b := range blocks {
		if b == nil {
			continue
		}
		i := s.shard(t)
		if s.shards[i] == nil {
			s.shards[i] = make(map[string]*Block, n/len(s.shards)+1)
		}
		s.shards[i][t] = b
	}
	return s
}

// with returns a copy of s with changes applied (tenant → block to hold;
// nil = none) at version. It copies the shards changes touch and shares the
// others: O(len(s.shards) + len(changes)·shardTarget) rather than
// O(blocked), unless the blocks outgrow the shards, when it builds anew.
func (s *snapshot) with(changes map[string]*Block, version uint64) *snapshot {
	next := &snapshot{seed: s.seed, shards: make([]map[string]*Block, len(s.shards)), blocked: s.blocked, version: version}
	copy(next.shards, s.shards)
	copied := make([]bool, len(s.shards))
	for t, b := range changes {
		i := next.shard(t)
		m := next.shards[i]
		_, had := m[t]
		if b == nil && !had {
			continue
		}
		if !copied[i] {
			if m == nil {
				m = map[string]*Block{}
			} else {
				m = maps.Clone(m)
			}
			next.shards[i], copied[i] = m, true
		}
		if b == nil {
			delete(m, t)
			next.blocked--
			continue
		}
		if !had {
			next.blocked++
		}
		m[t] = b
	}
	if next.blocked > shardMax*len(next.shards) {
		all := make(map[string]*Block, next.blocked)
		next.each(func(t string, b *Block) { all[t] = b })
		return built(s.seed, all, version)
	}
	return next
}
