package catalog

import (
	"slices"
	"testing"
)

func ptr[T any](v T) *T { return &v }

// Merge applies the admin API's changes over the file, and leaves out (and
// names) a change that no longer fits it instead of failing the catalog.
func TestMerge(t *testing.T) {
	file, err := NewCatalog(
		[]Plan{{Name: "free", Limits: map[string]int64{"api_calls": 10}}, {Name: "pro"}},
		[]Tenant{{Name: "acme", Plan: "free", CustomerID: "cus_1"}, {Name: "globex"}},
	)
	if err != nil {
		t.Fatal(err)
	}
	changes := map[string]Change{
		"acme":   {BillingAnchor: ptr("2026-01-31"), Overrides: &ChangeOverrides{Limits: map[string]int64{"api_calls": 50}}},
		"newco":  {Plan: ptr("pro")},
		"stale":  {Plan: ptr("gone")},
		"thief":  {CustomerID: ptr("cus_1")},
		"badday": {BillingAnchor: ptr("31/01/2026")},
	}
	cat, dropped := Merge(file, changes, "")
	if got := cat.TenantNames(); !slices.Equal(got, []string{"acme", "globex", "newco"}) {
		t.Errorf("tenants %v, want acme, globex and newco", got)
	}
	if l, _ := cat.Limit("acme", "api_calls"); l != 50 {
		t.Errorf("acme's limit %d, want the override 50", l)
	}
	if a, _, _ := cat.Tenant("acme"); a.BillingAnchor.Day() != 31 {
		t.Errorf("acme's anchor %v, want the 31st", a.BillingAnchor)
	}
	if !cat.HasPlan("newco") {
		t.Error("newco, only in the admin API, has no plan")
	}
	for name, field := range map[string]string{"stale": "plan", "thief": "customer_id", "badday": "billing_anchor"} {
		if fes := dropped[name]; len(fes) != 1 || fes[0].Field != field {
			t.Errorf("dropped[%s] = %v, want one error on %s", name, fes, field)
		}
		if _, _, ok := cat.Tenant(name); ok {
			t.Errorf("%s, dropped, is in the catalog", name)
		}
	}
	if len(dropped) != 3 {
		t.Errorf("dropped %v, want stale, thief and badday", dropped)
	}
	if tn, _ := cat.TenantByCustomer("cus_1"); tn != "acme" {
		t.Errorf("cus_1 is %q's, want the file's acme", tn)
	}
}
