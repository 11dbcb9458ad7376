package keyindex

import (
	"encoding/binary"
	"iter"
	"math/bits"
	"slices"
)

// sortByKey returns the items, each given with its key, in key order (key
// returns an item's key). Keys are SHA-256 prefixes, uniform over their
// range, so a counting sort on their top bits leaves buckets of about four
// items each, which a comparison sort orders at once: linear time, where one
// comparison sort of all the items costs n log n compares (sorting took
// 70 % of a spill of half a million keys; aggregator/BENCHMARKS.md).
// Whatever the keys, the result is ordered: a crowded bucket only costs its
// own comparison sort. items is ranged over twice; n, the number of items
// it holds, sizes the buckets.
func sortByKey[T any](n int, items iter.Seq2[Key, T], key func(*T) *Key) []T {
	b := min(max(bits.Len(uint(n/4)), 1), maxSortBits)
	shift := 64 - uint(b)
	bucket := func(k *Key) int { return int(binary.BigEndian.Uint64(k[:8]) >> shift) }
	// ends[b] counts bucket b-1's items, then is where bucket b begins,
	// then, as items are placed, where it ends.
	ends := make([]int, 1<<b+1)
	for k := range items {
		ends[bucket(&k)+1]++
	}
	for i := 1; i < len(ends); i++ {
		ends[i] += ends[i-1]
	}
	out := make([]T, ends[len(ends)-1])
	for k, v := range items {
		b := bucket(&k)
		out[ends[b]] = v
		ends[b]++
	}
	lo := 0
	for _, hi := range ends[:len(ends)-1] {
		if hi-lo > 1 {
			slices.SortFunc(out[lo:hi], func(x, y T) int { return compareKeys(key(&x), key(&y)) })
		}
		lo = hi
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
