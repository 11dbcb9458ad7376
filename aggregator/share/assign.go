package share

import (
	"cmp"
	"hash/fnv"
	"slices"
	"strconv"
)

// Assign divides partitions 0..partitions-1 between members and returns
// each member's partitions in increasing order (members without any are
// absent). Every member computes it from the same list of live members, so
// they agree without talking to each other; members may be given in any
// order and more than once.
//
// It is rendezvous (highest-random-weight) hashing with bounded loads: each
// (member, partition) pair gets a pseudo-random weight, and pairs are taken
// in decreasing order of weight, each giving its partition to its member
// unless the partition is taken or the member is full. A member holds at
// most ⌈P/N⌉ partitions, and at most P mod N members hold that many, so
// every member holds ⌊P/N⌋ or ⌈P/N⌉. Pure rendezvous hashing moves only
// the partitions of a member that leaves (to their next choice) and only
// the partitions a new member wins, but its loads vary (3 members of 16
// partitions get 2 to 9 by chance); the bound costs a few more moves when
// the membership changes (TestAssignMoves measures them), never balance.
func Assign(members []string, partitions int) map[string][]int {
	members = slices.Clone(members)
	slices.Sort(members)
	members = slices.Compact(members)
	n := len(members)
	out := map[string][]int{}
	if n == 0 || partitions <= 0 {
		return out
	}
	type pair struct {
		weight    uint64
		member, p int
	}
	pairs := make([]pair, 0, n*partitions)
	for m, name := range members {
		for p := range partitions {
			pairs = append(pairs, pair{weight(name, p), m, p})
		}
	}
	// Ties (of 64-bit weights, so practically never) break by member and
	// partition, so the order is total and the same everywhere.
	slices.SortFunc(pairs, func(a, b pair) int {
		if c := cmp.Compare(b.weight, a.weight); c != 0 {
			return c
		}
		if c := cmp.Compare(a.member, b.member); c != 0 {
			return c
		}
		return cmp.Compare(a.p, b.p)
	})
	floor, extra := partitions/n, partitions%n // extra members may hold floor+1
	load := make([]int, n)
	owner := make([]int, partitions)
	for i := range owner {
		owner[i] = -1
	}
	left := partitions
	for _, pr := range pairs {
		if left == 0 {
			break
		}
		if owner[pr.p] >= 0 {
			continue
		}
		switch l := load[pr.member]; {
		case l < floor:
		case l == floor && extra > 0:
			extra--
		default:
			continue
		}
		load[pr.member]++
		owner[pr.p] = pr.member
		left--
	}
	for p, m := range owner {
		out[members[m]] = append(out[members[m]], p)
	}
	return out
}

// weight is the rendezvous weight of member for partition p: FNV-1a 64 of
// both, finished with SplitMix64's mixer so that names differing in their
// last byte get unrelated weights.
func weight(member string, p int) uint64 {
	h := fnv.New64a()
	h.Write([]byte(member))
	h.Write([]byte{0})
	h.Write(strconv.AppendInt(nil, int64(p), 10))
	x := h.Sum64()
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
