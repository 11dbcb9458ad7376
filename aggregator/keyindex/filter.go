package keyindex

import (
	"cmp"
	"context"
	"encoding/binary"
	"math/bits"
	"slices"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// filter is a blocked Bloom filter over every key in the LSM, in memory:
// a key sets filterProbes bits of one 512-bit block (a cache line), chosen
// by its first 8 bytes, the bits by its last 8. A lookup of a key it has
// not seen costs one cache miss, and 99 % of them end there; the LSM's own
// filters cost one probe per level and sublevel, and that grew with the
// tree to half of the aggregator's CPU (aggregator/BENCHMARKS.md). Keys are
// SHA-256 prefixes, so uniform: no key can be chosen to crowd a block.
//
// Bits are set atomically: a spill and a rebuild's scan add keys at once.
type filter struct {
	words  []atomic.Uint64 // 8 per block
	blocks uint64
	// capacity is the keys it was sized for; added counts its adds.
	capacity int64
	added    atomic.Int64
}

const (
	// filterBitsPerKey and filterProbes give about 1 % false positives
	// at capacity: 1.25 bytes a key.
	filterBitsPerKey = 10
	filterProbes     = 7 // 7 × 9 bits of the key's last 8 bytes
	// minFilterKeys is the smallest capacity (1.25 MiB).
	minFilterKeys = 1 << 20
)

func newFilter(capacity int64) *filter {
	blocks := uint64(max(capacity*filterBitsPerKey/512, 1))
	return &filter{words: make([]atomic.Uint64, blocks*8), blocks: blocks, capacity: capacity}
}

// at returns k's block's first word and the bits to probe.
func (f *filter) at(k *Key) (word uint64, h uint64) {
	b, _ := bits.Mul64(binary.BigEndian.Uint64(k[:8]), f.blocks)
	return b * 8, binary.BigEndian.Uint64(k[8:])
}

func (f *filter) add(k *Key) {
	w, h := f.at(k)
	for range filterProbes {
		f.words[w+(h&511)>>6].Or(1 << (h & 63))
		h >>= 9
	}
	f.added.Add(1)
}

// mayContain is false only for a key never added.
func (f *filter) mayContain(k *Key) bool {
	w, h := f.at(k)
	for range filterProbes {
		if f.words[w+(h&511)>>6].Load()&(1<<(h&63)) == 0 {
			return false
		}
		h >>= 9
	}
	return true
}

// full reports whether f holds more keys than it was sized for.
func (f *filter) full() bool { return f.added.Load() > f.capacity }

// The filter's life: Open starts a build (a scan of every key in the LSM);
// until one ends, lookups go to the LSM. Every spill adds its keys to the
// filter in use and to the one being built before it ingests them, and a
// build's scan starts, under ix.mu, from a view of the LSM taken with it:
// so a key in the LSM is in the filter in use, always. A Loader adds its
// keys to the filters as it writes them, before its ingest, like a spill
// (loadFilters); a filter without room for them is dropped, and one whose
// build started after that misses them and is dropped at the ingest, a new
// build starting after it. A filter that reaches its capacity (keys added,
// expired ones included: an Expire does not remove them) is replaced by a
// build with more room (rebuildFull). A filter is sized
// with room for a quarter more keys than the generations hold.

// startBuild starts building a filter of at least least keys for the keys
// in the LSM, unless one is being built; ix.mu is held. The new filter
// replaces the one in use when its scan ends, unless a Loader or Reset
// dropped it.
func (ix *Index) startBuild(least int64) {
	if ix.building != nil || ix.buildCtx.Err() != nil || ix.noFilter {
		return
	}
	f := newFilter(max(ix.keysHeld()*5/4, ix.minFilter, least))
	it, err := ix.db.NewIter(nil)
	if err != nil {
		ix.opts.Logger.Errorf("keyindex: filter: %v", err)
		return
	}
	ctx, stop := context.WithCancel(ix.buildCtx)
	ix.building, ix.stopBuild = f, stop
	ix.builds.Go(func() {
		defer stop()
		ix.build(ctx, f, it)
	})
}

// dropBuild stops the build under way, if any; ix.mu is held.
func (ix *Index) dropBuild() {
	if ix.building != nil {
		ix.stopBuild()
		ix.building = nil
	}
}

// build adds every key it iterates to f, then makes f the filter in use.
func (ix *Index) build(ctx context.Context, f *filter, it *pebble.Iterator) {
	start := time.Now()
	n, err := int64(0), error(nil)
	for valid := it.First(); valid; valid = it.Next() {
		if k := it.Key(); len(k) == genKeyLen {
			f.add((*Key)(k[8:]))
			n++
		}
		if n%(1<<16) == 0 && ctx.Err() != nil {
			err = ctx.Err()
			break
		}
	}
	err = cmp.Or(err, it.Error(), it.Close())
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.building != f {
		return // dropped by a Loader or by Reset
	}
	ix.building = nil
	if err != nil {
		if ctx.Err() == nil {
			ix.opts.Logger.Errorf("keyindex: filter: %v", err)
		}
		return
	}
	ix.filter = f
	ix.scanned.Add(n)
	ix.opts.Logger.Infof("keyindex: filter of %d keys built in %s", n, time.Since(start).Round(time.Millisecond))
	ix.rebuildFull()
}

// rebuildFull starts a build when the filter in use is full, or when there
// is none (a build failed to start); ix.mu is held. The new one has room
// for twice the keys the full one was given, up to doubleFilterKeys, and a
// quarter more beyond: a filter grown from nothing is scanned for about
// twice its final keys in all, not five times, for at most 80 MiB more.
func (ix *Index) rebuildFull() {
	switch {
	case ix.filter == nil:
		ix.startBuild(0)
	case ix.filter.full():
		n := ix.filter.added.Load()
		ix.startBuild(n + max(min(n, doubleFilterKeys), n/4))
	}
}

// doubleFilterKeys bounds the growth of a filter that fills up to twice.
const doubleFilterKeys = 64 << 20

// loadFilters returns the filters a Loader's n keys are to be added to
// before their ingest (ix.mu is held): the filter in use and the one being
// built, each if it has room for them. One that has not is dropped, and if
// none is left, a build with room for them and the LSM's keys starts (at
// once, when the LSM is empty: the rebuild of a lost index).
func (ix *Index) loadFilters(n int64) []*filter {
	room := func(f *filter) bool { return f.added.Load()+n <= f.capacity }
	if ix.filter != nil && !room(ix.filter) {
		ix.filter = nil
	}
	if ix.building != nil && !room(ix.building) {
		ix.dropBuild()
	}
	if ix.filter == nil && ix.building == nil {
		ix.startBuild((ix.keysHeld() + n) * 5 / 4)
	}
	return ix.filters()
}

// stopBuilds ends the builds under way and waits for them; ix.mu is not
// held. Until restartBuilds, none starts; after closing, none again.
func (ix *Index) stopBuilds(closing bool) {
	ix.mu.Lock()
	ix.closing = ix.closing || closing
	ix.stop()
	ix.mu.Unlock()
	ix.builds.Wait()
}

// restartBuilds lets builds start again after stopBuilds, unless the
// index is closing; ix.mu is held.
func (ix *Index) restartBuilds() {
	if !ix.closing {
		ix.buildCtx, ix.stop = context.WithCancel(context.Background())
	}
}

// filters returns the filters a spill adds its keys to; ix.mu is held.
func (ix *Index) filters() []*filter {
	fs := make([]*filter, 0, 2)
	for _, f := range []*filter{ix.filter, ix.building} {
		if f != nil {
			fs = append(fs, f)
		}
	}
	return fs
}

// addToFilters adds keys to each filter of fs but those of done.
func addToFilters(fs, done []*filter, keys map[Key]uint32) {
	for _, f := range fs {
		if slices.Contains(done, f) {
			continue
		}
		for k := range keys {
			f.add(&k)
		}
	}
}
