package main

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/enforcer"
)

// The admin CLI over a running meterd dev (the enforcer's real admin API):
// tenants are listed, read, set and deleted, the blocklist shows the blocks
// that follow, each as a table, CSV and JSON; a problem from the server is
// shown with its title and detail and exits 1, a mistake on the command
// line exits 2, and -h documents each command.
func TestAdminCLI(t *testing.T) {
	s := startE2EDev(t, usageCLIConfig)
	admin := func(args ...string) []string {
		return append(args, "--url", s.base, "--api-key", "admin-key-for-the-cli-test")
	}
	ok := func(args ...string) string {
		t.Helper()
		code, out, errOut := meterd(t, admin(args...)...)
		if code != 0 {
			t.Fatalf("meterd %s: exit %d: %s", strings.Join(args, " "), code, errOut)
		}
		return out
	}

	// list: the catalog's tenants.
	out := ok("tenants", "list")
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 3 || !regexp.MustCompile(`^TENANT +PLAN +STATUS +BILLING STATUS +PERIOD START +PERIOD END$`).MatchString(lines[0]) ||
		!regexp.MustCompile(`^acme +free +OK +active +\d{4}-\d\d-01T00:00:00Z +\d{4}-\d\d-01T00:00:00Z$`).MatchString(lines[1]) ||
		!strings.HasPrefix(lines[2], "globex ") {
		t.Fatalf("tenants list:\n%s", out)
	}
	recs := readCSV(t, ok("tenants", "list", "--format", "csv"))
	if len(recs) != 3 || strings.Join(recs[0], ",") != "tenant,plan,on_exceed,status,reason,billing_status,period_start,period_end,usage_seeded" ||
		strings.Join(recs[1][:6], ",") != "acme,free,block,ok,,active" || recs[2][0] != "globex" {
		t.Fatalf("tenants list --format csv: %q", recs)
	}

	// set: a new tenant with a limit override; settings in the
	// environment are not read.
	t.Setenv("METERD_STATUS", "suspended")
	out = ok("tenants", "set", "newco", "--plan", "free", "--billing-url", "https://billing.example.com/newco", "--limit", "api_calls=5")
	for _, re := range []string{`(?m)^Tenant: +newco$`, `(?m)^Plan: +free$`, `(?m)^Status: +active$`, `(?m)^Billing URL: +https://billing.example.com/newco$`,
		`(?m)^Blocked: +-$`, `(?m)^METER +LIMIT +USED$`, `(?m)^api_calls +5 +0$`} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("tenants set: no line %s in:\n%s", re, out)
		}
	}
	var view enforcer.TenantView
	if err := json.Unmarshal([]byte(ok("tenants", "get", "newco", "--format", "json")), &view); err != nil ||
		view.Tenant != "newco" || view.Plan != "free" || view.Limits["api_calls"] != 5 {
		t.Fatalf("tenants get --format json: %v %+v", err, view)
	}

	// newco crosses its limit of 5: the blocklist shows it.
	var events strings.Builder
	events.WriteString("[")
	for i := range 7 {
		if i > 0 {
			events.WriteString(",")
		}
		fmt.Fprintf(&events, `{"id":"n%d","tenant":"newco","meter":"api_calls"}`, i)
	}
	events.WriteString("]")
	if a, err := s.do(http.MethodPost, "/v1/events", http.Header{"Content-Type": {"application/json"}, "Authorization": {"Bearer admin-key-for-the-cli-test"}},
		[]byte(events.String()+"")); err != nil || a.status != http.StatusAccepted {
		t.Fatalf("POST /v1/events: %v %+v", err, a)
	}
	row := regexp.MustCompile(`(?m)^newco +quota_exceeded +api_calls +7 +5 +\d{4}-\d\d-01T00:00:00Z +(\d+) +\S+Z$`)
	for deadline := time.Now().Add(10 * time.Second); !row.MatchString(out); time.Sleep(50 * time.Millisecond) {
		if out = ok("blocklist"); time.Now().After(deadline) {
			t.Fatalf("blocklist after 10 s:\n%s", out)
		}
	}
	if !strings.HasPrefix(out, "TENANT ") || strings.Count(out, "\n") != 2 {
		t.Errorf("blocklist:\n%s", out)
	}
	recs = readCSV(t, ok("tenants", "get", "newco", "--format", "csv"))
	if len(recs) != 2 || strings.Join(recs[0], ",") != "tenant,plan,status,billing_status,blocked_reason,period_start,period_end,meter,limit,used" ||
		strings.Join(append(recs[1][:5:5], recs[1][7:]...), ",") != "newco,free,active,active,quota_exceeded,api_calls,5,7" {
		t.Fatalf("tenants get --format csv: %q", recs)
	}
	// A tenant without limits or usage still has its line in CSV.
	ok("tenants", "set", "bareco", "--plan", "open")
	recs = readCSV(t, ok("tenants", "get", "bareco", "--format", "csv"))
	if len(recs) != 2 || strings.Join(recs[1][:4], ",") != "bareco,open,active,active" || recs[1][7] != "" {
		t.Fatalf("tenants get --format csv of a tenant without meters: %q", recs)
	}

	// A suspended tenant is blocked without a quota.
	ok("tenants", "set", "acme", "--status", "suspended")
	for deadline := time.Now().Add(10 * time.Second); !regexp.MustCompile(`(?m)^acme +suspended +- +- +- +- +\d+ `).MatchString(out); time.Sleep(50 * time.Millisecond) {
		if out = ok("blocklist"); time.Now().After(deadline) {
			t.Fatalf("blocklist after suspending acme:\n%s", out)
		}
	}
	var bl enforcer.BlocklistView
	if err := json.Unmarshal([]byte(ok("blocklist", "--format", "json")), &bl); err != nil || len(bl.Decisions) != 2 ||
		bl.Decisions[0].Tenant != "acme" || bl.Decisions[1].Tenant != "newco" || bl.Decisions[1].Used != 7 || bl.Version == 0 {
		t.Fatalf("blocklist --format json: %v %+v", err, bl)
	}
	recs = readCSV(t, ok("blocklist", "--format", "csv"))
	if len(recs) != 3 || strings.Join(recs[0], ",") != "tenant,reason,meter,used,limit,period_start,period_end,billing_url,version,decided_at" ||
		strings.Join(recs[1][:5], ",") != "acme,suspended,,," || strings.Join(recs[2][:5], ",") != "newco,quota_exceeded,api_calls,7,5" ||
		recs[2][7] != "https://billing.example.com/newco" {
		t.Fatalf("blocklist --format csv: %q", recs)
	}
	if out := ok("tenants", "list"); !regexp.MustCompile(`(?m)^acme +free +BLOCKED \(suspended\) +suspended `).MatchString(out) ||
		!regexp.MustCompile(`(?m)^newco +free +BLOCKED \(quota_exceeded\) +active `).MatchString(out) {
		t.Errorf("tenants list with blocks:\n%s", out)
	}

	// delete: acme is the config file's again, newco is gone.
	if out := ok("tenants", "delete", "acme"); !strings.Contains(out, "settings of acme removed") || !regexp.MustCompile(`(?m)^Status: +active$`).MatchString(out) {
		t.Errorf("tenants delete acme:\n%s", out)
	}
	if out := ok("tenants", "delete", "newco"); out != "tenant newco deleted (the config file does not define it)\n" {
		t.Errorf("tenants delete newco: %q", out)
	}
	for deadline := time.Now().Add(10 * time.Second); out != "no tenant is blocked"; time.Sleep(50 * time.Millisecond) {
		if out = ok("blocklist"); strings.HasPrefix(out, "no tenant is blocked (blocklist version ") {
			out = "no tenant is blocked"
		} else if time.Now().After(deadline) {
			t.Fatalf("blocklist after the deletes:\n%s", out)
		}
	}

	// A tenant key lists its own tenant only, as the summary shows it.
	if code, out, _ := meterd(t, "tenants", "list", "--url", s.base, "--api-key", "acme-key-for-the-cli-test0", "--format", "csv"); code != 0 ||
		strings.Count(out, "\n") != 2 || !strings.Contains(out, "\nacme,") {
		t.Errorf("tenants list with acme's key: exit %d:\n%s", code, out)
	}

	// Errors: the server's problem (exit 1), the command line's (exit 2).
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{admin("tenants", "get", "newco"), 1, "/v1/tenants/newco: 404 Not Found: no tenant newco in the catalog"},
		{admin("tenants", "delete", "newco"), 1, "404 Not Found: no admin API changes for tenant newco"},
		{admin("tenants", "set", "acme", "--plan", "platinum"), 1, "/v1/tenants/acme: 422 "},
		{admin("tenants", "set", "acme", "--billing-anchor", "soon"), 1, "billing_anchor"},
		{[]string{"tenants", "get", "acme", "--url", s.base, "--api-key", "acme-key-for-the-cli-test0"}, 1, "403 Forbidden: this endpoint needs an admin API key"},
		{[]string{"blocklist", "--url", s.base, "--api-key", "acme-key-for-the-cli-test0"}, 1, "403 Forbidden"},
		{[]string{"blocklist", "--url", s.base}, 1, "401 Unauthorized"},
		{[]string{"tenants", "list", "--url", "http://" + closedAddr(t)}, 1, "cannot reach meterd at"},
		{admin("tenants"), 2, "name a command: list, get, set or delete"},
		{admin("tenants", "frob"), 2, `unknown command "frob"`},
		{admin("tenants", "get"), 2, "which tenant?"},
		{admin("tenants", "get", "no/such"), 2, `"no/such" is not a tenant name`},
		{admin("tenants", "get", "a", "b"), 2, `unexpected argument "b"`},
		{admin("tenants", "list", "acme"), 2, `unexpected argument "acme"`},
		{admin("tenants", "set", "acme"), 2, "nothing to set"},
		{admin("tenants", "set", "acme", "--limit", "api_calls=lots"), 2, `"api_calls=lots" is not meter=N`},
		{admin("tenants", "set", "acme", "--limit", "api_calls=1", "--no-limits"), 2, "not both"},
		{admin("tenants", "list", "--format", "xml"), 2, "--format must be table, csv or json"},
		{admin("blocklist", "acme"), 2, `unexpected argument "acme"`},
	} {
		code, _, errOut := meterd(t, c.args...)
		if code != c.code || !strings.Contains(errOut, c.msg) {
			t.Errorf("meterd %s: exit %d, stderr %q; want exit %d and %q", strings.Join(c.args, " "), code, errOut, c.code, c.msg)
		}
	}

	// Help, per command.
	if code, out, _ := meterd(t, "tenants", "--help"); code != 0 || !strings.Contains(out, "meterd tenants set <tenant> [flags]") || !strings.Contains(out, "meterd blocklist") {
		t.Errorf("tenants --help: exit %d:\n%s", code, out)
	}
	for verb, flag := range map[string]string{"list": "-format", "get": "-api-key", "set": "-billing-anchor", "delete": "-url"} {
		code, _, errOut := meterd(t, "tenants", verb, "-h")
		if code != 0 || !strings.Contains(errOut, "Usage:\n  meterd tenants "+verb) || !strings.Contains(errOut, flag) {
			t.Errorf("tenants %s -h: exit %d:\n%s", verb, code, errOut)
		}
	}
	if code, _, errOut := meterd(t, "blocklist", "--help"); code != 0 || !strings.Contains(errOut, "GET /v1/blocklist") {
		t.Errorf("blocklist --help: exit %d:\n%s", code, errOut)
	}
}

func readCSV(t *testing.T, s string) [][]string {
	t.Helper()
	recs, err := csv.NewReader(strings.NewReader(s)).ReadAll()
	if err != nil {
		t.Fatalf("%v:\n%s", err, s)
	}
	return recs
}
