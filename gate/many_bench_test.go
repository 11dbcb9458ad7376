package gate

import (
	"fmt"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
)

// The sizes of the many-tenants benchmarks (BENCHMARKS.md "Many tenants"):
// blocked tenants held by the gate.
var (
	loadSizes   = []int{1_000, 10_000, 100_000}
	updateSizes = []int{1_000, 10_000, 100_000, 1_000_000}
)

// BenchmarkLoad is a gate's initial load of n blocked tenants: the replay
// of the bucket through the applier (decode, render the 402, build the
// snapshot), without NATS. ns/block must stay flat as n grows.
func BenchmarkLoad(b *testing.B) {
	for _, n := range loadSizes {
		entries := make([]jetstream.KeyValueEntry, 0, n+1)
		for i := range n {
			entries = append(entries, putEntry(b, fmt.Sprintf("tenant-%07d", i), 1))
		}
		entries = append(entries, nil) // the end of the replay
		b.Run(fmt.Sprintf("blocked=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				g := offlineGate(b)
				a := &applier{g: g, replaying: true, overlay: map[string]*Block{}}
				for i := 0; i < len(entries); i += maxBurst {
					a.apply(entries[i:min(i+maxBurst, len(entries))])
				}
				if !g.ready.Load() || g.Version() != uint64(n) {
					b.Fatalf("loaded %d of %d", g.Version(), n)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/block")
		})
	}
}

// BenchmarkUpdate is the cost of one live update of the blocklist (a
// block, then its delete, alternately) for a gate holding n blocked
// tenants: decode, render and publish a new snapshot. It must not grow with
// n.
func BenchmarkUpdate(b *testing.B) {
	blk, err := newBlock(quota("tenant", 1))
	if err != nil {
		b.Fatal(err)
	}
	put, del := putEntry(b, "newcomer", 1), delEntry("newcomer", 2)
	for _, n := range updateSizes {
		blocks := make(map[string]*Block, n)
		for i := range n {
			blocks[fmt.Sprintf("tenant-%07d", i)] = blk
		}
		b.Run(fmt.Sprintf("blocked=%d", n), func(b *testing.B) {
			g := offlineGate(b)
			preload(g, blocks)
			a := &applier{g: g, overlay: map[string]*Block{}}
			burst := make([]jetstream.KeyValueEntry, 1)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				burst[0] = put
				if i%2 == 1 {
					burst[0] = del
				}
				a.apply(burst)
				i++
			}
			if want := uint64(n + i); g.Version() != want {
				b.Fatalf("version %d after %d updates, want %d", g.Version(), i, want)
			}
		})
	}
}
