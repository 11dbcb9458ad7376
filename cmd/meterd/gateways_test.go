package main

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/meterd/meterd/internal/proctest"
)

// The gateways and Prometheus of these tests are Debian's packages, run as
// private processes on free loopback ports (scripts/test-deps installs
// them in CI). The gateway configurations are the README's recipes, read
// from README.md, so a recipe that does not work fails here.

// gatewayConfig gives acme a quota of 3 calls, crossed after a few calls
// through the gateway, and globex one far away.
const gatewayConfig = `plans:
  tiny: {period: monthly, limits: {api_calls: 3}, on_exceed: block}
  pro:  {period: monthly, limits: {api_calls: 1000000}, on_exceed: overage}
tenants:
  acme:   {plan: tiny, billing_url: "https://billing.example.com/acme"}
  globex: {plan: pro, billing_url: "https://billing.example.com/globex"}
enforcer:
  heartbeat_every: 1s
`

// Tenant keys of the gateway tests: a recipe identifies the tenant by the
// caller's meterd API key, never by a header the client sends.
const (
	gatewayAdminKey  = "gateway-test-admin-key-0"
	gatewayAcmeKey   = "gateway-test-acme-key-00"
	gatewayGlobexKey = "gateway-test-globex-key0"
)

// gatewayKeysConfig is gatewayConfig with the keys.
const gatewayKeysConfig = gatewayConfig + `api_keys:
  - {key: ` + gatewayAdminKey + `, admin: true}
  - {key: ` + gatewayAcmeKey + `, tenant: acme}
  - {key: ` + gatewayGlobexKey + `, tenant: globex}
`

// gatewayTenantOf maps the Authorization header of a call to its tenant.
var gatewayTenantOf = map[string]string{"Bearer " + gatewayAcmeKey: "acme", "Bearer " + gatewayGlobexKey: "globex"}

// startGatewayDev runs meterd dev for a gateway test; the test's own
// requests to it act as admin.
func startGatewayDev(t *testing.T) *e2eDev {
	s := startE2EDev(t, gatewayKeysConfig)
	s.auth = "Bearer " + gatewayAdminKey
	return s
}

// Caddy's forward_auth, configured as the README says, in front of an
// upstream.
func TestGatewayCaddy(t *testing.T) {
	bin := proctest.Binary(t, "caddy", "caddy")
	up := startUpstream(t)
	s := startGatewayDev(t)
	recipe := readmeRecipe(t, "### Caddy (forward_auth)", "caddyfile")
	dir := t.TempDir()
	gw := proctest.Start(t, proctest.Spec{Name: "caddy", Command: func(addr string) *exec.Cmd {
		site := substitute(t, recipe,
			"api.example.com", "http://"+addr,
			"127.0.0.1:8080", strings.TrimPrefix(s.base, "http://"),
			"127.0.0.1:9000", up.addr())
		// No admin endpoint: its fixed port would collide with any other
		// Caddy on the machine.
		conf := "{\n\tadmin off\n\tdefault_bind 127.0.0.1\n}\n\n" + site
		path := filepath.Join(dir, "Caddyfile")
		writeFile(t, path, conf)
		cmd := exec.Command(bin, "run", "--config", path, "--adapter", "caddyfile")
		// Caddy keeps state under the home and XDG directories.
		cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir)
		return cmd
	}})
	gatewayScenario(t, s, up, "http://"+gw.Addr)
}

