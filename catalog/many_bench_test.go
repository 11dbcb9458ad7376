package catalog

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"testing"
)

// manyFile is a file catalog of n tenants (t-0000000 …) on two plans, in
// shuffled order as a file may list them, and changes of the admin API for
// k of them plus k new tenants.
func manyFile(tb testing.TB, n, k int) (*Catalog, map[string]Change) {
	tb.Helper()
	plans := []Plan{{Name: "free", Limits: map[string]int64{"api_calls": 1000}}, {Name: "pro", Limits: map[string]int64{"api_calls": 100_000, "tokens": 50_000}}}
	tenants := make([]Tenant, n)
	for i := range tenants {
		tenants[i] = Tenant{Name: fmt.Sprintf("t-%07d", i), Plan: plans[i%2].Name, CustomerID: fmt.Sprintf("cus_%07d", i)}
	}
	rand.New(rand.NewPCG(5, 6)).Shuffle(len(tenants), func(i, j int) { tenants[i], tenants[j] = tenants[j], tenants[i] })
	file, err := NewCatalog(plans, tenants)
	if err != nil {
		tb.Fatal(err)
	}
	pro, free := "pro", "free"
	changes := map[string]Change{}
	for i := range k {
		changes[fmt.Sprintf("t-%07d", i*(n/k))] = Change{Plan: &pro}
		changes[fmt.Sprintf("new-%05d", i)] = Change{Plan: &free}
	}
	return file, changes
}

var catalogSizes = []int{10_000, 100_000, 1_000_000}

// BenchmarkNewCatalog builds (validates and indexes) a catalog of n tenants,
// as loading the catalog file does after parsing it; it reports the heap a
// catalog keeps per tenant (the tenants' names and settings are the
// caller's and not counted).
func BenchmarkNewCatalog(b *testing.B) {
	for _, n := range catalogSizes {
		file, _ := manyFile(b, n, 1)
		plans := []Plan{file.plans["free"], file.plans["pro"]}
		tenants := make([]Tenant, 0, n)
		for _, t := range file.tenants {
			tenants = append(tenants, t)
		}
		b.Run(fmt.Sprintf("tenants=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			var ms runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&ms)
			before := ms.HeapAlloc
			var cat *Catalog
			for b.Loop() {
				c, err := NewCatalog(plans, tenants)
				if err != nil {
					b.Fatal(err)
				}
				cat = c
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/tenant")
			runtime.GC()
			runtime.ReadMemStats(&ms)
			b.ReportMetric(float64(ms.HeapAlloc-before)/float64(n), "heap-B/tenant")
			runtime.KeepAlive(cat)
		})
	}
}

// BenchmarkMerge merges 100 admin API changes (50 tenants of the file, 50
// new) over a file catalog of n tenants: what every admin change costs
// every component following the changes.
func BenchmarkMerge(b *testing.B) {
	for _, n := range catalogSizes {
		file, changes := manyFile(b, n, 50)
		b.Run(fmt.Sprintf("tenants=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				cat, dropped := Merge(file, changes, "")
				if len(dropped) != 0 || len(cat.names) != n+50 {
					b.Fatalf("merged %d tenants, dropped %v", len(cat.names), dropped)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/tenant")
		})
	}
}
