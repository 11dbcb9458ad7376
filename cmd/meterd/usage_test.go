package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/cmd/meterd/internal/cli"
)

const usageCLIConfig = `plans:
  free: {period: monthly, limits: {api_calls: 1000}, on_exceed: block}
  open: {period: monthly}
tenants:
  acme:   {plan: free}
  globex: {plan: free}
api_keys:
  - {key: admin-key-for-the-cli-test, admin: true}
  - {key: acme-key-for-the-cli-test0, tenant: acme}
`

// meterd runs `meterd args…` and returns its exit code, stdout and stderr.
func meterd(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut strings.Builder
	code := run(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

// The usage CLI over a running meterd dev: a table for people, CSV and JSON
// for scripts, the summary, and clear errors with non-zero exit codes.
func TestUsageCLI(t *testing.T) {
	s := startE2EDev(t, usageCLIConfig)
	// Events of this hour, so that the default range (this month) holds them.
	now := time.Now().UTC().Truncate(time.Hour)
	var body strings.Builder
	body.WriteString("[")
	for i := range 30 {
		tenant, route := "acme", "/a"
		if i%3 == 0 {
			route = "/b"
		}
		if i >= 25 {
			tenant = "globex"
		}
		if i > 0 {
			body.WriteString(",")
		}
		fmt.Fprintf(&body, `{"id":"e%d","tenant":"%s","meter":"api_calls","value":%d,"time":"%s","dimensions":{"route":"%s"}}`,
			i, tenant, 10+i, now.Format(time.RFC3339), route)
	}
	body.WriteString("]")
	a, err := s.do(http.MethodPost, "/v1/events", http.Header{"Content-Type": {"application/json"}, "Authorization": {"Bearer admin-key-for-the-cli-test"}}, []byte(body.String()))
	if err != nil || a.status != http.StatusAccepted {
		t.Fatalf("POST /v1/events: %v %+v", err, a)
	}
	// acme: i in 0..24, /b for i%3==0 (9 events: 0,3,…,24), /a the other 16.
	var acmeA, acmeB, globex int64
	for i := range 30 {
		switch {
		case i >= 25:
			globex += int64(10 + i)
		case i%3 == 0:
			acmeB += int64(10 + i)
		default:
			acmeA += int64(10 + i)
		}
	}
	base := []string{"usage", "--url", s.base, "--api-key", "admin-key-for-the-cli-test"}
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, out, _ := meterd(t, append(base, "--format", "json", "--tenant", "globex")...)
		if code == 0 && strings.Contains(out, fmt.Sprintf(`"value":%d`, globex)) && summaryUsed(t, s, "acme") == acmeA+acmeB {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("usage not reported after 20 s: %s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// The table: a header and aligned columns, one row per route.
	code, out, errOut := meterd(t, append(base, "--tenant", "acme", "--window", "hour", "--group-by", "route")...)
	if code != 0 {
		t.Fatalf("table: exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("table has %d lines, want 3:\n%s", len(lines), out)
	}
	header := regexp.MustCompile(`^TENANT +METER +WINDOW START +WINDOW END +ROUTE +VALUE +EVENTS$`)
	if !header.MatchString(lines[0]) {
		t.Errorf("header %q", lines[0])
	}
	start, end := now.Format(time.RFC3339), now.Add(time.Hour)
	for i, want := range []struct {
		route  string
		value  int64
		events int
	}{{"/a", acmeA, 16}, {"/b", acmeB, 9}} {
		fields := strings.Fields(lines[i+1])
		if len(fields) != 7 || fields[0] != "acme" || fields[1] != "api_calls" || fields[2] != start || fields[4] != want.route ||
			fields[5] != cli.Group(want.value) || fields[6] != fmt.Sprint(want.events) {
			t.Errorf("row %d = %q, want acme api_calls %s … %s %d %d", i, lines[i+1], start, want.route, want.value, want.events)
		}
		// The window ends at the end of the hour, or now when that is sooner.
		if we, err := time.Parse(time.RFC3339, fields[3]); err != nil || we.After(end) {
			t.Errorf("row %d window end %q", i, fields[3])
		}
		if fieldStart(lines[i+1], 5) != strings.Index(lines[0], "VALUE") {
			t.Errorf("value column not aligned with its header:\n%s\n%s", lines[0], lines[i+1])
		}
	}

	// CSV for scripts, every tenant.
	code, out, errOut = meterd(t, append(base, "--format", "csv", "--window", "month")...)
	if code != 0 {
		t.Fatalf("csv: exit %d: %s", code, errOut)
	}
	recs, err := csv.NewReader(strings.NewReader(out)).ReadAll()
	if err != nil || len(recs) != 3 || strings.Join(recs[0], ",") != "tenant,meter,window_start,window_end,value,events" ||
		recs[1][0] != "acme" || recs[1][4] != fmt.Sprint(acmeA+acmeB) || recs[2][0] != "globex" || recs[2][4] != fmt.Sprint(globex) {
		t.Errorf("csv: %v %q", err, recs)
	}

	// A tenant key reads its own tenant; asking for another fails.
	code, out, _ = meterd(t, "usage", "--url", s.base, "--api-key", "acme-key-for-the-cli-test0", "--format", "json")
	if code != 0 || strings.Contains(out, "globex") || !strings.Contains(out, `"tenant":"acme"`) {
		t.Errorf("tenant key: exit %d: %s", code, out)
	}
	code, _, errOut = meterd(t, "usage", "--url", s.base, "--api-key", "acme-key-for-the-cli-test0", "--tenant", "globex")
	if code != 1 || !strings.Contains(errOut, "403") || !strings.Contains(errOut, "only its own tenant") {
		t.Errorf("other tenant: exit %d: %s", code, errOut)
	}

	// The summary.
	code, out, errOut = meterd(t, "usage", "summary", "--url", s.base, "--api-key", "admin-key-for-the-cli-test")
	if code != 0 {
		t.Fatalf("summary: exit %d: %s", code, errOut)
	}
	row := regexp.MustCompile(fmt.Sprintf(`(?m)^acme +free +OK +api_calls +%s +1,000 +%.1f%% `, cli.Group(acmeA+acmeB), float64(acmeA+acmeB)/10))
	if !strings.Contains(out, "TENANT") || !row.MatchString(out) || !strings.Contains(out, "globex") {
		t.Errorf("summary table:\n%s", out)
	}

	// Mistakes: a clear message and a non-zero exit code.
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"--window", "week"}, 1, "window: must be hour, day, month or period"},
		{[]string{"--from", "yesterday"}, 1, "from: must be an RFC 3339 time"},
		{[]string{"--group-by", "no good"}, 1, "group_by"},
		{[]string{"--format", "xml"}, 2, "--format must be table, csv or json"},
		{[]string{"--url", "ftp://x"}, 2, "--url must be an http(s) URL"},
		{[]string{"--api-key", "wrong-key-0123456789"}, 1, "401 Unauthorized: the API key is not known"},
		{[]string{"--api-key", ""}, 1, "pass --api-key or set METERD_API_KEY"},
		{[]string{"--url", "http://" + closedAddr(t)}, 1, "cannot reach meterd at"},
		{[]string{"--bogus"}, 2, "flag provided but not defined: -bogus"},
	} {
		args := append([]string{"usage", "--url", s.base, "--api-key", "admin-key-for-the-cli-test"}, c.args...)
		code, _, errOut := meterd(t, args...)
		if code != c.code || !strings.Contains(errOut, c.msg) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d and %q", c.args, code, errOut, c.code, c.msg)
		}
	}
}

// summaryUsed reads tenant's api_calls usage from the summary API.
func summaryUsed(t *testing.T, s *e2eDev, tenant string) int64 {
	a, err := s.do(http.MethodGet, "/v1/usage/summary?tenant="+tenant, http.Header{"Authorization": {"Bearer admin-key-for-the-cli-test"}}, nil)
	if err != nil || a.status != http.StatusOK {
		return -1
	}
	var sum struct {
		Tenants []struct {
			Meters []struct {
				Meter string
				Used  int64
			}
		}
	}
	if json.Unmarshal(a.body, &sum) != nil || len(sum.Tenants) != 1 {
		return -1
	}
	for _, m := range sum.Tenants[0].Meters {
		if m.Meter == "api_calls" {
			return m.Used
		}
	}
	return 0
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// `meterd demo` runs the whole story in under a minute and prints its key
// lines: the quota 402 with its body, the webhook block and restore, usage
// equal to the allowed calls, the summary and the reports.
func TestDemo(t *testing.T) {
	start := time.Now()
	code, out, errOut := meterd(t, "demo", "--traffic", "5s")
	took := time.Since(start)
	if code != 0 {
		t.Fatalf("demo: exit %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	t.Logf("demo took %s", took.Round(time.Millisecond))
	for _, re := range []string{
		`meterd dev ready on http://127\.0\.0\.1:\d+`,
		`acme's call \d+ was refused: the gate answered from memory`,
		`HTTP/1\.1 402 Payment Required\n +Content-Type: application/problem\+json\n +Retry-After: \d+\n +Link: <https://billing\.example\.com/acme>; rel="payment"`,
		`"reason": "quota_exceeded"`,
		`"detail": "acme used \d+ of 500 api_calls in the period ending`,
		`acme: \d+ calls allowed, \d+ refused with 402`,
		`umbrella's next call got 402 \S+ later`,
		`"reason": "payment_overdue"`,
		`umbrella's calls pass again \(200\)`,
		`api_calls counted = calls the gate allowed, exactly: acme ([\d,]+) = ([\d,]+) · globex [\d,]+ = [\d,]+ · initech [\d,]+ = [\d,]+ · umbrella [\d,]+ = [\d,]+`,
		`tokens counted = tokens the sidecars reported, exactly: initech [\d,]+ = [\d,]+ · umbrella [\d,]+ = [\d,]+`,
		`(?m)^acme +free +BLOCKED \(quota_exceeded\) +api_calls +\d+ +500 +1\d\d\.\d%`,
		`(?m)^globex +free +(OK|WARNING) +api_calls`,
		`(?m)^TENANT +METER +WINDOW START +WINDOW END +MODEL +VALUE +EVENTS$`,
		`(?m)^initech +tokens +.* large +[\d,]+ +\d+$`,
		`Done in \d+(\.\d)?s`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("demo output lacks %s", re)
		}
	}
	if t.Failed() {
		t.Logf("demo output:\n%s", out)
	}
}

// fieldStart returns the byte offset of the n-th (from 0) space-separated
// field of line.
func fieldStart(line string, n int) int {
	in := false
	for i, c := range line {
		if c != ' ' && !in {
			if n == 0 {
				return i
			}
			n--
		}
		in = c != ' '
	}
	return -1
}

// A filter flag given empty (--tenant "$T" with T unset) is refused before
// any request: sent as nothing, it asked an admin key for every tenant.
func TestUsageCLIRefusesEmptyFilters(t *testing.T) {
	for _, args := range [][]string{
		{"--tenant", ""},
		{"--tenant=", "--window", "month"},
		{"--meter", ""},
		{"summary", "--tenant", ""},
	} {
		// No server listens there: reaching it would be another error.
		full := append(args, "--url", "http://127.0.0.1:1", "--api-key", "k")
		if args[0] == "summary" {
			full = append([]string{"summary"}, append(args[1:], "--url", "http://127.0.0.1:1", "--api-key", "k")...)
		}
		var out, errOut bytes.Buffer
		err := cli.Usage(context.Background(), full, &out, &errOut)
		var ue cli.UsageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), "is empty") {
			t.Errorf("meterd usage %q: %v, want a usage error saying the flag is empty", full, err)
		}
	}
}
