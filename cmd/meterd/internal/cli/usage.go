package cli

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/meterd/meterd/aggregator/report"
	"github.com/meterd/meterd/enforcer"
	"github.com/meterd/meterd/schemas"
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

// clientFlags are the flags both usage commands share: where meterd is and
// how to authenticate, and how to print.
type clientFlags struct {
	Client
	format  string
	timeout time.Duration
}

func (c *clientFlags) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.URL, "url", "http://"+DevAddr, "base URL of meterd (dev, or the aggregator for reports and the enforcer for the summary)")
	fs.StringVar(&c.APIKey, "api-key", "", "API key: a tenant key reads its own tenant, an admin key every tenant")
	formatFlag(fs, &c.format)
	fs.DurationVar(&c.timeout, "timeout", time.Minute, "give up after this long")
}

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
	c.flags(fs)
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
	if len(rep.Rows) == 0 {
		fmt.Fprintln(stdout, "no usage in that range")
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	header := []string{"TENANT", "METER", "WINDOW START", "WINDOW END"}
	for _, d := range rep.GroupBy {
		header = append(header, strings.ToUpper(d))
	}
	fmt.Fprintln(tw, strings.Join(append(header, "VALUE", "EVENTS"), "\t"))
	for _, r := range rep.Rows {
		cells := []string{r.Tenant, r.Meter, r.WindowStart.Format(time.RFC3339), r.WindowEnd.Format(time.RFC3339)}
		for _, d := range rep.GroupBy {
			cells = append(cells, cmp.Or(r.Dimensions[d], "-"))
		}
		cells = append(cells, Group(r.Value), Group(r.Events))
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

// Report is the JSON answer of GET /v1/usage.
type Report struct {
	GroupBy []string `json:"group_by"`
	Rows    []struct {
		Tenant      string            `json:"tenant"`
		Meter       string            `json:"meter"`
		WindowStart time.Time         `json:"window_start"`
		WindowEnd   time.Time         `json:"window_end"`
		Value       int64             `json:"value"`
		Events      int64             `json:"events"`
		Dimensions  map[string]string `json:"dimensions"`
	} `json:"rows"`
}

// DecodeReport reads a Report from body.
func DecodeReport(body io.Reader) (Report, error) {
	var rep Report
	if err := json.NewDecoder(body).Decode(&rep); err != nil {
		return rep, fmt.Errorf("reading the report: %w", err)
	}
	return rep, nil
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
	c.flags(fs)
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
	if c.format == "json" {
		_, err := io.Copy(stdout, body)
		return err
	}
	var s enforcer.Summary
	if err := json.NewDecoder(body).Decode(&s); err != nil {
		return fmt.Errorf("reading the summary: %w", err)
	}
	if c.format == "csv" {
		header := []string{"tenant", "plan", "status", "reason", "meter", "used", "limit", "percent", "meter_status", "period_start", "period_end", "billing_status"}
		return writeCSV(stdout, header, func(write func(...string)) {
			for _, t := range s.Tenants {
				for _, m := range summaryMeters(t) {
					write(t.Tenant, t.Plan, t.Status, string(t.Reason), m.Meter, num(&m.Used), num(m.Limit), pct(m.Percent), m.Status,
						t.PeriodStart.Format(time.RFC3339), t.PeriodEnd.Format(time.RFC3339), t.BillingStatus)
				}
			}
		})
	}
	if len(s.Tenants) == 0 {
		fmt.Fprintln(stdout, "no tenants in the catalog")
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TENANT\tPLAN\tSTATUS\tMETER\tUSED\tLIMIT\tUSED %\tPERIOD END\tWHY")
	for _, t := range s.Tenants {
		for i, m := range summaryMeters(t) {
			name, plan, status, end, why := t.Tenant, cmp.Or(t.Plan, "-"), t.Status, t.PeriodEnd.Format(time.DateOnly), t.Detail
			if i > 0 {
				name, plan, status, end, why = "", "", "", "", ""
			}
			status = strings.ToUpper(status)
			if status != "" && t.Reason != "" {
				status += " (" + string(t.Reason) + ")"
			}
			limit, p := "-", "-"
			if m.Limit != nil {
				limit, p = Group(*m.Limit), pct(m.Percent)+"%"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name, plan, status, cmp.Or(m.Meter, "-"), Group(m.Used), limit, p, end, why)
		}
	}
	return tw.Flush()
}

// summaryMeters returns t's meters, or one empty line for a tenant without
// any, so that every tenant shows.
func summaryMeters(t enforcer.TenantSummary) []enforcer.MeterSummary {
	if len(t.Meters) == 0 {
		return []enforcer.MeterSummary{{}}
	}
	return t.Meters
}

func num(v *int64) string {
	if v == nil {
		return ""
	}
	return strconv.FormatInt(*v, 10)
}

func pct(v *float64) string {
	if v == nil {
		return ""
	}
	return strconv.FormatFloat(*v, 'f', 1, 64)
}

// Group formats n with thousands separators: 1234567 → 1,234,567.
func Group(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	if neg {
		b.WriteByte('-')
	}
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func (c *clientFlags) check() error {
	if err := checkFormat(c.format); err != nil {
		return err
	}
	u, err := url.Parse(c.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return Mistakef("--url must be an http(s) URL such as http://%s, not %q", DevAddr, c.URL)
	}
	c.URL = strings.TrimRight(c.URL, "/")
	c.HTTP = &http.Client{Timeout: c.timeout}
	return nil
}

// formatFlag defines --format, the output of a client command.
func formatFlag(fs *flag.FlagSet, p *string) {
	fs.StringVar(p, "format", "table", "output: table (for people), csv or json (for scripts)")
}

// checkFormat accepts the values of --format.
func checkFormat(format string) error {
	switch format {
	case "table", "csv", "json":
		return nil
	}
	return Mistakef("--format must be table, csv or json, not %q", format)
}

// Client reads from a running meterd.
type Client struct {
	// URL is the base URL of meterd, without a trailing slash.
	URL string
	// APIKey is sent as a bearer token; empty sends none.
	APIKey string
	// HTTP sends the requests; its Timeout bounds each.
	HTTP *http.Client
}

// Get fetches path with query v and returns the body of a 200 answer,
// which the caller must close; any other answer becomes an error that says
// what the server said.
func (c *Client) Get(ctx context.Context, path string, v url.Values) (io.ReadCloser, error) {
	u := c.URL + path
	if len(v) > 0 {
		u += "?" + v.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	if c.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+c.APIKey)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return nil, fmt.Errorf("cannot reach meterd at %s (%v); is it running? (start one with: meterd dev)", c.URL, op.Err)
		}
		return nil, fmt.Errorf("GET %s: %w", path, err)
	}
	if resp.StatusCode == http.StatusOK {
		return resp.Body, nil
	}
	defer resp.Body.Close()
	return nil, problemError(path, resp)
}

// problemError turns a non-200 answer into an error: the problem's detail
// and each invalid parameter, or the status and the start of the body.
func problemError(path string, resp *http.Response) error {
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	media, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	var p schemas.Problem
	if media == schemas.MediaProblem && json.Unmarshal(raw, &p) == nil && p.Status != 0 {
		msg := fmt.Sprintf("%s: %d %s", path, p.Status, p.Title)
		if p.Detail != "" {
			msg += ": " + p.Detail
		}
		if resp.StatusCode == http.StatusUnauthorized {
			msg += " (pass --api-key or set METERD_API_KEY)"
		}
		return errors.New(msg)
	}
	body := strings.TrimSpace(string(raw))
	if len(body) > 200 {
		body = body[:200] + "…"
	}
	return fmt.Errorf("%s: %s: %s", path, resp.Status, body)
}
