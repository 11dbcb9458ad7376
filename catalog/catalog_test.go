package catalog

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/meterd/meterd/schemas"
)

// parse decodes src as a config file does and parses its plans and tenants.
func parse(t testing.TB, src string) (*Catalog, error) {
	t.Helper()
	var f struct {
		Plans   yaml.Node `yaml:"plans"`
		Tenants yaml.Node `yaml:"tenants"`
	}
	dec := yaml.NewDecoder(strings.NewReader(src))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("YAML: %v", err)
	}
	return ParseCatalog(&f.Plans, &f.Tenants)
}

func mustParse(t testing.TB, src string) *Catalog {
	t.Helper()
	c, err := parse(t, src)
	if err != nil {
		t.Fatalf("ParseCatalog: %v", err)
	}
	return c
}

const example = `
plans:
  free:   {period: monthly, limits: {api_calls: 1000}, on_exceed: block}
  pro:    {period: monthly, limits: {api_calls: 1000000, tokens: 50000000}, on_exceed: overage}
  annual: {period: yearly, limits: {api_calls: 12_000_000}}
  daily:  {period: daily}
tenants:
  acme:   {plan: free, billing_anchor: 2026-01-15, billing_url: "https://billing.example.com/acme", customer_id: cus_123, status: active, overrides: {limits: {api_calls: 5000}}}
  beta.eu:
    plan: pro
    billing_anchor: "2025-03-31T10:00:00+02:00"
    customer_id: cus_456
    status: past_due
    overrides:
      limits: {images: 10}
  gamma:  {plan: annual, billing_anchor: 2024-02-29, billing_url: "http://localhost:8080/pay?t=gamma#top"}
  metered-only: {customer_id: cus_789, billing_anchor: 2026-01-10, status: suspended}
  tick:   {plan: daily}
  bare:
`

func TestParseCatalogExample(t *testing.T) {
	c := mustParse(t, example)

	wantPlans := map[string]Plan{
		"free":   {Name: "free", Period: Monthly, Limits: map[string]int64{"api_calls": 1000}, OnExceed: OnExceedBlock},
		"pro":    {Name: "pro", Period: Monthly, Limits: map[string]int64{"api_calls": 1000000, "tokens": 50000000}, OnExceed: OnExceedOverage},
		"annual": {Name: "annual", Period: Yearly, Limits: map[string]int64{"api_calls": 12000000}, OnExceed: OnExceedBlock},
		"daily":  {Name: "daily", Period: Daily, OnExceed: OnExceedBlock},
	}
	for name, want := range wantPlans {
		if got, ok := c.Plan(name); !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("Plan(%q) = %+v, %v, want %+v", name, got, ok, want)
		}
	}
	if p, ok := c.Plan("gold"); ok {
		t.Errorf("Plan(gold) = %+v, want none", p)
	}

	wantTenants := []struct {
		t      Tenant
		anchor string
	}{
		{Tenant{Name: "acme", Plan: "free", BillingURL: "https://billing.example.com/acme", CustomerID: "cus_123",
			Status: StatusActive, Overrides: Overrides{Limits: map[string]int64{"api_calls": 5000}}}, "2026-01-15T00:00:00Z"},
		{Tenant{Name: "bare", Status: StatusActive}, ""},
		{Tenant{Name: "beta.eu", Plan: "pro", CustomerID: "cus_456", Status: StatusPastDue,
			Overrides: Overrides{Limits: map[string]int64{"images": 10}}}, "2025-03-31T08:00:00Z"},
		{Tenant{Name: "gamma", Plan: "annual", BillingURL: "http://localhost:8080/pay?t=gamma#top", Status: StatusActive}, "2024-02-29T00:00:00Z"},
		{Tenant{Name: "metered-only", CustomerID: "cus_789", Status: StatusSuspended}, "2026-01-10T00:00:00Z"},
		{Tenant{Name: "tick", Plan: "daily", Status: StatusActive}, ""},
	}
	var names []string
	for _, w := range wantTenants {
		names = append(names, w.t.Name)
		got, plan, ok := c.Tenant(w.t.Name)
		if !ok {
			t.Errorf("Tenant(%q) not found", w.t.Name)
			continue
		}
		if !got.BillingAnchor.Equal(ts(t, w.anchor)) || got.BillingAnchor.Location() != time.UTC {
			t.Errorf("Tenant(%q).BillingAnchor = %s, want %s in UTC", w.t.Name, got.BillingAnchor, w.anchor)
		}
		got.BillingAnchor = time.Time{}
		if !reflect.DeepEqual(got, w.t) {
			t.Errorf("Tenant(%q) = %+v\nwant %+v", w.t.Name, got, w.t)
		}
		if want := wantPlans[w.t.Plan]; !reflect.DeepEqual(plan, want) {
			t.Errorf("Tenant(%q) plan = %+v, want %+v", w.t.Name, plan, want)
		}
	}
	if got := c.TenantNames(); !slices.Equal(got, names) {
		t.Errorf("TenantNames() = %q, want %q", got, names)
	}
	if got, _, ok := c.Tenant("nobody"); ok {
		t.Errorf("Tenant(nobody) = %+v, want none", got)
	}
}

