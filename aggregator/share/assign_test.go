package share

import (
	"fmt"
	"slices"
	"testing"
)

func names(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("aggregator-%d", i)
	}
	return out
}

// owners inverts an assignment: the owner of each partition.
func owners(t *testing.T, a map[string][]int, partitions int) []string {
	t.Helper()
	own := make([]string, partitions)
	for m, ps := range a {
		if !slices.IsSorted(ps) {
			t.Errorf("%s: partitions %v not sorted", m, ps)
		}
		for _, p := range ps {
			if own[p] != "" {
				t.Fatalf("partition %d owned by %s and %s", p, own[p], m)
			}
			own[p] = m
		}
	}
	for p, m := range own {
		if m == "" {
			t.Fatalf("partition %d has no owner", p)
		}
	}
	return own
}

// Every partition has exactly one owner and every member ⌊P/N⌋ or ⌈P/N⌉,
// for any number of members, whatever their names.
func TestAssignBalanced(t *testing.T) {
	for _, partitions := range []int{1, 7, 16, 64} {
		for n := 1; n <= 20; n++ {
			for _, prefix := range []string{"aggregator-", "meterd-aggregator-", "10.0.0.", "host"} {
				members := make([]string, n)
				for i := range members {
					members[i] = fmt.Sprint(prefix, i)
				}
				a := Assign(members, partitions)
				owners(t, a, partitions)
				lo, hi := partitions/n, (partitions+n-1)/n
				for _, m := range members {
					if l := len(a[m]); l < lo || l > hi {
						t.Errorf("P=%d N=%d %s: %d partitions, want %d..%d", partitions, n, m, l, lo, hi)
					}
				}
			}
		}
	}
}

// The same members in any order, repeated, give the same assignment.
func TestAssignDeterministic(t *testing.T) {
	m := names(5)
	want := Assign(m, 16)
	rev := slices.Clone(m)
	slices.Reverse(rev)
	for _, members := range [][]string{rev, append(slices.Clone(m), m[2], m[0])} {
		got := Assign(members, 16)
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("Assign(%v) = %v, want %v", members, got, want)
		}
	}
	if got := Assign(nil, 16); len(got) != 0 {
		t.Errorf("no members: %v", got)
	}
}

// A member that joins takes its share and at most about as many partitions
// again move between the others; read backwards, a member that leaves gives
// up its partitions and at most about as many more move. Pure rendezvous
// hashing moves exactly the joiner's share or the leaver's partitions; the
// rest is what the load bound costs (measured worst of these sizes: 17
// moves of 64 partitions from 7 to 8 members, whose share is 8).
func TestAssignMoves(t *testing.T) {
	for _, partitions := range []int{16, 64} {
		for n := 1; n < 12; n++ {
			moves(t, partitions, n)
		}
	}
}

// moves checks the change from n to n+1 members of partitions.
func moves(t *testing.T, partitions, n int) {
	t.Helper()
	before := owners(t, Assign(names(n), partitions), partitions)
	after := owners(t, Assign(names(n+1), partitions), partitions)
	joined := names(n + 1)[n]
	moved, toJoiner := 0, 0
	for p := range partitions {
		if before[p] != after[p] {
			moved++
			if after[p] == joined {
				toJoiner++
			}
		}
	}
	// The joiner gets its share (read backwards: the leaver's partitions
	// move); the rest is what the load bound shifts between the others.
	share := (partitions + n) / (n + 1) // ⌈P/(n+1)⌉
	if toJoiner < partitions/(n+1) || moved > 2*share+1 {
		t.Errorf("P=%d, %d→%d members: %d partitions moved, %d of them to the new member", partitions, n, n+1, moved, toJoiner)
	}
	t.Logf("P=%d, %d→%d members: %d moved (%d to the new member)", partitions, n, n+1, moved, toJoiner)
}