// nginx's auth_request, configured as the README says, in front of an
// upstream: a private nginx with its own prefix, configuration, pid file
// and logs, never the system's service.
func TestGatewayNginx(t *testing.T) {
	bin := proctest.Binary(t, "nginx", "nginx")
	up := startUpstream(t)
	s := startGatewayDev(t)
	recipe := readmeRecipe(t, "### nginx (auth_request)", "nginx")
	dir := t.TempDir()
	gw := proctest.Start(t, proctest.Spec{Name: "nginx", Command: func(addr string) *exec.Cmd {
		locations := substitute(t, recipe,
			"127.0.0.1:8080", strings.TrimPrefix(s.base, "http://"),
			"127.0.0.1:9000", up.addr())
		// One process (no master): nothing outlives the test if it dies.
		conf := fmt.Sprintf(`master_process off;
error_log stderr notice;
pid %[1]s/nginx.pid;
events { worker_connections 64; }
http {
	access_log %[1]s/access.log;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	server {
		listen %[2]s;
%[3]s
	}
}
`, dir, addr, locations)
		path := filepath.Join(dir, "nginx.conf")
		writeFile(t, path, conf)
		return exec.Command(bin, "-p", dir, "-c", path, "-g", "daemon off;")
	}})
	gatewayScenario(t, s, up, "http://"+gw.Addr)
}