func TestCatalogLimits(t *testing.T) {
	c := mustParse(t, example)
	tests := []struct {
		tenant string
		want   map[string]int64
	}{
		{"acme", map[string]int64{"api_calls": 5000}}, // overridden
		{"beta.eu", map[string]int64{"api_calls": 1000000, "tokens": 50000000, "images": 10}},
		{"gamma", map[string]int64{"api_calls": 12000000}},
		{"tick", nil},         // plan without limits
		{"metered-only", nil}, // no plan
		{"nobody", nil},       // unknown
	}
	for _, tt := range tests {
		if got := c.Limits(tt.tenant); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("Limits(%q) = %v, want %v", tt.tenant, got, tt.want)
		}
		for _, meter := range []string{"api_calls", "tokens", "images", "bytes"} {
			want, wantOK := tt.want[meter]
			if got, ok := c.Limit(tt.tenant, meter); got != want || ok != wantOK {
				t.Errorf("Limit(%q, %q) = %d, %v, want %d, %v", tt.tenant, meter, got, ok, want, wantOK)
			}
		}
	}
}

func TestCatalogPeriodOf(t *testing.T) {
	c := mustParse(t, example)
	tests := []struct {
		tenant, at, want string
	}{
		{"acme", "2026-11-20T08:00:00Z", "[2026-11-15T00:00:00Z, 2026-12-15T00:00:00Z)"},
		{"acme", "2026-11-14" + beforeMidnight, "[2026-10-15T00:00:00Z, 2026-11-15T00:00:00Z)"},
		// Anchored on Mar 31 08:00 UTC: the 31st, clamped.
		{"beta.eu", "2026-02-10T00:00:00Z", "[2026-01-31T00:00:00Z, 2026-02-28T00:00:00Z)"},
		{"gamma", "2027-03-01T00:00:00Z", "[2027-02-28T00:00:00Z, 2028-02-29T00:00:00Z)"},
		{"tick", "2026-11-20T13:00:00Z", "[2026-11-20T00:00:00Z, 2026-11-21T00:00:00Z)"},
		// No plan: monthly from the billing anchor, or from the 1st.
		{"metered-only", "2026-11-20T00:00:00Z", "[2026-11-10T00:00:00Z, 2026-12-10T00:00:00Z)"},
		{"bare", "2026-11-20T00:00:00Z", "[2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z)"},
		{"nobody", "2026-11-30" + beforeMidnight, "[2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z)"},
	}
	for _, tt := range tests {
		if got := c.PeriodOf(tt.tenant, ts(t, tt.at)); got.String() != tt.want {
			t.Errorf("PeriodOf(%q, %s) = %s, want %s", tt.tenant, tt.at, got, tt.want)
		}
	}
	// The period goes on with the tenant's cadence.
	if got := c.PeriodOf("gamma", ts(t, "2027-03-01")).Next(); got.String() != "[2028-02-29T00:00:00Z, 2029-02-28T00:00:00Z)" {
		t.Errorf("Next of gamma's period = %s", got)
	}
}

