package catalog

import (
	"fmt"
	"maps"
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

// Merge, which validates only the changed tenants over a copy of the file's
// indexes, gives the catalog NewCatalog builds from the merged tenants:
// plans switched, limits dropped and added, customer ids moved from one
// tenant to another, tenants added.
func TestMergeMatchesNewCatalog(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	plans := []Plan{{Name: "free", Limits: map[string]int64{"api_calls": 1000}}, {Name: "pro", Limits: map[string]int64{"tokens": 5}}, {Name: "open"}}
	var tenants []Tenant
	for i := range 200 {
		tenants = append(tenants, Tenant{Name: fmt.Sprintf("t%03d", i), Plan: plans[i%3].Name, CustomerID: fmt.Sprintf("cus_%03d", i)})
	}
	file, err := NewCatalog(plans, tenants)
	if err != nil {
		t.Fatal(err)
	}
	for round := range 50 {
		specs := map[string]Change{}
		for range rng.IntN(20) + 1 {
			name := fmt.Sprintf("t%03d", rng.IntN(230)) // some new
			ch := Change{}
			switch rng.IntN(4) {
			case 0:
				ch.Plan = ptr(plans[rng.IntN(3)].Name)
			case 1:
				ch.Overrides = &ChangeOverrides{Limits: map[string]int64{"api_calls": int64(rng.IntN(50))}}
			case 2:
				ch.Plan = ptr("")
			case 3:
				ch.Status = ptr(StatusSuspended)
			}
			specs[name] = ch
		}
		// Move a customer id: the spec'd tenant a gives it up, b takes it.
		a, b := fmt.Sprintf("t%03d", rng.IntN(200)), fmt.Sprintf("t%03d", 200+rng.IntN(30))
		specs[a] = Change{CustomerID: ptr("cus_moved_" + a)}
		specs[b] = Change{CustomerID: ptr("cus_" + a[1:])}
		got, dropped := Merge(file, specs, "")
		if len(dropped) != 0 {
			t.Fatalf("round %d: dropped %v", round, dropped)
		}
		var merged []Tenant
		for _, tn := range tenants {
			if _, ok := specs[tn.Name]; !ok {
				merged = append(merged, tn)
			}
		}
		for _, name := range slices.Sorted(maps.Keys(specs)) {
			base, _, ok := file.Tenant(name)
			if !ok {
				base = Tenant{Name: name}
			}
			tn, fe := specs[name].ApplyTo(base)
			if fe != nil {
				t.Fatal(fe)
			}
			merged = append(merged, tn)
		}
		want, err := NewCatalog(plans, merged)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if !slices.Equal(got.names, want.names) || !maps.EqualFunc(got.tenants, want.tenants, func(x, y Tenant) bool { return want.Same(got, x.Name) && x.Name == y.Name }) ||
			!maps.EqualFunc(got.limits, want.limits, func(x, y map[string]int64) bool { return maps.Equal(x, y) }) || !maps.Equal(got.customers, want.customers) {
			t.Fatalf("round %d: Merge differs from NewCatalog of the merged tenants:\n%v\n%v\n%v\n%v", round, got.names, want.names, got.customers, want.customers)
		}
	}
}