// gatewayScenario drives calls through the gateway at base: an allowed
// tenant's calls reach the upstream intact and are each counted once, at
// one unit of api_calls, to the tenant of its API key, whatever tenant,
// meter, value and request id headers the client sends; a client without
// a key cannot pass by naming a tenant; a tenant over its quota gets
// meterd's 402, headers and body included, and none of its refused calls
// reaches the upstream.
func gatewayScenario(t *testing.T, s *e2eDev, up *upstream, base string) {
	const calls = 5
	for i := range calls {
		body := fmt.Sprintf("order %d", i)
		a, err := fetch(s.client, http.MethodPost, fmt.Sprintf("%s/orders/%d", base, i),
			// A client trying to be counted once, at zero, on a meter
			// without a limit, to another tenant: the recipe must drop
			// these headers and give each call its own id.
			http.Header{"Authorization": {"Bearer " + gatewayGlobexKey}, "X-Tenant-Id": {"acme"}, "X-Request-Id": {"gw-globex-same"},
				"X-Meter": {"tokens"}, "X-Meter-Value": {"0"}, "Content-Type": {"text/plain"}},
			[]byte(body))
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("upstream: POST /orders/%d", i); a.status != http.StatusOK || string(a.body) != want {
			t.Fatalf("globex call %d: status %d %q, want 200 %q", i, a.status, a.body, want)
		}
	}
	got := up.callsOf("globex")
	if len(got) != calls {
		t.Fatalf("the upstream saw %d calls of globex, want %d: %+v", len(got), calls, got)
	}
	for i, c := range got {
		if want := (upstreamCall{http.MethodPost, fmt.Sprintf("/orders/%d", i), "globex", fmt.Sprintf("order %d", i)}); c != want {
			t.Errorf("upstream call %d = %+v, want %+v", i, c, want)
		}
	}
	e2eUsage(t, s, "globex", calls)

	// Without a key, naming a tenant is not enough: the recipe drops the
	// header, meterd answers 401, and the upstream never sees the call.
	for i := range 3 {
		a, err := fetch(s.client, http.MethodGet, base+"/orders", http.Header{"X-Tenant-Id": {"globex"}, "X-Request-Id": {fmt.Sprintf("gw-forged-%d", i)}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if a.status != http.StatusUnauthorized {
			t.Fatalf("call without a key naming globex: status %d %q, want 401", a.status, a.body)
		}
	}
	if n := up.total(); n != calls {
		t.Fatalf("the upstream saw %d calls, want the %d of globex", n, calls)
	}

	// acme crosses its quota of 3 within a few calls; the enforcer blocks
	// it within a second.
	var (
		allowed int64
		blocked *e2eAnswer
		at      time.Time
	)
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; blocked == nil; i++ {
		a, err := fetch(s.client, http.MethodGet, fmt.Sprintf("%s/orders?page=%d", base, i),
			http.Header{"Authorization": {"Bearer " + gatewayAcmeKey}, "X-Request-Id": {fmt.Sprintf("gw-acme-%d", i)}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		switch a.status {
		case http.StatusOK:
			allowed++
		case http.StatusPaymentRequired:
			blocked, at = a, time.Now()
		default:
			t.Fatalf("acme call %d: status %d %s %q, want 200 or 402", i, a.status, a.header, a.body)
		}
		if time.Now().After(deadline) {
			t.Fatalf("acme: no 402 through the gateway after %d allowed calls in 10 s", allowed)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("acme: 402 through the gateway after %d allowed calls", allowed)
	p := e2eCheckProblem(t, blocked, "quota-exceeded", "quota_exceeded", "acme", "https://billing.example.com/acme")
	if p.Meter != "api_calls" || p.Limit == nil || *p.Limit != 3 {
		t.Errorf("meter %q, limit %v; want api_calls and 3", p.Meter, p.Limit)
	}
	if p.Used == nil || *p.Used < 3 || *p.Used > allowed {
		t.Errorf("used = %v, want in [3, %d]", p.Used, allowed)
	}
	if p.PeriodEnd == nil {
		t.Error("no period_end")
	} else if ra, err := strconv.ParseInt(blocked.header.Get("Retry-After"), 10, 64); err != nil ||
		math.Abs(float64(ra)-p.PeriodEnd.Sub(at).Seconds()) > 5 {
		t.Errorf("Retry-After = %q, want the %.0f seconds until period_end", blocked.header.Get("Retry-After"), p.PeriodEnd.Sub(at).Seconds())
	}
	for i := range 3 {
		// Naming another tenant does not lift the block either.
		a, err := fetch(s.client, http.MethodPost, base+"/orders", http.Header{"Authorization": {"Bearer " + gatewayAcmeKey}, "X-Tenant-Id": {"globex"}}, []byte("refused"))
		if err != nil {
			t.Fatal(err)
		}
		if a.status != http.StatusPaymentRequired || a.header.Get("Content-Type") != "application/problem+json" {
			t.Fatalf("acme call %d after the 402: status %d, Content-Type %q, want 402 application/problem+json", i, a.status, a.header.Get("Content-Type"))
		}
	}
	if n := len(up.callsOf("acme")); int64(n) != allowed {
		t.Errorf("the upstream saw %d calls of acme, want the %d allowed ones", n, allowed)
	}
	e2eUsage(t, s, "acme", allowed)
	e2eUsage(t, s, "globex", calls)
}

// Envoy and Traefik cannot be installed here (no Debian package; `go
// install` refuses Traefik's module, whose go.mod has replace directives),
// so their recipes are read, not run: each must send meterd the caller's
// API key and none of the headers a client would set its own price with.
// An empty list would send every header (Traefik), a prefix or regex
// matcher could let them through (Envoy).
func TestGatewayRecipesSendOnlyTheKey(t *testing.T) {
	want := []string{"authorization", "x-api-key"}

	var envoy struct {
		HTTPFilters []struct {
			Name        string `yaml:"name"`
			TypedConfig struct {
				AllowedHeaders struct {
					Patterns []map[string]string `yaml:"patterns"`
				} `yaml:"allowed_headers"`
				HTTPService struct {
					AuthorizationRequest map[string]any `yaml:"authorization_request"`
				} `yaml:"http_service"`
			} `yaml:"typed_config"`
		} `yaml:"http_filters"`
	}
	if err := yaml.Unmarshal([]byte(readmeRecipe(t, "### Envoy (ext_authz, HTTP service)", "yaml")), &envoy); err != nil {
		t.Fatalf("the Envoy recipe: %v", err)
	}
	var sent []string
	for _, f := range envoy.HTTPFilters {
		if f.Name != "envoy.filters.http.ext_authz" {
			continue
		}
		for _, p := range f.TypedConfig.AllowedHeaders.Patterns {
			if v, ok := p["exact"]; ok && len(p) == 1 {
				sent = append(sent, strings.ToLower(v))
			} else {
				sent = append(sent, fmt.Sprint(p))
			}
		}
		// The deprecated place of the list, and headers_to_add, would
		// add to what meterd is sent.
		if ar := f.TypedConfig.HTTPService.AuthorizationRequest; ar != nil {
			t.Errorf("the Envoy recipe has an authorization_request: %v", ar)
		}
	}
	if !slices.Equal(sent, want) {
		t.Errorf("the Envoy recipe sends meterd %q, want only %q", sent, want)
	}

	var traefik struct {
		HTTP struct {
			Middlewares map[string]struct {
				ForwardAuth *struct {
					Address            string   `yaml:"address"`
					AuthRequestHeaders []string `yaml:"authRequestHeaders"`
				} `yaml:"forwardAuth"`
			} `yaml:"middlewares"`
		} `yaml:"http"`
	}
	if err := yaml.Unmarshal([]byte(readmeRecipe(t, "### Traefik (ForwardAuth)", "yaml")), &traefik); err != nil {
		t.Fatalf("the Traefik recipe: %v", err)
	}
	fa := traefik.HTTP.Middlewares["meterd"].ForwardAuth
	if fa == nil || fa.Address != "http://127.0.0.1:8080/v1/check" {
		t.Fatalf("the Traefik recipe has no forwardAuth middleware meterd to /v1/check: %+v", traefik)
	}
	sent = nil
	for _, h := range fa.AuthRequestHeaders {
		sent = append(sent, strings.ToLower(h))
	}
	if !slices.Equal(sent, want) {
		t.Errorf("the Traefik recipe sends meterd %q, want only %q", sent, want)
	}
}

// Prometheus scrapes `meterd dev` every second; its query API returns
// meterd's counters with the numbers of events and checks sent.
func TestPrometheusScrapesMeterd(t *testing.T) {
	bin := proctest.Binary(t, "prometheus", "prometheus")
	s := startE2EDev(t, gatewayConfig)
	target := strings.TrimPrefix(s.base, "http://")
	dir := t.TempDir()
	prom := proctest.Start(t, proctest.Spec{
		Name: "prometheus",
		Command: func(addr string) *exec.Cmd {
			path := filepath.Join(dir, "prometheus.yml")
			writeFile(t, path, fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: meterd
    static_configs:
      - targets: [%q]
`, target))
			return exec.Command(bin, "--config.file", path, "--storage.tsdb.path", filepath.Join(dir, "tsdb"),
				"--web.listen-address", addr)
		},
		Ready: func(addr string) error {
			resp, err := http.Get("http://" + addr + "/-/ready")
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("/-/ready: %s", resp.Status)
			}
			return nil
		},
	})

	const (
		requests  = 3
		perReq    = 7
		checks    = 2
		wantTotal = requests*perReq + checks // checks are recorded as events too
	)
	for r := range requests {
		a, err := s.do(http.MethodPost, "/v1/events", http.Header{"Content-Type": {"application/json"}}, e2eEvents(nil, r, "globex", perReq))
		if err != nil {
			t.Fatal(err)
		}
		if a.status != http.StatusAccepted {
			t.Fatalf("POST /v1/events: status %d: %s", a.status, a.body)
		}
	}
	for range checks {
		if a := s.mustCheck(t, "globex"); a.status != http.StatusOK {
			t.Fatalf("check of globex: status %d: %s", a.status, a.body)
		}
	}

	want := map[string]float64{
		`meterd_collector_events_accepted_total{job="meterd"}`:          wantTotal,
		`meterd_collector_checks_total{job="meterd",outcome="allowed"}`: checks,
		`meterd_aggregator_events_committed_total{job="meterd"}`:        wantTotal,
		`sum(meterd_collector_events_rejected_total{job="meterd"})`:     0,
		`up{job="meterd",instance="` + target + `"}`:                    1,
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := map[string]float64{}
		for q := range want {
			v, ok := promQuery(t, "http://"+prom.Addr, q, target)
			if ok {
				got[q] = v
			}
		}
		if maps.Equal(got, want) {
			t.Logf("Prometheus: %v", got)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus after 30 s: %v, want %v", got, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// promQuery evaluates q through Prometheus's HTTP API at base and returns
// the value of its one series; ok is false while q has no series yet. A
// series of another instance than target fails t.
func promQuery(t *testing.T, base, q, target string) (v float64, ok bool) {
	t.Helper()
	resp, err := http.Get(base + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var ans struct {
		Status string `json:"status"`
		Data   struct {
			ResultType string `json:"resultType"`
			Result     []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &ans); err != nil || resp.StatusCode != http.StatusOK || ans.Status != "success" || ans.Data.ResultType != "vector" {
		t.Fatalf("query %s: status %s: %s", q, resp.Status, body)
	}
	switch len(ans.Data.Result) {
	case 0:
		return 0, false
	case 1:
	default:
		t.Fatalf("query %s: %d series, want one: %s", q, len(ans.Data.Result), body)
	}
	r := ans.Data.Result[0]
	if inst, ok := r.Metric["instance"]; ok && inst != target {
		t.Fatalf("query %s: instance %q, want meterd's %s", q, inst, target)
	}
	str, _ := r.Value[1].(string)
	v, err = strconv.ParseFloat(str, 64)
	if err != nil {
		t.Fatalf("query %s: value %v: %v", q, r.Value, err)
	}
	return v, true
}

// upstreamCall is a call the upstream received.
type upstreamCall struct {
	Method, Path, Tenant, Body string
}

// upstream is the API behind the gateway: it records every call, with the
// tenant of its API key, and answers 200 "upstream: METHOD PATH".
type upstream struct {
	srv   *httptest.Server
	mu    sync.Mutex
	calls []upstreamCall
}

func startUpstream(t *testing.T) *upstream {
	u := &upstream{}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		u.mu.Lock()
		u.calls = append(u.calls, upstreamCall{r.Method, r.URL.Path, gatewayTenantOf[r.Header.Get("Authorization")], string(body)})
		u.mu.Unlock()
		fmt.Fprintf(w, "upstream: %s %s", r.Method, r.URL.Path)
	}))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *upstream) addr() string { return u.srv.Listener.Addr().String() }

// total is the number of calls the upstream received.
func (u *upstream) total() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.calls)
}

func (u *upstream) callsOf(tenant string) []upstreamCall {
	u.mu.Lock()
	defer u.mu.Unlock()
	var out []upstreamCall
	for _, c := range u.calls {
		if c.Tenant == tenant {
			out = append(out, c)
		}
	}
	return out
}

// readmeRecipe returns the body of the first ```fence block after the
// heading line of README.md.
func readmeRecipe(t *testing.T, heading, fence string) string {
	t.Helper()
	data, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(data)
	i := strings.Index(s, "\n"+heading+"\n")
	if i < 0 {
		t.Fatalf("README.md has no heading %q", heading)
	}
	s = s[i+len(heading)+2:]
	for _, h := range []string{"\n## ", "\n### "} {
		if next := strings.Index(s, h); next >= 0 {
			s = s[:next]
		}
	}
	open := "```" + fence + "\n"
	i = strings.Index(s, open)
	if i < 0 {
		t.Fatalf("README.md: no %s block under %q", open, heading)
	}
	s = s[i+len(open):]
	end := strings.Index(s, "```")
	if end < 0 {
		t.Fatalf("README.md: the %s block under %q does not end", fence, heading)
	}
	return s[:end]
}

// substitute replaces each old string of pairs (old, new, …) in text, and
// fails t if one does not occur: the recipe changed under the test.
func substitute(t *testing.T, text string, pairs ...string) string {
	t.Helper()
	for i := 0; i < len(pairs); i += 2 {
		if !strings.Contains(text, pairs[i]) {
			t.Fatalf("the recipe does not mention %s:\n%s", pairs[i], text)
		}
	}
	return strings.NewReplacer(pairs...).Replace(text)
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}
