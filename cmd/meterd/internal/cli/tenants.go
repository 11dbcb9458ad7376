package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/enforcer"
	"github.com/meterd/meterd/internal/config"
	"github.com/meterd/meterd/schemas"
)

// The admin commands talk to the enforcer's admin API (an admin API key):
// GET /v1/usage/summary lists the tenants, /v1/tenants/{tenant} reads,
// sets and deletes one, GET /v1/blocklist lists the blocks.

const tenantsHelp = `Usage:
  meterd tenants list [flags]              every tenant of the catalog: plan, status, billing status, period
  meterd tenants get <tenant> [flags]      one tenant: plan, limits, usage this period, block
  meterd tenants set <tenant> [flags]      set a tenant's plan, billing status or limits (admin API)
  meterd tenants delete <tenant> [flags]   remove what the admin API set for a tenant
  meterd blocklist [flags]                 the tenants blocked now, and why

They talk to the enforcer (or meterd dev) with an admin API key: pass
--url and --api-key, or set METERD_URL and METERD_API_KEY.

Examples:
  meterd tenants list
  meterd tenants get acme --format json
  meterd tenants set newco --plan pro --billing-url https://billing.example.com/newco
  meterd tenants set acme --status suspended
  meterd tenants delete newco
  meterd blocklist --format csv

Run 'meterd tenants <command> -h' for the flags of a command.
`

// tenantsVerbs are the tenants commands: their usage line and what they do.
var tenantsVerbs = map[string]struct{ usage, help string }{
	"list": {"meterd tenants list [flags]", `Lists every tenant of the catalog (the config file with the admin API's
changes): plan, status (ok, warning or blocked, with the reason), billing
status and current period (GET /v1/usage/summary).`},
	"get": {"meterd tenants get <tenant> [flags]", `Shows one tenant as the enforcer decides it: plan, billing, each meter's
limit and usage in the current period, and its block if any
(GET /v1/tenants/{tenant}).`},
	"set": {"meterd tenants set <tenant> [flags]", `Sets a tenant through the admin API (PUT /v1/tenants/{tenant}); a tenant
the config file lacks is created. The settings given replace what the admin
API set for the tenant before, as a whole: a setting left out falls back to
the config file, so name every one you want kept. Gates follow within
seconds; the answer is the tenant as decided with the change.`},
	"delete": {"meterd tenants delete <tenant> [flags]", `Removes what the admin API set for a tenant (DELETE /v1/tenants/{tenant}):
a tenant of the config file is back to its settings there, a tenant only
the admin API defined is gone.`},
}

// Tenants runs `meterd tenants list|get|set|delete`.
func Tenants(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	verb, err := verbOf(args, "tenants", tenantsHelp, []string{"list", "get", "set", "delete"}, stdout, stderr)
	if err != nil {
		return err
	}
	v := tenantsVerbs[verb]
	var c clientFlags
	fs := flag.NewFlagSet("meterd tenants "+verb, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage:\n  %s\n\n%s\n\nFlags:\n", v.usage, v.help)
		fs.PrintDefaults()
	}
	c.flags(fs, "the enforcer, or meterd dev")
	if err := config.ApplyEnv(fs); err != nil {
		return Mistake(err)
	}
	// A tenant's settings come from the command line only, never from a
	// METERD_PLAN or METERD_STATUS left in the environment.
	var set tenantSettings
	if verb == "set" {
		set.flags(fs)
	}
	maxArgs := 1
	if verb == "list" {
		maxArgs = 0
	}
	pos, err := parseArgs(fs, args[1:], maxArgs)
	if err != nil {
		return err
	}
	if err := c.check(); err != nil {
		return err
	}
	if verb == "list" {
		return c.listTenants(ctx, stdout)
	}
	if len(pos) == 0 {
		return Mistakef("tenants %s: which tenant? give its name (see meterd tenants list)", verb)
	}
	name := pos[0]
	if !schemas.ValidTenant(name) {
		return Mistakef("tenants %s: %q is not a tenant name (%s)", verb, name, schemas.TenantGrammar)
	}
	path := "/v1/tenants/" + url.PathEscape(name)
	switch verb {
	case "get":
		var view enforcer.TenantView
		if _, err := c.doJSON(ctx, http.MethodGet, path, nil, &view); err != nil {
			return err
		}
		return printTenant(stdout, c.format, view)
	case "set":
		body, err := set.change(fs)
		if err != nil {
			return err
		}
		var view enforcer.TenantView
		if _, err := c.doJSON(ctx, http.MethodPut, path, body, &view); err != nil {
			return err
		}
		return printTenant(stdout, c.format, view)
	}
	var view enforcer.TenantView
	status, err := c.doJSON(ctx, http.MethodDelete, path, nil, &view)
	if err != nil {
		return err
	}
	if status == http.StatusNoContent {
		// Only the admin API defined the tenant: it is gone.
		t := Table{Columns: []Column{Col("tenant"), Col("deleted")}, JSON: map[string]any{"tenant": name, "deleted": true}}
		if c.format == "table" {
			_, err := fmt.Fprintf(stdout, "tenant %s deleted (the config file does not define it)\n", name)
			return err
		}
		t.Add(name, true)
		return t.Print(stdout, c.format)
	}
	if c.format == "table" {
		fmt.Fprintf(stdout, "the admin API's settings of %s removed; the config file's apply:\n\n", name)
	}
	return printTenant(stdout, c.format, view)
}

