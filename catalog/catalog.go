package catalog

import (
	"errors"
	"maps"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meterd/meterd/schemas"
)

// What a plan does when a tenant's usage reaches a limit.
const (
	OnExceedBlock   = "block"   // the enforcer blocks the tenant until the period ends
	OnExceedOverage = "overage" // usage goes on and is billed as overage
)

// Billing statuses of a tenant, as Stripe names a subscription's states plus
// suspended (an operator's decision).
const (
	StatusActive    = "active"
	StatusPastDue   = "past_due"
	StatusUnpaid    = "unpaid"
	StatusCanceled  = "canceled"
	StatusSuspended = "suspended"
)

// Plan is a named set of limits per billing period.
type Plan struct {
	Name string
	// Period is the cadence of the billing periods; NewCatalog sets Monthly
	// when empty.
	Period Cadence
	// Limits maps a meter name to the most units a tenant may use in one
	// period. A meter without a limit is metered but never blocked.
	Limits map[string]int64
	// OnExceed is OnExceedBlock (NewCatalog's default) or OnExceedOverage.
	OnExceed string
}

// Tenant is a tenant's billing configuration.
type Tenant struct {
	Name string
	// Plan names the tenant's plan; empty means no plan: usage is metered
	// and reported, nothing is limited, periods are monthly.
	Plan string
	// BillingAnchor fixes the day (and, for yearly plans, the month) on which
	// the tenant's periods start; see PeriodAt. Zero means the 1st / Jan 1.
	BillingAnchor time.Time
	// BillingURL is where the tenant pays or upgrades: the Link of a 402.
	BillingURL string
	// CustomerID is the tenant's id at the payment provider (Stripe's
	// cus_…); billing webhooks find the tenant by it.
	CustomerID string
	// Status is one of the Status constants; NewCatalog sets StatusActive
	// when empty.
	Status string
	// Overrides replace the plan's values for this tenant.
	Overrides Overrides
}

// Overrides are a tenant's exceptions to its plan.
type Overrides struct {
	// Limits replace the plan's limit of each meter they name, and add
	// limits for meters the plan does not limit.
	Limits map[string]int64
}

// CatalogError is one thing wrong with plans or tenants. Path names the
// offending key as in the YAML (tenants.acme.plan); a name that is not made
// of letters, digits, '_' and '-' is quoted (tenants."acme.eu").
type CatalogError struct {
	Path    string
	Message string
}

// Error implements error.
func (e *CatalogError) Error() string { return e.Path + ": " + e.Message }

// Catalog is a validated set of plans and tenants. It is immutable: every
// method may be called from any goroutine, and what a method returns is the
// caller's own copy. A reload builds a new Catalog. The zero Catalog holds no
// plans and no tenants.
type Catalog struct {
	plans     map[string]Plan
	tenants   map[string]Tenant
	names     []string                    // tenant names, sorted
	limits    map[string]map[string]int64 // tenant → meter → effective limit
	customers map[string]string           // customer id → tenant
}

// NewCatalog checks plans and tenants, applies the defaults (monthly, block,
// active) and returns a Catalog holding copies of them. The error joins a
// *CatalogError for every problem found.
func NewCatalog(plans []Plan, tenants []Tenant) (*Catalog, error) {
	c, errs := newCatalog(plans, tenants)
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return c, nil
}

