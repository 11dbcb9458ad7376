package catalog

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// sortNames sorts any input, with or without a sorted head.
func TestSortNames(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, c := range []struct{ head, tail int }{{0, 0}, {1, 0}, {0, 1}, {5, 0}, {0, 7}, {100, 3}, {3, 100}, {1000, 1}, {1, 1000}} {
		var names []string
		for i := range c.head {
			names = append(names, fmt.Sprintf("t%05d", i*3))
		}
		for range c.tail {
			names = append(names, fmt.Sprintf("t%05d", rng.IntN(4000)))
		}
		want := slices.Sorted(slices.Values(names))
		sortNames(names)
		if !slices.Equal(names, want) {
			t.Errorf("head %d tail %d: %v, want %v", c.head, c.tail, names, want)
		}
	}
}

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
// as loading the catalog file does after parsing it.
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
			for b.Loop() {
				if _, err := NewCatalog(plans, tenants); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/tenant")
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

// A merge over a file catalog lists every tenant once, sorted: the file's
// with the changes' new tenants merged in.
func TestMergeManyNamesSorted(t *testing.T) {
	file, changes := manyFile(t, 10_000, 50)
	cat, dropped := Merge(file, changes, "new-00007")
	names := cat.TenantNames()
	if len(dropped) != 0 || len(names) != 10_050 || !slices.IsSorted(names) || len(slices.Compact(slices.Clone(names))) != len(names) {
		t.Fatalf("%d names, sorted %v, dropped %v", len(names), slices.IsSorted(names), dropped)
	}
	if _, p, _ := cat.Tenant("t-0000200"); p.Name != "pro" {
		t.Errorf("t-0000200 on plan %q, want pro", p.Name)
	}
}

// Same tells apart every setting a decision about a tenant depends on.
func TestSame(t *testing.T) {
	plans := []Plan{{Name: "free", Limits: map[string]int64{"api_calls": 1000}}, {Name: "pro", Limits: map[string]int64{"api_calls": 5000}}}
	base := Tenant{Name: "acme", Plan: "free", BillingURL: "https://b.example.com/acme", CustomerID: "cus_1"}
	mk := func(ps []Plan, ts ...Tenant) *Catalog {
		c, err := NewCatalog(ps, ts)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	orig := mk(plans, base)
	with := func(f func(*Tenant)) *Catalog {
		tn := base
		f(&tn)
		return mk(plans, tn)
	}
	morePlan := []Plan{{Name: "free", Limits: map[string]int64{"api_calls": 2000}}, plans[1]}
	dailyPlan := []Plan{{Name: "free", Period: Daily, Limits: map[string]int64{"api_calls": 1000}}, plans[1]}
	overagePlan := []Plan{{Name: "free", OnExceed: OnExceedOverage, Limits: map[string]int64{"api_calls": 1000}}, plans[1]}
	for _, c := range []struct {
		name  string
		other *Catalog
		same  bool
	}{
		{"itself", orig, true},
		{"rebuilt alike", mk(plans, base), true},
		{"plan", with(func(t *Tenant) { t.Plan = "pro" }), false},
		{"anchor", with(func(t *Tenant) { t.BillingAnchor = time.Date(2026, 1, 15, 0, 0, 0, 0, time.UTC) }), false},
		{"billing url", with(func(t *Tenant) { t.BillingURL = "https://b.example.com/other" }), false},
		{"customer", with(func(t *Tenant) { t.CustomerID = "cus_2" }), false},
		{"status", with(func(t *Tenant) { t.Status = StatusPastDue }), false},
		{"override", with(func(t *Tenant) { t.Overrides.Limits = map[string]int64{"api_calls": 10} }), false},
		{"plan limits", mk(morePlan, base), false},
		{"plan period", mk(dailyPlan, base), false},
		{"plan on_exceed", mk(overagePlan, base), false},
		{"gone", mk(plans), false},
	} {
		if got := orig.Same(c.other, "acme"); got != c.same {
			t.Errorf("%s: Same = %v, want %v", c.name, got, c.same)
		}
	}
	if !orig.Same(mk(plans), "nobody") || !orig.Has("acme") || orig.Has("nobody") {
		t.Error("a tenant in neither catalog is not the same, or Has is wrong")
	}
}