func TestCatalogTenantByCustomer(t *testing.T) {
	c := mustParse(t, example)
	for id, want := range map[string]string{"cus_123": "acme", "cus_456": "beta.eu", "cus_789": "metered-only", "cus_999": "", "": ""} {
		if got, ok := c.TenantByCustomer(id); got != want || ok != (want != "") {
			t.Errorf("TenantByCustomer(%q) = %q, %v, want %q", id, got, ok, want)
		}
	}
}

func TestZeroCatalog(t *testing.T) {
	var c Catalog
	if _, _, ok := c.Tenant("acme"); ok {
		t.Error("the zero Catalog knows acme")
	}
	if l := c.Limits("acme"); l != nil {
		t.Errorf("Limits = %v", l)
	}
	if p := c.PeriodOf("acme", ts(t, "2026-02-14T10:00:00Z")); p.String() != "[2026-02-01T00:00:00Z, 2026-03-01T00:00:00Z)" {
		t.Errorf("PeriodOf = %s", p)
	}
	if n := c.TenantNames(); len(n) != 0 {
		t.Errorf("TenantNames = %q", n)
	}
}

// TestCatalogImmutable checks that neither the values given to NewCatalog nor
// the ones its methods return are shared with the catalog.
func TestCatalogImmutable(t *testing.T) {
	planLimits := map[string]int64{"api_calls": 10}
	overrides := map[string]int64{"tokens": 5}
	c, err := NewCatalog(
		[]Plan{{Name: "free", Limits: planLimits}},
		[]Tenant{{Name: "acme", Plan: "free", Overrides: Overrides{Limits: overrides}}},
	)
	if err != nil {
		t.Fatal(err)
	}
	planLimits["api_calls"] = 99
	overrides["tokens"] = 99

	tn, p, _ := c.Tenant("acme")
	tn.Overrides.Limits["tokens"] = 98
	p.Limits["api_calls"] = 98
	p2, _ := c.Plan("free")
	p2.Limits["api_calls"] = 97
	c.Limits("acme")["api_calls"] = 96
	c.TenantNames()[0] = "mallory"

	want := map[string]int64{"api_calls": 10, "tokens": 5}
	if got := c.Limits("acme"); !maps.Equal(got, want) {
		t.Errorf("Limits = %v, want %v", got, want)
	}
	if tn, p, _ := c.Tenant("acme"); tn.Overrides.Limits["tokens"] != 5 || p.Limits["api_calls"] != 10 {
		t.Errorf("Tenant = %+v, %+v", tn, p)
	}
	if n := c.TenantNames(); !slices.Equal(n, []string{"acme"}) {
		t.Errorf("TenantNames = %q", n)
	}
}

// TestCatalogConcurrentReads lets the race detector look at every method
// called from many goroutines at once.
func TestCatalogConcurrentReads(t *testing.T) {
	c := mustParse(t, example)
	at := ts(t, "2026-05-05T05:05:05Z")
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 200 {
				for _, name := range c.TenantNames() {
					c.Tenant(name)
					c.Limits(name)
					c.Limit(name, "api_calls")
					c.PeriodOf(name, at).Next()
				}
				c.TenantByCustomer("cus_123")
				c.Plan("pro")
			}
		})
	}
	wg.Wait()
}

