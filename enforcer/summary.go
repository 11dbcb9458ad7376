package enforcer

import (
	"cmp"
	"fmt"
	"maps"
	"math"
	"net/http"
	"slices"
	"time"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/saturating"
	"github.com/meterd/meterd/schemas"
)

// Statuses of a tenant (and of each of its meters) in the usage summary.
const (
	SummaryOK      = "ok"
	SummaryWarning = "warning"
	SummaryBlocked = "blocked"
)

// WarnPercent is the share of a limit at which a meter is in warning, the
// same 80 % at which the enforcer notifies.
const WarnPercent = 80

// Summary is the answer of GET /v1/usage/summary: every tenant of the
// catalog (or the tenant of a tenant key) with its current-period usage
// against each limit.
type Summary struct {
	GeneratedAt time.Time       `json:"generated_at"`
	Tenants     []TenantSummary `json:"tenants"`
}

// TenantSummary is one tenant's line of the summary.
type TenantSummary struct {
	Tenant        string    `json:"tenant"`
	Plan          string    `json:"plan"`
	OnExceed      string    `json:"on_exceed,omitempty"`
	PeriodStart   time.Time `json:"period_start"`
	PeriodEnd     time.Time `json:"period_end"`
	BillingStatus string    `json:"billing_status"`
	// Status is blocked when the tenant's calls get 402, warning when a
	// meter is at WarnPercent of its limit or more (or over it on an
	// overage plan) or the billing status is not active without blocking,
	// else ok. Reason and Detail say why for blocked and warning.
	Status string         `json:"status"`
	Reason schemas.Reason `json:"reason,omitempty"`
	Detail string         `json:"detail,omitempty"`
	// UsageSeeded is false while the usage is being read from the store:
	// Used then holds only what arrived since.
	UsageSeeded bool           `json:"usage_seeded"`
	Meters      []MeterSummary `json:"meters"`
}

// MeterSummary is a meter's usage in the current period.
type MeterSummary struct {
	Meter string `json:"meter"`
	Used  int64  `json:"used"`
	// Saturated is set when the usage sums beyond int64: Used then reads
	// math.MaxInt64 and the true usage is at least that (internal/saturating).
	Saturated bool `json:"saturated,omitempty"`
	// Limit and Percent are absent for a meter without a limit.
	Limit   *int64   `json:"limit,omitempty"`
	Percent *float64 `json:"percent,omitempty"`
	Status  string   `json:"status"`
}

// handleSummary answers GET /v1/usage/summary[?tenant=]. A tenant key sees
// its own tenant only.
func (a *api) handleSummary(w http.ResponseWriter, r *http.Request) {
	p, err := a.keys.Authenticate(r)
	if err != nil {
		auth.Unauthorized(w, err)
		return
	}
	// An undecodable pair is a 400: dropped, tenant=%zz would read as no
	// tenant and give an admin every tenant's summary.
	v, bad := schemas.ParseQuery(r.URL.RawQuery)
	for name := range v {
		if name != "tenant" {
			bad = append(bad, schemas.InvalidParam{Name: name, Reason: "unknown parameter; known: tenant"})
		}
	}
	tenant := v.Get("tenant")
	if len(v["tenant"]) > 1 {
		bad = append(bad, schemas.InvalidParam{Name: "tenant", Reason: "given more than once"})
	} else if v.Has("tenant") && !schemas.ValidTenant(tenant) {
		// Given but empty too: tenant= would read as every tenant.
		bad = append(bad, schemas.InvalidParam{Name: "tenant", Reason: "must be " + schemas.TenantGrammar})
	}
	if len(bad) > 0 {
		slices.SortFunc(bad, func(a, b schemas.InvalidParam) int { return cmp.Compare(a.Name, b.Name) })
		schemas.NewInvalidParams(bad).Write(w)
		return
	}
	if !p.Admin {
		if tenant != "" && tenant != p.Tenant {
			schemas.NewProblem(schemas.ProblemForbidden, "this API key may read only its own tenant's usage").Write(w)
			return
		}
		tenant = p.Tenant
	}
	s := a.summary(tenant)
	if tenant != "" && len(s.Tenants) == 0 && p.Admin {
		schemas.NewProblem(schemas.ProblemTenantNotFound, "no tenant "+tenant+" in the catalog").Write(w)
		return
	}
	writeJSON(w, http.StatusOK, s)
}

// summary returns the usage summary of tenant, or of every tenant of the
// catalog when tenant is "".
func (a *api) summary(tenant string) Summary {
	cat := a.watch.Catalog()
	s := Summary{GeneratedAt: a.now(), Tenants: []TenantSummary{}}
	names := cat.TenantNames()
	if tenant != "" {
		names = nil
		if _, _, ok := cat.Tenant(tenant); ok {
			names = []string{tenant}
		}
	}
	for _, name := range names {
		s.Tenants = append(s.Tenants, a.tenantSummary(cat, name))
	}
	return s
}

func (a *api) tenantSummary(cat *catalog.Catalog, name string) TenantSummary {
	t, plan, _ := cat.Tenant(name)
	limits := cat.Limits(name)
	ts := TenantSummary{
		Tenant: name, Plan: t.Plan, OnExceed: plan.OnExceed,
		BillingStatus: a.billing.status(cat, name), Status: SummaryOK, Meters: []MeterSummary{},
	}
	period, seeded, used := a.track.usageOf(name)
	ts.UsageSeeded, ts.PeriodStart, ts.PeriodEnd = seeded, period.Start, period.End

	meters := slices.Collect(maps.Keys(limits))
	for m := range used {
		if _, limited := limits[m]; !limited {
			meters = append(meters, m)
		}
	}
	slices.Sort(meters)
	var warn string
	for _, m := range meters {
		ms := MeterSummary{Meter: m, Used: used[m], Saturated: saturating.Saturated(used[m]), Status: SummaryOK}
		if limit, ok := limits[m]; ok {
			ms.Limit = &limit
			pct := percent(ms.Used, limit)
			ms.Percent = &pct
			switch {
			case ms.Used >= limit && plan.OnExceed != catalog.OnExceedOverage:
				ms.Status = SummaryBlocked
			case ms.Used >= limit:
				ms.Status = SummaryWarning
				warn = cmp.Or(warn, fmt.Sprintf("%s used %d of %d %s; the excess is billed as overage.", name, ms.Used, limit, m))
			case ms.Used >= thresholdUnits(limit, WarnPercent):
				ms.Status = SummaryWarning
				warn = cmp.Or(warn, fmt.Sprintf("%s used %d of %d %s (%.1f%%) in the period ending %s.", name, ms.Used, limit, m, pct, period.End.Format(time.RFC3339)))
			}
		}
		ts.Meters = append(ts.Meters, ms)
	}
	if st := ts.BillingStatus; st != catalog.StatusActive && warn == "" {
		warn = fmt.Sprintf("%s's billing status is %s.", name, st)
	}
	switch d, blocked := a.pub.decision(name); {
	case blocked:
		ts.Status, ts.Reason, ts.Detail = SummaryBlocked, d.Reason, d.Detail()
	case warn != "":
		ts.Status, ts.Detail = SummaryWarning, warn
	}
	return ts
}

// percent is used/limit in percent, rounded to one decimal.
func percent(used, limit int64) float64 {
	if limit <= 0 {
		return 100
	}
	return math.Round(float64(used)/float64(limit)*1000) / 10
}
