package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/url"
	"slices"
	"time"

	"github.com/meterd/meterd/aggregator/report"
	"github.com/meterd/meterd/enforcer"
	"github.com/meterd/meterd/internal/saturating"
)

const usageHelp = `Usage:
  meterd usage [flags]           usage per tenant, meter and window (GET /v1/usage)
  meterd usage summary [flags]   each tenant's current period against its limits (GET /v1/usage/summary)

Examples:
  meterd usage --tenant acme --window day --from 2026-11-01T00:00:00Z
  meterd usage --window period --group-by route,method --format csv > usage.csv
  meterd usage summary

Flags:
`

// Usage runs `meterd usage` and `meterd usage summary`.
func Usage(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "summary" {
		return Summary(ctx, args[1:], stdout, stderr)
	}
	var c clientFlags
	var q struct{ tenant, meter, from, to, window, groupBy string }
	fs := flag.NewFlagSet("meterd usage", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(fs.Output(), usageHelp); fs.PrintDefaults() }
	c.flags(fs, "dev, or the aggregator for reports and the enforcer for the summary")
	fs.StringVar(&q.tenant, "tenant", "", "only this tenant (a tenant key implies its own)")
	fs.StringVar(&q.meter, "meter", "", "only this meter")
	fs.StringVar(&q.from, "from", "", "start, RFC 3339 (default: the start of the current month; of the current period for --window period; of today for --window hour)")
	fs.StringVar(&q.to, "to", "", "end, exclusive, RFC 3339 (default: now)")
	fs.StringVar(&q.window, "window", report.WindowDay, "hour, day, month or period (each tenant's billing periods)")
	fs.StringVar(&q.groupBy, "group-by", "", "dimensions to split rows by, comma separated")
	if err := Parse(fs, args); err != nil {
		return err
	}
	if err := givenEmpty(fs, "tenant", "meter"); err != nil {
		return err
	}
	if err := c.check(); err != nil {
		return err
	}
	v := url.Values{}
	for name, val := range map[string]string{"tenant": q.tenant, "meter": q.meter, "from": q.from, "to": q.to, "window": q.window, "group_by": q.groupBy} {
		if val != "" {
			v.Set(name, val)
		}
	}
	if c.format == "csv" {
		v.Set("format", "csv")
	}
	body, err := c.Get(ctx, "/v1/usage", v)
	if err != nil {
		return err
	}
	defer body.Close()
	if c.format != "table" {
		_, err := io.Copy(stdout, body)
		return err
	}
	rep, err := DecodeReport(body)
	if err != nil {
		return err
	}
	t := Table{Columns: []Column{Col("tenant"), Col("meter"), Col("window_start"), Col("window_end")}, Empty: "no usage in that range"}
	for _, d := range rep.GroupBy {
		t.Columns = append(t.Columns, Col(d))
	}
	t.Columns = append(t.Columns, Col("value"), Col("events"))
	for _, r := range rep.Rows {
		cells := []any{r.Tenant, r.Meter, r.WindowStart, r.WindowEnd}
		for _, d := range rep.GroupBy {
			cells = append(cells, r.Dimensions[d])
		}
		t.Add(append(cells, atLeast(r.Value, r.Saturated), atLeast(r.Events, r.Saturated))...)
	}
	return t.Print(stdout, c.format)
}

// DecodeReport reads the JSON answer of GET /v1/usage from body.
func DecodeReport(body io.Reader) (report.Document, error) {
	var rep report.Document
	err := decodeAnswer(body, "the report", &rep)
	return rep, err
}

// atLeast is the cell of a sum of a row or meter flagged saturated: AtLeast
// for the sum that reads math.MaxInt64, the number as it is otherwise.
func atLeast(v int64, saturated bool) any {
	if saturated && saturating.Saturated(v) {
		return AtLeast(v)
	}
	return v
}

// givenEmpty refuses a filter flag set to the empty string: --tenant "$T"
// with T unset would otherwise ask for every tenant.
func givenEmpty(fs *flag.FlagSet, names ...string) error {
	var err error
	fs.Visit(func(f *flag.Flag) {
		if err == nil && slices.Contains(names, f.Name) && f.Value.String() == "" {
			err = Mistakef("--%s is empty: name one, or leave the flag out for all", f.Name)
		}
	})
	return err
}

// Summary runs `meterd usage summary`.
func Summary(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var c clientFlags
	var tenant string
	fs := flag.NewFlagSet("meterd usage summary", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(fs.Output(), usageHelp); fs.PrintDefaults() }
	c.flags(fs, "dev, or the aggregator for reports and the enforcer for the summary")
	fs.StringVar(&tenant, "tenant", "", "only this tenant (a tenant key implies its own)")
	if err := Parse(fs, args); err != nil {
		return err
	}
	if err := givenEmpty(fs, "tenant"); err != nil {
		return err
	}
	if err := c.check(); err != nil {
		return err
	}
	v := url.Values{}
	if tenant != "" {
		v.Set("tenant", tenant)
	}
	body, err := c.Get(ctx, "/v1/usage/summary", v)
	if err != nil {
		return err
	}
	defer body.Close()
	if c.format == "json" { // as the API has it, like meterd usage's
		_, err := io.Copy(stdout, body)
		return err
	}
	var s enforcer.Summary
	if err := decodeAnswer(body, "the summary", &s); err != nil {
		return err
	}
	t := Table{
		Columns: []Column{Col("tenant"), Col("plan"), {"status", ""}, {"reason", ""}, {"", "STATUS"}, Col("meter"), Col("used"), Col("limit"),
			{"percent", "USED %"}, {"meter_status", ""}, {"period_start", ""}, {"period_end", ""}, {"", "PERIOD END"}, {"billing_status", ""}, {"", "WHY"}},
		Empty: "no tenants in the catalog",
	}
	for _, ts := range s.Tenants {
		status := statusText(ts.Status, ts.Reason)
		for i, m := range summaryMeters(ts) {
			// A tenant's first line names it; the next ones are its other meters.
			rec := []any{ts.Tenant, ts.Plan, ts.Status, string(ts.Reason), status}
			if i > 0 {
				for j, v := range rec {
					rec[j] = Repeat{v}
				}
			}
			t.Add(append(rec, m.Meter, atLeast(m.Used, m.Saturated), m.Limit, Percent(m.Percent), m.Status, ts.PeriodStart, ts.PeriodEnd,
				firstOf(i, ts.PeriodEnd.Format(time.DateOnly)), ts.BillingStatus, firstOf(i, ts.Detail))...)
		}
	}
	return t.Print(stdout, c.format)
}

// firstOf is v on a record's first line (i == 0), a Repeat of it after.
func firstOf(i int, v any) any {
	if i > 0 {
		return Repeat{v}
	}
	return v
}

// summaryMeters returns t's meters, or one empty line for a tenant without
// any, so that every tenant shows.
func summaryMeters(t enforcer.TenantSummary) []enforcer.MeterSummary {
	if len(t.Meters) == 0 {
		return []enforcer.MeterSummary{{}}
	}
	return t.Meters
}