func TestParseCatalogForms(t *testing.T) {
	tests := []struct {
		name   string
		src    string
		plans  map[string]Plan
		tenant map[string]Tenant // without BillingAnchor
	}{
		{name: "empty file", src: ""},
		{name: "null sections", src: "plans:\ntenants: ~\n"},
		{name: "empty sections", src: "plans: {}\ntenants: {}\n"},
		{
			name: "integer forms",
			src:  "plans:\n  p: {limits: {a: 1_000_000, b: 0x10, c: 0, d: 9223372036854775807}}\n",
			plans: map[string]Plan{"p": {Name: "p", Period: Monthly, OnExceed: OnExceedBlock,
				Limits: map[string]int64{"a": 1000000, "b": 16, "c": 0, "d": 1<<63 - 1}}},
		},
		{
			name:   "null fields are unset",
			src:    "plans:\n  p: {period: ~, limits: ~, on_exceed: ~}\ntenants:\n  t: {plan: , billing_anchor: ~, billing_url: ~, customer_id: ~, status: ~, overrides: ~}\n",
			plans:  map[string]Plan{"p": {Name: "p", Period: Monthly, OnExceed: OnExceedBlock}},
			tenant: map[string]Tenant{"t": {Name: "t", Status: StatusActive}},
		},
		{
			name: "anchors and merge keys",
			src: `
plans:
  base: &base {period: yearly, limits: &lim {api_calls: 10}, on_exceed: overage}
  derived: {<<: *base, limits: {api_calls: 20}}
  shared: {limits: *lim}
  multi: {<<: [{period: daily}, *base]}
  self: &self {period: daily, <<: *self}
tenants:
  a: &t {plan: base, customer_id: cus_a}
  b: {<<: *t, customer_id: cus_b}
`,
			plans: map[string]Plan{
				"base":    {Name: "base", Period: Yearly, Limits: map[string]int64{"api_calls": 10}, OnExceed: OnExceedOverage},
				"derived": {Name: "derived", Period: Yearly, Limits: map[string]int64{"api_calls": 20}, OnExceed: OnExceedOverage},
				"shared":  {Name: "shared", Period: Monthly, Limits: map[string]int64{"api_calls": 10}, OnExceed: OnExceedBlock},
				"multi":   {Name: "multi", Period: Daily, Limits: map[string]int64{"api_calls": 10}, OnExceed: OnExceedOverage},
				"self":    {Name: "self", Period: Daily, OnExceed: OnExceedBlock},
			},
			tenant: map[string]Tenant{
				"a": {Name: "a", Plan: "base", CustomerID: "cus_a", Status: StatusActive},
				"b": {Name: "b", Plan: "base", CustomerID: "cus_b", Status: StatusActive},
			},
		},
		{
			name: "quoted and non-string scalars",
			src:  "tenants:\n  \"7\": {billing_anchor: \"2026-01-15\", customer_id: 42, status: \"canceled\"}\n",
			tenant: map[string]Tenant{
				"7": {Name: "7", CustomerID: "42", Status: StatusCanceled},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := mustParse(t, tt.src)
			for name, want := range tt.plans {
				if got, _ := c.Plan(name); !reflect.DeepEqual(got, want) {
					t.Errorf("Plan(%q) = %+v, want %+v", name, got, want)
				}
			}
			if got := c.TenantNames(); !slices.Equal(got, slices.Sorted(maps.Keys(tt.tenant))) {
				t.Errorf("TenantNames() = %q", got)
			}
			for name, want := range tt.tenant {
				got, _, _ := c.Tenant(name)
				got.BillingAnchor = time.Time{}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("Tenant(%q) = %+v, want %+v", name, got, want)
				}
			}
		})
	}
}

// TestParseCatalogMergeFanOut merges each plan twice into the next: expanded
// naively that is 2^40 keys, so the test ends only if every mapping is
// merged once.
func TestParseCatalogMergeFanOut(t *testing.T) {
	var b strings.Builder
	b.WriteString("plans:\n  p0: &p0 {limits: {api_calls: 7}}\n")
	for i := 1; i <= 40; i++ {
		fmt.Fprintf(&b, "  p%d: &p%d {<<: [*p%d, *p%d]}\n", i, i, i-1, i-1)
	}
	c := mustParse(t, b.String())
	if l, ok := c.Plan("p40"); !ok || !maps.Equal(l.Limits, map[string]int64{"api_calls": 7}) {
		t.Errorf("Plan(p40) = %+v, %v", l, ok)
	}
}

