package keyindex

import (
	"encoding/binary"
	"iter"
	"math/bits"
	"slices"
)

// sortByKey returns the items, each given with its key, in key order (key
// returns an item's key). Keys are SHA-256 prefixes, uniform over their
// range, so counting sorts on their top bits leave buckets of about four
// items each, which a comparison sort orders at once: linear time, where one
// comparison sort of all the items costs n log n compares (sorting took
// 70 % of a spill of half a million keys; aggregator/BENCHMARKS.md). Two
// passes: the items are placed by their top 8 bits into 256 runs, each
// written in order (one placement over the whole result cost a cache and a
// TLB miss per item: 6 to 9 s of CPU a minute of spills), then each run
// by its next bits, in a scratch buffer the size of a run. Whatever the
// keys, the result is ordered: a crowded bucket only costs its own
// comparison sort. items is ranged over twice; n, the number of items it
// holds, sizes the buckets.
func sortByKey[T any](n int, items iter.Seq2[Key, T], key func(*T) *Key) []T {
	// runs[r] counts run r-1's items, then is where run r begins, then,
	// as items are placed, where it ends.
	var runs [256 + 1]int
	for k := range items {
		runs[int(k[0])+1]++
	}
	longest := 0
	for r := 1; r < len(runs); r++ {
		longest = max(longest, runs[r])
		runs[r] += runs[r-1]
	}
	out := make([]T, runs[len(runs)-1])
	starts := runs
	for k, v := range items {
		out[starts[k[0]]] = v
		starts[k[0]]++
	}
	// Each run's buckets are sized by its own length: a crowded run (ids
	// chosen for their keys' top byte) costs the others nothing.
	ends := make([]int, 1<<min(max(bits.Len(uint(longest/4)), 1), maxSortBits)+1)
	scratch := make([]T, longest)
	for r := range 256 {
		run := out[runs[r]:runs[r+1]]
		if len(run) < 2 {
			continue
		}
		b := min(max(bits.Len(uint(len(run)/4)), 1), maxSortBits)
		shift := 64 - uint(b)
		// The bits after the top 8.
		bucket := func(k *Key) int { return int(binary.BigEndian.Uint64(k[:8]) << 8 >> shift) }
		ends := ends[:1<<b+1]
		clear(ends)
		for i := range run {
			ends[bucket(key(&run[i]))+1]++
		}
		for i := 1; i < len(ends); i++ {
			ends[i] += ends[i-1]
		}
		for i := range run {
			b := bucket(key(&run[i]))
			scratch[ends[b]] = run[i]
			ends[b]++
		}
		copy(run, scratch[:len(run)])
		lo := 0
		for _, hi := range ends[:len(ends)-1] {
			if hi-lo > 1 {
				slices.SortFunc(run[lo:hi], func(x, y T) int { return compareKeys(key(&x), key(&y)) })
			}
			lo = hi
		}
	}
	return out
}

// maxSortBits bounds the buckets at a million: 8 MiB of positions.
const maxSortBits = 20

// sortedByKey returns the positions order of keys ordered by their keys.
func sortedByKey(order []int32, keys []Key) []int32 {
	return sortByKey(len(order), func(yield func(Key, int32) bool) {
		for _, i := range order {
			if !yield(keys[i], i) {
				return
			}
		}
	}, func(i *int32) *Key { return &keys[*i] })
}