func newCatalog(plans []Plan, tenants []Tenant) (*Catalog, []error) {
	c := &Catalog{
		plans:     make(map[string]Plan, len(plans)),
		tenants:   make(map[string]Tenant, len(tenants)),
		names:     make([]string, 0, len(tenants)),
		limits:    make(map[string]map[string]int64, len(tenants)),
		customers: make(map[string]string),
	}
	var errs []error
	bad := func(path, msg string) { errs = append(errs, &CatalogError{Path: path, Message: msg}) }
	for _, p := range plans {
		c.addPlan(p, bad)
	}
	for _, t := range tenants {
		if c.addTenant(t, bad) {
			c.names = append(c.names, t.Name)
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	sortNames(c.names)
	return c, nil
}

// sortNames sorts names in O(n + k log k) when all but the last k are in
// order already, as when Merge appends the admin API's tenants to those of
// the file catalog: one admin change to a catalog of a million tenants must
// not sort them all again. Other input costs what slices.Sort costs.
func sortNames(names []string) {
	i := 1
	for i < len(names) && names[i-1] <= names[i] {
		i++
	}
	if i >= len(names) {
		return
	}
	tail := slices.Clone(names[i:])
	slices.Sort(tail)
	// Merge the sorted head names[:i] and tail into names, from the back.
	a, b := i-1, len(tail)-1
	for k := len(names) - 1; b >= 0; k-- {
		if a >= 0 && names[a] > tail[b] {
			names[k] = names[a]
			a--
		} else {
			names[k] = tail[b]
			b--
		}
	}
}

// checkName returns the path of the entry name of section (kind names it
// in messages) and reports its name when it is not a valid one; ok is false,
// and the entry must be skipped, when name is already in m.
func checkName[V any](m map[string]V, section, kind, name string, bad func(path, msg string)) (path string, ok bool) {
	path = section + "." + pathKey(name)
	if _, dup := m[name]; dup {
		bad(path, "defined more than once")
		return path, false
	}
	if !schemas.ValidTenant(name) {
		bad(path, kind+" name must be "+schemas.TenantGrammar)
	}
	return path, true
}

func (c *Catalog) addPlan(p Plan, bad func(path, msg string)) {
	path, ok := checkName(c.plans, "plans", "plan", p.Name, bad)
	if !ok {
		return
	}
	switch {
	case p.Period == "":
		p.Period = Monthly
	case !p.Period.valid():
		bad(path+".period", "must be daily, monthly or yearly, not "+strconv.Quote(string(p.Period)))
	}
	p.Limits = checkLimits(path+".limits", p.Limits, bad)
	switch p.OnExceed {
	case "":
		p.OnExceed = OnExceedBlock
	case OnExceedBlock, OnExceedOverage:
	default:
		bad(path+".on_exceed", "must be block or overage, not "+strconv.Quote(p.OnExceed))
	}
	// Added even when invalid, so that its tenants do not report an
	// unknown plan as well.
	c.plans[p.Name] = p
}

// addTenant checks t and adds it, also when invalid (bad is told, and the
// catalog is not used); it reports whether it added t, which it does not
// when t's name is taken. The caller lists the names.
func (c *Catalog) addTenant(t Tenant, bad func(path, msg string)) bool {
	path, ok := checkName(c.tenants, "tenants", "tenant", t.Name, bad)
	if !ok {
		return false
	}
	plan, ok := c.plans[t.Plan]
	if t.Plan != "" && !ok {
		bad(path+".plan", "unknown plan "+strconv.Quote(t.Plan))
	}
	t.BillingAnchor = t.BillingAnchor.UTC()
	if t.BillingURL != "" {
		if u, ok := parseBillingURL(t.BillingURL); !ok {
			bad(path+".billing_url", "must be an absolute http or https URL, not "+strconv.Quote(t.BillingURL))
		} else if u.User != nil {
			// Every client of the tenant sees it in a 402.
			bad(path+".billing_url", "must not hold a user name or password")
		}
	}
	if t.CustomerID != "" {
		if other, dup := c.customers[t.CustomerID]; dup {
			bad(path+".customer_id", strconv.Quote(t.CustomerID)+" is already the customer id of tenant "+strconv.Quote(other))
		} else {
			c.customers[t.CustomerID] = t.Name
		}
	}
	switch t.Status {
	case "":
		t.Status = StatusActive
	case StatusActive, StatusPastDue, StatusUnpaid, StatusCanceled, StatusSuspended:
	default:
		bad(path+".status", "must be active, past_due, unpaid, canceled or suspended, not "+strconv.Quote(t.Status))
	}
	t.Overrides.Limits = checkLimits(path+".overrides.limits", t.Overrides.Limits, bad)
	c.tenants[t.Name] = t
	if len(t.Overrides.Limits) == 0 && len(plan.Limits) > 0 {
		// Shared with the plan (neither is ever modified): a million tenants
		// on a few plans hold a few limit maps, not a million.
		c.limits[t.Name] = plan.Limits
	} else if len(plan.Limits)+len(t.Overrides.Limits) > 0 {
		eff := make(map[string]int64, len(plan.Limits)+len(t.Overrides.Limits))
		maps.Copy(eff, plan.Limits)
		maps.Copy(eff, t.Overrides.Limits)
		c.limits[t.Name] = eff
	}
	return true
}

// checkLimits reports every bad meter name and negative limit of limits, in
// meter order, and returns a copy of limits, nil when empty.
func checkLimits(path string, limits map[string]int64, bad func(path, msg string)) map[string]int64 {
	for _, meter := range slices.Sorted(maps.Keys(limits)) {
		p := path + "." + pathKey(meter)
		if !schemas.ValidMeter(meter) {
			bad(p, "meter name must match "+schemas.MeterGrammar)
		}
		if n := limits[meter]; n < 0 {
			bad(p, "must be a non-negative integer, not "+strconv.FormatInt(n, 10))
		}
	}
	if len(limits) == 0 {
		return nil
	}
	return maps.Clone(limits)
}

// parseBillingURL parses s as an absolute http or https URL that can go
// verbatim into a Link header: no spaces, no controls, none of the characters
// RFC 3986 never allows.
func parseBillingURL(s string) (*url.URL, bool) {
	if strings.ContainsFunc(s, func(r rune) bool { return r <= ' ' || r >= 0x7f || strings.ContainsRune(`"<>\^`+"`{|}", r) }) {
		return nil, false
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, false
	}
	return u, true
}

// pathKey is name as one segment of a CatalogError path.
func pathKey(name string) string {
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return strconv.Quote(name)
		}
	}
	if name == "" {
		return `""`
	}
	return name
}