func TestParseCatalogErrors(t *testing.T) {
	tests := []struct {
		name, src string
		want      []string // the messages joined by the error
	}{
		// Plans.
		{"plans not a mapping", "plans: [free]", []string{`plans: must be a mapping, not a list`}},
		{"plan not a mapping", "plans: {free: monthly}", []string{`plans.free: must be a mapping, not "monthly"`}},
		{"bad plan name", `plans: {"gold plan": {}}`, []string{`plans."gold plan": plan name must be 1-128 of A-Z a-z 0-9 . _ - with no leading, trailing or double dot`}},
		{"empty plan name", `plans: {"": {}}`, []string{`plans."": plan name must be 1-128 of A-Z a-z 0-9 . _ - with no leading, trailing or double dot`}},
		{"plan key not a string", "plans: {[a]: {}}", []string{`plans: keys must be strings, not a list`}},
		{"duplicate plan", "plans:\n  free: {}\n  free: {period: daily}\n", []string{`plans.free: duplicate key`}},
		{"duplicate plan key", "plans: {free: {period: daily, period: monthly}}", []string{`plans.free.period: duplicate key`}},
		{"unknown plan key", "plans: {free: {limit: {api_calls: 1}}}", []string{`plans.free.limit: unknown key (known keys: period, limits, on_exceed)`}},
		{"bad period", "plans: {free: {period: weekly}}", []string{`plans.free.period: must be daily, monthly or yearly, not "weekly"`}},
		{"period is case-sensitive", "plans: {free: {period: Monthly}}", []string{`plans.free.period: must be daily, monthly or yearly, not "Monthly"`}},
		{"period not a string", "plans: {free: {period: [monthly]}}", []string{`plans.free.period: must be a string, not a list`}},
		{"bad on_exceed", "plans: {free: {on_exceed: warn}}", []string{`plans.free.on_exceed: must be block or overage, not "warn"`}},
		{"limits not a mapping", "plans: {free: {limits: 1000}}", []string{`plans.free.limits: must be a mapping, not "1000"`}},
		{"bad meter name", "plans: {free: {limits: {API: 1}}}", []string{`plans.free.limits.API: meter name must match [a-z][a-z0-9_]{0,63}`}},
		{"meter name with a dot", "plans: {free: {limits: {api.calls: 1}}}", []string{`plans.free.limits."api.calls": meter name must match [a-z][a-z0-9_]{0,63}`}},
		{"negative limit", "plans: {free: {limits: {api_calls: -5}}}", []string{`plans.free.limits.api_calls: must be a non-negative integer, not -5`}},
		{"fractional limit", "plans: {free: {limits: {api_calls: 1.5}}}", []string{`plans.free.limits.api_calls: must be a non-negative integer, not "1.5"`}},
		{"quoted limit", `plans: {free: {limits: {api_calls: "1000"}}}`, []string{`plans.free.limits.api_calls: must be a non-negative integer, not "1000"`}},
		{"limit overflows", "plans: {free: {limits: {api_calls: 9223372036854775808}}}", []string{`plans.free.limits.api_calls: must be a non-negative integer, not "9223372036854775808"`}},
		{"null limit", "plans: {free: {limits: {api_calls: null}}}", []string{`plans.free.limits.api_calls: must be a non-negative integer, not null`}},
		{"duplicate meter", "plans: {free: {limits: {api_calls: 1, api_calls: 2}}}", []string{`plans.free.limits.api_calls: duplicate key`}},
		{"bad merge", "plans: {free: {<<: 5}}", []string{`plans.free.<<: must be a mapping or a list of mappings, not "5"`}},
		{"bad plan stops no tenant", "plans: {free: {period: weekly}}\ntenants: {acme: {plan: free}}",
			[]string{`plans.free.period: must be daily, monthly or yearly, not "weekly"`}},

		// Tenants.
		{"tenants not a mapping", "tenants: acme", []string{`tenants: must be a mapping, not "acme"`}},
		{"unknown plan", "tenants: {acme: {plan: gold}}", []string{`tenants.acme.plan: unknown plan "gold"`}},
		{"bad tenant name", `tenants: {"bad name": {}}`, []string{`tenants."bad name": tenant name must be 1-128 of A-Z a-z 0-9 . _ - with no leading, trailing or double dot`}},
		{"tenant name too long", "tenants: {" + strings.Repeat("a", 129) + ": {}}",
			[]string{`tenants.` + strings.Repeat("a", 129) + `: tenant name must be 1-128 of A-Z a-z 0-9 . _ - with no leading, trailing or double dot`}},
		{"duplicate tenant", "tenants:\n  acme: {}\n  acme: {}\n", []string{`tenants.acme: duplicate key`}},
		{"unknown tenant key", "tenants: {acme: {plna: free}}",
			[]string{`tenants.acme.plna: unknown key (known keys: plan, billing_anchor, billing_url, customer_id, status, overrides)`}},
		{"unknown overrides key", "tenants: {acme: {overrides: {period: daily}}}", []string{`tenants.acme.overrides.period: unknown key (known keys: limits)`}},
		{"bad override", "tenants: {acme: {overrides: {limits: {API: -1}}}}", []string{
			`tenants.acme.overrides.limits.API: meter name must match [a-z][a-z0-9_]{0,63}`,
			`tenants.acme.overrides.limits.API: must be a non-negative integer, not -1`,
		}},
		{"impossible date", "tenants: {acme: {billing_anchor: 2026-02-30}}", []string{`tenants.acme.billing_anchor: must be a date (2026-01-15) or an RFC 3339 time, not "2026-02-30"`}},
		{"date in words", "tenants: {acme: {billing_anchor: Jan 15}}", []string{`tenants.acme.billing_anchor: must be a date (2026-01-15) or an RFC 3339 time, not "Jan 15"`}},
		{"YAML timestamp not RFC 3339", "tenants: {acme: {billing_anchor: 2026-01-15 10:00:00}}", []string{`tenants.acme.billing_anchor: must be a date (2026-01-15) or an RFC 3339 time, not "2026-01-15 10:00:00"`}},
		{"anchor not a string", "tenants: {acme: {billing_anchor: {day: 15}}}", []string{`tenants.acme.billing_anchor: must be a string, not a mapping`}},
		{"ftp URL", `tenants: {acme: {billing_url: "ftp://billing.example.com/acme"}}`, []string{`tenants.acme.billing_url: must be an absolute http or https URL, not "ftp://billing.example.com/acme"`}},
		{"relative URL", `tenants: {acme: {billing_url: /billing/acme}}`, []string{`tenants.acme.billing_url: must be an absolute http or https URL, not "/billing/acme"`}},
		{"URL without scheme", `tenants: {acme: {billing_url: billing.example.com/acme}}`, []string{`tenants.acme.billing_url: must be an absolute http or https URL, not "billing.example.com/acme"`}},
		{"URL without host", `tenants: {acme: {billing_url: "https:///acme"}}`, []string{`tenants.acme.billing_url: must be an absolute http or https URL, not "https:///acme"`}},
		{"URL with a space", `tenants: {acme: {billing_url: "https://billing.example.com/a cme"}}`, []string{`tenants.acme.billing_url: must be an absolute http or https URL, not "https://billing.example.com/a cme"`}},
		{"URL breaking a Link header", `tenants: {acme: {billing_url: "https://billing.example.com/>; rel=x"}}`, []string{`tenants.acme.billing_url: must be an absolute http or https URL, not "https://billing.example.com/>; rel=x"`}},
		{"URL with a password", `tenants: {acme: {billing_url: "https://user:pw@billing.example.com/"}}`, []string{`tenants.acme.billing_url: must not hold a user name or password`}},
		{"duplicate customer id", "tenants:\n  acme: {customer_id: cus_1}\n  beta: {customer_id: cus_2}\n  gamma: {customer_id: cus_1}\n",
			[]string{`tenants.gamma.customer_id: "cus_1" is already the customer id of tenant "acme"`}},
		{"bad status", "tenants: {acme: {status: paused}}", []string{`tenants.acme.status: must be active, past_due, unpaid, canceled or suspended, not "paused"`}},

		// Every problem is reported: decoding problems first.
		{"many", `
plans:
  free: {period: weekly, limits: {api_calls: x}, colour: blue}
  pro: {on_exceed: maybe}
tenants:
  acme: {plan: gold, status: paused}
  "b c": {plan: pro}
`, []string{
			`plans.free.limits.api_calls: must be a non-negative integer, not "x"`,
			`plans.free.colour: unknown key (known keys: period, limits, on_exceed)`,
			`plans.free.period: must be daily, monthly or yearly, not "weekly"`,
			`plans.pro.on_exceed: must be block or overage, not "maybe"`,
			`tenants.acme.plan: unknown plan "gold"`,
			`tenants.acme.status: must be active, past_due, unpaid, canceled or suspended, not "paused"`,
			`tenants."b c": tenant name must be 1-128 of A-Z a-z 0-9 . _ - with no leading, trailing or double dot`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parse(t, tt.src)
			if err == nil {
				t.Fatalf("ParseCatalog = %v, want errors", c)
			}
			if c != nil {
				t.Errorf("ParseCatalog returned a catalog with its error")
			}
			if got, want := err.Error(), strings.Join(tt.want, "\n"); got != want {
				t.Errorf("error:\n%s\nwant:\n%s", got, want)
			}
			var ce *CatalogError
			if !errors.As(err, &ce) || ce.Error() != tt.want[0] {
				t.Errorf("errors.As(*CatalogError) = %v, want %s", ce, tt.want[0])
			}
		})
	}
}