// doJSON sends method to path with body and decodes a 200 answer into v;
// it returns the answer's status (204 decodes nothing).
func (c *clientFlags) doJSON(ctx context.Context, method, path string, body []byte, v any) (int, error) {
	rc, status, err := c.Do(ctx, method, path, nil, body)
	if err != nil {
		return status, err
	}
	defer rc.Close()
	if status == http.StatusNoContent {
		return status, nil
	}
	if err := decodeAnswer(rc, "the answer", v); err != nil {
		return status, fmt.Errorf("%s %s: %w", method, path, err)
	}
	return status, nil
}

func (c *clientFlags) listTenants(ctx context.Context, w io.Writer) error {
	var s enforcer.Summary
	if _, err := c.doJSON(ctx, http.MethodGet, "/v1/usage/summary", nil, &s); err != nil {
		return err
	}
	t := Table{
		Columns: []Column{Col("tenant"), Col("plan"), {"on_exceed", ""}, {"status", ""}, {"reason", ""}, {"", "STATUS"},
			Col("billing_status"), Col("period_start"), Col("period_end"), {"usage_seeded", ""}},
		JSON:  s.Tenants,
		Empty: "no tenants in the catalog",
	}
	for _, ts := range s.Tenants {
		t.Add(ts.Tenant, ts.Plan, ts.OnExceed, ts.Status, string(ts.Reason), statusText(ts.Status, ts.Reason),
			ts.BillingStatus, ts.PeriodStart, ts.PeriodEnd, ts.UsageSeeded)
	}
	return t.Print(w, c.format)
}

// statusText is a summary status for people: "BLOCKED (quota_exceeded)".
func statusText(status string, reason schemas.Reason) string {
	s := strings.ToUpper(status)
	if reason != "" {
		s += " (" + string(reason) + ")"
	}
	return s
}

// printTenant prints a tenant: its settings and block, then a line per
// meter with its limit and usage (CSV: the meter lines, each with the
// tenant's settings).
func printTenant(w io.Writer, format string, v enforcer.TenantView) error {
	var reason schemas.Reason
	var blocked string
	if v.Blocked != nil {
		reason, blocked = v.Blocked.Reason, string(v.Blocked.Reason)+": "+v.Blocked.Detail()
	}
	meters := Table{
		Columns: []Column{{"tenant", ""}, {"plan", ""}, {"status", ""}, {"billing_status", ""}, {"blocked_reason", ""},
			{"period_start", ""}, {"period_end", ""}, Col("meter"), Col("limit"), Col("used")},
		JSON: v,
	}
	// Every meter with a limit or usage, in order; in CSV a tenant with
	// neither still gets its line, with no meter, or the file would not
	// name it at all.
	names := slices.Sorted(maps.Keys(v.Limits))
	for m := range v.Usage {
		if _, ok := v.Limits[m]; !ok {
			names = append(names, m)
		}
	}
	slices.Sort(names)
	if len(names) == 0 && format == "csv" {
		names = []string{""}
	}
	for _, m := range names {
		var limit *int64
		if l, ok := v.Limits[m]; ok {
			limit = &l
		}
		used := any(v.Usage[m])
		if !v.UsageSeeded {
			used = nil // not read from the store yet
		}
		meters.Add(v.Tenant, v.Plan, v.Status, v.BillingStatus, string(reason), v.PeriodStart, v.PeriodEnd, m, limit, used)
	}
	if format != "table" {
		return meters.Print(w, format)
	}
	usage := "this period"
	if !v.UsageSeeded {
		usage = "being read from the store"
	}
	if err := PrintFields(w, []Field{
		{"Tenant", v.Tenant}, {"Plan", v.Plan}, {"On exceed", v.OnExceed}, {"Status", v.Status}, {"Billing status", v.BillingStatus},
		{"Billing anchor", v.BillingAnchor}, {"Billing URL", v.BillingURL}, {"Customer", v.CustomerID},
		{"Period start", v.PeriodStart}, {"Period end", v.PeriodEnd}, {"Usage", usage}, {"Blocked", blocked},
	}); err != nil {
		return err
	}
	if len(meters.Rows) == 0 {
		return nil
	}
	fmt.Fprintln(w)
	return meters.Print(w, format)
}