// Tenant returns the tenant called name and its plan; ok is false when the
// catalog does not know the tenant. A tenant without a plan comes with the
// zero Plan.
func (c *Catalog) Tenant(name string) (t Tenant, p Plan, ok bool) {
	t, ok = c.tenants[name]
	if !ok {
		return Tenant{}, Plan{}, false
	}
	t.Overrides.Limits = maps.Clone(t.Overrides.Limits)
	if t.Plan != "" {
		p, _ = c.Plan(t.Plan)
	}
	return t, p, true
}

// Has reports whether the catalog lists tenant, without copying anything.
func (c *Catalog) Has(tenant string) bool {
	_, ok := c.tenants[tenant]
	return ok
}

// Same reports whether tenant is configured alike in c and other: listed in
// both with the same settings and overrides, on plans of the same cadence,
// limits and on_exceed; or listed in neither. What is decided about a
// tenant from the catalog stands while Same holds, so a component switching
// catalogs need only look again at the tenants it does not hold for.
func (c *Catalog) Same(other *Catalog, tenant string) bool {
	if c == other {
		return true
	}
	a, inC := c.tenants[tenant]
	b, inOther := other.tenants[tenant]
	if !inC || !inOther {
		return inC == inOther
	}
	if a.Plan != b.Plan || !a.BillingAnchor.Equal(b.BillingAnchor) || a.BillingURL != b.BillingURL ||
		a.CustomerID != b.CustomerID || a.Status != b.Status || !maps.Equal(a.Overrides.Limits, b.Overrides.Limits) {
		return false
	}
	pa, pb := c.plans[a.Plan], other.plans[b.Plan]
	return pa.Period == pb.Period && pa.OnExceed == pb.OnExceed && maps.Equal(pa.Limits, pb.Limits)
}

// HasPlan reports whether tenant is listed with a plan, without copying
// anything (the forward-auth check asks it on every call).
func (c *Catalog) HasPlan(tenant string) bool {
	t, ok := c.tenants[tenant]
	return ok && t.Plan != ""
}

// Plan returns the plan called name.
func (c *Catalog) Plan(name string) (Plan, bool) {
	p, ok := c.plans[name]
	p.Limits = maps.Clone(p.Limits)
	return p, ok
}

// TenantNames returns the names of the catalog's tenants, sorted.
func (c *Catalog) TenantNames() []string { return slices.Clone(c.names) }

// Limits returns the limits of tenant: its plan's, with its overrides applied.
// It is nil for a tenant with no limits, or unknown to the catalog.
func (c *Catalog) Limits(tenant string) map[string]int64 {
	return maps.Clone(c.limits[tenant])
}

// Limit returns the limit of tenant on meter, as Limits(tenant)[meter] does,
// without copying the limits; ok is false when the meter is not limited.
func (c *Catalog) Limit(tenant, meter string) (limit int64, ok bool) {
	limit, ok = c.limits[tenant][meter]
	return limit, ok
}

// PeriodOf returns the billing period of tenant that contains at: its plan's
// cadence from its billing anchor. A tenant without a plan has monthly
// periods from its billing anchor; one unknown to the catalog, monthly
// periods from the 1st.
func (c *Catalog) PeriodOf(tenant string, at time.Time) Period {
	t := c.tenants[tenant]
	cadence := Monthly
	if t.Plan != "" {
		cadence = c.plans[t.Plan].Period
	}
	return PeriodAt(cadence, t.BillingAnchor, at)
}

// TenantByCustomer returns the tenant whose CustomerID is id.
func (c *Catalog) TenantByCustomer(id string) (tenant string, ok bool) {
	tenant, ok = c.customers[id]
	return tenant, ok
}