func TestNewCatalogErrors(t *testing.T) {
	_, err := NewCatalog(
		[]Plan{{Name: "free"}, {Name: "free", Period: "weekly"}},
		[]Tenant{{Name: "acme", Plan: "free"}, {Name: "acme"}, {Name: "beta", BillingURL: "mailto:x@example.com"}},
	)
	want := `plans.free: defined more than once
tenants.acme: defined more than once
tenants.beta.billing_url: must be an absolute http or https URL, not "mailto:x@example.com"`
	if err == nil || err.Error() != want {
		t.Errorf("NewCatalog error:\n%v\nwant:\n%s", err, want)
	}
}

func TestLoadCatalogFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, src string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}

	// The rest of a config file, even keys this package does not know, is
	// not its business.
	full := write("meterd.yaml", `
api_keys:
  - {key: 0123456789abcdef, tenant: acme}
nats: {url: "nats://127.0.0.1:4222", replicas: 3}
collector: {spool_dir: /var/lib/meterd/spool}
some_future_section: {anything: [1, 2]}
plans:
  free: {limits: {api_calls: 1000}}
tenants:
  acme: {plan: free, billing_anchor: 2026-01-15}
`)
	c, err := LoadCatalogFile(full)
	if err != nil {
		t.Fatal(err)
	}
	if l, ok := c.Limit("acme", "api_calls"); !ok || l != 1000 {
		t.Errorf("Limit = %d, %v", l, ok)
	}
	if p := c.PeriodOf("acme", ts(t, "2026-03-01")); p.String() != "[2026-02-15T00:00:00Z, 2026-03-15T00:00:00Z)" {
		t.Errorf("PeriodOf = %s", p)
	}

	for _, src := range []string{"", "nats: {url: nats://x}\n"} {
		c, err := LoadCatalogFile(write("empty.yaml", src))
		if err != nil || len(c.TenantNames()) != 0 {
			t.Errorf("LoadCatalogFile(%q) = %v, %v, want an empty catalog", src, c, err)
		}
	}

	bad := write("bad.yaml", "plans: {free: {}}\ntenants: {acme: {plan: gold}}\n")
	_, err = LoadCatalogFile(bad)
	if want := "catalog: " + bad + `: tenants.acme.plan: unknown plan "gold"`; err == nil || err.Error() != want {
		t.Errorf("error = %v, want %s", err, want)
	}
	var ce *CatalogError
	if !errors.As(err, &ce) || ce.Path != "tenants.acme.plan" {
		t.Errorf("errors.As(*CatalogError) = %v", ce)
	}

	syntax := write("syntax.yaml", "plans: {free: [\n")
	if _, err := LoadCatalogFile(syntax); err == nil || !strings.HasPrefix(err.Error(), "catalog: "+syntax+": yaml: ") {
		t.Errorf("syntax error = %v", err)
	}
	if _, err := LoadCatalogFile(filepath.Join(dir, "missing.yaml")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file error = %v, want fs.ErrNotExist", err)
	}
}

