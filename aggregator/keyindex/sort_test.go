package keyindex

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// sortedByKey orders any keys, of any count: uniform ones, ones that share
// their top bits (one crowded bucket) and repeated ones, and returns each
// position once.
func TestSortedByKey(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	random := func(k *Key) {
		binary.BigEndian.PutUint64(k[:8], rng.Uint64())
		binary.BigEndian.PutUint64(k[8:], rng.Uint64())
	}
	kinds := map[string]func(k *Key){
		"uniform": random,
		"one bucket": func(k *Key) {
			random(k)
			binary.BigEndian.PutUint32(k[:4], 0xdeadbeef)
		},
		"half in one run": func(k *Key) {
			random(k)
			if rng.IntN(2) == 0 {
				k[0] = 0
			}
		},
		"repeated": func(k *Key) {
			*k = Key{}
			k[0], k[15] = byte(rng.IntN(3)), byte(rng.IntN(2))
		},
	}
	for name, fill := range kinds {
		for _, n := range []int{0, 1, 2, 3, 7, 100, 10_000, 300_000} {
			t.Run(fmt.Sprintf("%s/%d", name, n), func(t *testing.T) {
				keys := make([]Key, n+5)
				for i := range keys {
					fill(&keys[i])
				}
				// Every position but a few, as Held passes those not recent.
				order := make([]int32, 0, n)
				for i := range n {
					order = append(order, int32(i+5))
				}
				got := sortedByKey(order, keys)
				if len(got) != n {
					t.Fatalf("%d positions, want %d", len(got), n)
				}
				if !slices.IsSortedFunc(got, func(a, b int32) int { return compareKeys(&keys[a], &keys[b]) }) {
					t.Fatal("not in key order")
				}
				seen := slices.Clone(got)
				slices.Sort(seen)
				if !slices.Equal(seen, order) {
					t.Fatal("not each position once")
				}
			})
		}
	}
}

// BenchmarkSortByKey sorts a spill's records straight from its map, as
// writeTable does: four million keys, the default spill. ns/op is per key.
func BenchmarkSortByKey(b *testing.B) {
	const n = 4 << 20
	m := make(map[Key]uint32, n)
	for _, k := range keys("sort", n) {
		m[k] = 1
	}
	for b.Loop() {
		if out := sortedRecords(m); len(out) != n {
			b.Fatal(len(out))
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/key")
}
