package keyindex

import (
	"encoding/binary"
	"math/bits"
)

// bucketSort orders items by their keys in two passes. Keys are SHA-256
// prefixes, uniform over their range, so a counting sort on their top bits
// leaves buckets of about four items each, which a comparison sort orders
// at once: linear time, where one comparison sort of all the items costs
// n log n compares (sorting took 70 % of a spill of half a million keys;
// aggregator/BENCHMARKS.md). Whatever the keys, the result is ordered: a
// crowded bucket only costs its own comparison sort.
//
// Count each item's key, then call start, then place each item where place
// says, then order each bucket in turn with buckets.
type bucketSort struct {
	shift uint
	// ends[b] counts bucket b-1's items, then (after start) is where
	// bucket b begins, then (after place) where it ends.
	ends []int
}

// maxSortBits bounds the buckets at a million: 8 MiB of positions.
const maxSortBits = 20

func newBucketSort(n int) *bucketSort {
	b := min(max(bits.Len(uint(n/4)), 1), maxSortBits)
	return &bucketSort{shift: 64 - uint(b), ends: make([]int, 1<<b+1)}
}

func (s *bucketSort) bucket(k *Key) int { return int(binary.BigEndian.Uint64(k[:8]) >> s.shift) }

// count counts an item of key k.
func (s *bucketSort) count(k *Key) { s.ends[s.bucket(k)+1]++ }

// start turns the counts into the buckets' first positions.
func (s *bucketSort) start() {
	for i := 1; i < len(s.ends); i++ {
		s.ends[i] += s.ends[i-1]
	}
}

// place returns the position of the next item of key k.
func (s *bucketSort) place(k *Key) int {
	b := s.bucket(k)
	p := s.ends[b]
	s.ends[b]++
	return p
}

// buckets calls order(lo, hi) for each bucket of two items or more, the
// positions [lo, hi) it holds.
func (s *bucketSort) buckets(order func(lo, hi int)) {
	lo := 0
	for _, hi := range s.ends[:len(s.ends)-1] {
		if hi-lo > 1 {
			order(lo, hi)
		}
		lo = hi
	}
}