func FuzzParseCatalog(f *testing.F) {
	f.Add(example)
	f.Add("plans: {a: &a {<<: [*a, {period: daily}]}}\ntenants: {t: {<<: *a, plan: a}}")
	f.Add("plans: {free: {limits: {API: -1, x: 1.5}}}\ntenants: {acme: {plan: gold, billing_url: ftp://x, billing_anchor: 2026-02-30}}")
	f.Add("tenants: {a: {customer_id: c}, b: {customer_id: c, overrides: {limits: {m: 0x7fffffffffffffff}}}}")
	at := time.Date(2026, time.February, 28, 23, 59, 59, 999999999, time.UTC)
	f.Fuzz(func(t *testing.T, src string) {
		var doc struct {
			Plans   yaml.Node `yaml:"plans"`
			Tenants yaml.Node `yaml:"tenants"`
		}
		if yaml.Unmarshal([]byte(src), &doc) != nil {
			return
		}
		c, err := ParseCatalog(&doc.Plans, &doc.Tenants)
		if err != nil {
			if c != nil {
				t.Fatal("a catalog with an error")
			}
			errs := []error{err}
			if j, ok := err.(interface{ Unwrap() []error }); ok {
				errs = j.Unwrap()
			}
			for _, e := range errs {
				var ce *CatalogError
				if !errors.As(e, &ce) || !(strings.HasPrefix(ce.Path, "plans") || strings.HasPrefix(ce.Path, "tenants")) || ce.Message == "" {
					t.Fatalf("error %q is not a CatalogError with a path", e)
				}
			}
			return
		}
		for _, name := range c.TenantNames() {
			tn, plan, ok := c.Tenant(name)
			if !ok || tn.Name != name || plan.Name != tn.Plan {
				t.Fatalf("Tenant(%q) = %+v, %+v, %v", name, tn, plan, ok)
			}
			for meter, l := range c.Limits(name) {
				if l < 0 || !schemas.ValidMeter(meter) {
					t.Fatalf("tenant %q has limit %q: %d", name, meter, l)
				}
			}
			if p := c.PeriodOf(name, at); !p.Contains(at) {
				t.Fatalf("PeriodOf(%q) = %s does not contain %s", name, p, at)
			}
			if tn.CustomerID != "" {
				if got, _ := c.TenantByCustomer(tn.CustomerID); got != name {
					t.Fatalf("TenantByCustomer(%q) = %q, want %q", tn.CustomerID, got, name)
				}
			}
		}
	})
}

func BenchmarkCatalogLimit(b *testing.B) {
	c := mustParse(b, example)
	b.ReportAllocs()
	for b.Loop() {
		c.Limit("beta.eu", "tokens")
	}
}

func BenchmarkCatalogPeriodOf(b *testing.B) {
	c := mustParse(b, example)
	at := time.Date(2026, time.March, 10, 12, 0, 0, 0, time.UTC)
	b.ReportAllocs()
	for b.Loop() {
		c.PeriodOf("acme", at)
	}
}
