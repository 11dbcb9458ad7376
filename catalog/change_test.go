package catalog

import (
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
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

type kvEntry struct {
	key string
	val string
	rev uint64
	op  jetstream.KeyValueOp
}

func (e kvEntry) Bucket() string                  { return Bucket }
func (e kvEntry) Key() string                     { return e.key }
func (e kvEntry) Value() []byte                   { return []byte(e.val) }
func (e kvEntry) Revision() uint64                { return e.rev }
func (e kvEntry) Created() time.Time              { return time.Time{} }
func (e kvEntry) Delta() uint64                   { return 0 }
func (e kvEntry) Operation() jetstream.KeyValueOp { return e.op }

// Changes reads the bucket's entries in revision order: an entry older than
// what is held (the echo of an own write) changes nothing, a delete drops
// the change, a malformed value is an error and keeps the change before it.
func TestChanges(t *testing.T) {
	var c Changes
	apply := func(en kvEntry, wantChanged, wantErr bool) {
		t.Helper()
		changed, err := c.Apply(en)
		if changed != wantChanged || (err != nil) != wantErr {
			t.Fatalf("Apply(%+v) = %v, %v; want changed %v, error %v", en, changed, err, wantChanged, wantErr)
		}
	}
	apply(kvEntry{key: "acme", val: `{"plan":"pro"}`, rev: 1}, true, false)
	if !c.Set("acme", Change{Plan: ptr("free")}, 3) {
		t.Fatal("Set at a newer revision refused")
	}
	apply(kvEntry{key: "acme", val: `{"plan":"pro"}`, rev: 2}, false, false)
	apply(kvEntry{key: "acme", val: `{"plan":"free"}`, rev: 3}, false, false)
	apply(kvEntry{key: "acme", val: `{"plan":`, rev: 4}, false, true)
	if !c.Has("acme") || *c.changes["acme"].Plan != "free" {
		t.Fatalf("acme's change %+v, want plan free kept", c.changes["acme"])
	}
	apply(kvEntry{key: "acme", rev: 5, op: jetstream.KeyValueDelete}, true, false)
	if c.Has("acme") {
		t.Fatal("acme's change survives its delete")
	}
	if c.Set("acme", Change{}, 5) {
		t.Fatal("Set at a revision already held accepted")
	}
	c.Set("globex", Change{Plan: ptr("pro")}, 6)
	c.Forget("globex", c.Rev("globex"))
	apply(kvEntry{key: "globex", val: `{"plan":"pro"}`, rev: 6}, false, false)
	if c.Has("globex") {
		t.Fatal("the echo of a forgotten change brought it back")
	}
	// A put applied between a delete's send and its Forget stays.
	c.Set("initech", Change{Plan: ptr("pro")}, 7)
	rev := c.Rev("initech")
	c.Set("initech", Change{Plan: ptr("free")}, 9) // newer, from another replica
	c.Forget("initech", rev)
	if !c.Has("initech") || *c.changes["initech"].Plan != "free" {
		t.Fatalf("Forget dropped a newer change: %+v", c.changes["initech"])
	}
}