// tenantSettings are the flags of `meterd tenants set`: only those given
// go into the change.
type tenantSettings struct {
	plan, anchor, billingURL, customer, status string
	limits                                     limitFlag
	noLimits                                   bool
}

func (s *tenantSettings) flags(fs *flag.FlagSet) {
	fs.StringVar(&s.plan, "plan", "", "the tenant's plan, one of the config file's")
	fs.StringVar(&s.anchor, "billing-anchor", "", "the day periods start from, YYYY-MM-DD")
	fs.StringVar(&s.billingURL, "billing-url", "", "where the tenant pays (the 402's Link)")
	fs.StringVar(&s.customer, "customer-id", "", "the billing provider's customer id, which its webhooks name")
	fs.StringVar(&s.status, "status", "", "billing status: active, past_due, unpaid, canceled or suspended")
	fs.Var(&s.limits, "limit", "override a limit of the plan, `meter=N`; repeat for more (they replace the earlier overrides)")
	fs.BoolVar(&s.noLimits, "no-limits", false, "remove the limit overrides: the plan's limits apply")
}

// change is the body of the PUT: the settings given on the command line.
func (s *tenantSettings) change(fs *flag.FlagSet) ([]byte, error) {
	var ch catalog.Change
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "plan":
			ch.Plan = &s.plan
		case "billing-anchor":
			ch.BillingAnchor = &s.anchor
		case "billing-url":
			ch.BillingURL = &s.billingURL
		case "customer-id":
			ch.CustomerID = &s.customer
		case "status":
			ch.Status = &s.status
		case "limit":
			ch.Overrides = &catalog.ChangeOverrides{Limits: s.limits}
		}
	})
	switch {
	case s.noLimits && ch.Overrides != nil:
		return nil, Mistake(errors.New("tenants set: give --limit or --no-limits, not both"))
	case s.noLimits:
		ch.Overrides = &catalog.ChangeOverrides{Limits: map[string]int64{}}
	}
	if ch == (catalog.Change{}) {
		return nil, Mistake(errors.New("tenants set: nothing to set: give --plan, --billing-anchor, --billing-url, --customer-id, --status, --limit or --no-limits"))
	}
	return json.Marshal(ch)
}

// limitFlag is the repeatable --limit meter=N.
type limitFlag map[string]int64

func (l *limitFlag) String() string {
	if l == nil || *l == nil {
		return ""
	}
	var parts []string
	for _, m := range slices.Sorted(maps.Keys(*l)) {
		parts = append(parts, m+"="+strconv.FormatInt((*l)[m], 10))
	}
	return strings.Join(parts, ",")
}

func (l *limitFlag) Set(v string) error {
	meter, n, ok := strings.Cut(v, "=")
	limit, err := strconv.ParseInt(n, 10, 64)
	if !ok || meter == "" || err != nil {
		return fmt.Errorf("%q is not meter=N (a whole number)", v)
	}
	if *l == nil {
		*l = limitFlag{}
	}
	(*l)[meter] = limit
	return nil
}

// Blocklist runs `meterd blocklist`.
func Blocklist(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var c clientFlags
	fs := flag.NewFlagSet("meterd blocklist", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage:
  meterd blocklist [flags]

Lists the tenants blocked now, as every gate has them: the reason, the meter
and usage of a quota block, the period's end and the decision's version
(GET /v1/blocklist on the enforcer, with an admin API key).

Flags:
`)
		fs.PrintDefaults()
	}
	c.flags(fs, "the enforcer, or meterd dev")
	if err := Parse(fs, args); err != nil {
		return err
	}
	if err := c.check(); err != nil {
		return err
	}
	var b enforcer.BlocklistView
	if _, err := c.doJSON(ctx, http.MethodGet, "/v1/blocklist", nil, &b); err != nil {
		return err
	}
	t := Table{
		Columns: []Column{Col("tenant"), Col("reason"), Col("meter"), Col("used"), Col("limit"), {"period_start", ""}, Col("period_end"),
			{"billing_url", ""}, Col("version"), Col("decided_at")},
		JSON:  b,
		Empty: fmt.Sprintf("no tenant is blocked (blocklist version %d)", b.Version),
	}
	for _, d := range b.Decisions {
		var used, limit *int64
		if d.Reason == schemas.ReasonQuotaExceeded {
			used, limit = &d.Used, &d.Limit
		}
		t.Add(d.Tenant, string(d.Reason), d.Meter, used, limit, d.PeriodStart, d.PeriodEnd, d.BillingURL, d.Version, d.DecidedAt)
	}
	return t.Print(stdout, c.format)
}
