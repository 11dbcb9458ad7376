package main

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/internal/jstest"
)

// A tenant the admin API creates has a plan at every gate: a separate
// `meterd collector` under --unknown-tenant-policy deny lets it pass within
// seconds, a collector started afterwards lets it pass at once (it is not
// ready before it read the admin API's changes), and once the tenant is
// deleted both refuse it as unknown again. A tenant added to the config
// file passes at both as well.
func TestAdminTenantAtTheGates(t *testing.T) {
	b := startKillBroker(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "meterd.yaml")
	writeFile(t, cfg, gatewayConfig)
	common := []string{"--nats-url", b.URL(), "--config", cfg, "--insecure", "--log-format", "text"}
	enf := startComponent(t, "enforcer", append([]string{"--sqlite-path", filepath.Join(dir, "meterd.db"), "--nats-replicas", "1"}, common...)...)
	gateArgs := func(name string) []string {
		return append([]string{"--spool-dir", filepath.Join(dir, name), "--unknown-tenant-policy", "deny", "--collector-name", name}, common...)
	}
	first := startComponent(t, "collector", gateArgs("first")...)

	// Unknown: in neither the file nor the admin API.
	wantCheck(t, first, "newco", http.StatusForbidden)
	put(t, enf, "/v1/tenants/newco", `{"plan":"pro"}`, http.StatusOK)
	took := eventuallyCheck(t, first, "newco", http.StatusOK, 10*time.Second)
	t.Logf("the running collector let newco pass %s after the PUT", took.Round(time.Millisecond))

	second := startComponent(t, "collector", gateArgs("second")...)
	wantCheck(t, second, "newco", http.StatusOK)

	put(t, enf, "/v1/tenants/newco", "", http.StatusNoContent)
	for _, c := range []string{first, second} {
		eventuallyCheck(t, c, "newco", http.StatusForbidden, 10*time.Second)
	}
	// The file's tenants stay known throughout.
	wantCheck(t, second, "globex", http.StatusOK)

	// A tenant added to the config file passes at every gate too, within
	// the file's poll: each collector follows the file, as the enforcer
	// does.
	wantCheck(t, first, "fileco", http.StatusForbidden)
	writeFile(t, cfg, strings.Replace(gatewayConfig, "tenants:\n", "tenants:\n  fileco: {plan: pro}\n", 1))
	for _, c := range []string{first, second} {
		eventuallyCheck(t, c, "fileco", http.StatusOK, 10*time.Second)
	}
}

// Through `meterd dev` the gate asks the enforcer's own catalog.
func TestAdminTenantAtTheGateDev(t *testing.T) {
	s := startE2EDev(t, gatewayConfig, "--unknown-tenant-policy", "deny")
	wantCheck(t, s.base, "newco", http.StatusForbidden)
	put(t, s.base, "/v1/tenants/newco", `{"plan":"pro"}`, http.StatusOK)
	eventuallyCheck(t, s.base, "newco", http.StatusOK, 5*time.Second)
	put(t, s.base, "/v1/tenants/newco", "", http.StatusNoContent)
	eventuallyCheck(t, s.base, "newco", http.StatusForbidden, 5*time.Second)
}

// startComponent runs `meterd name args…` in this process on a free
// loopback port and waits until its /readyz answers 200. It stops when t
// ends and must then exit with 0.
func startComponent(t *testing.T, name string, args ...string) (base string) {
	t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
	base = "http://" + addr
	stderr := &e2eBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	code := make(chan int, 1)
	go func() {
		code <- run(ctx, append([]string{name, "--listen", addr, "--shutdown-grace", "5s"}, args...), &e2eBuffer{}, stderr)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case c := <-code:
			if c != 0 {
				t.Errorf("meterd %s exited with %d", name, c)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("meterd %s still running 30 s after its context ended", name)
		}
		if t.Failed() {
			t.Logf("meterd %s log (end):\n%s", name, stderr.tail(16<<10))
		}
	})
	client := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		a, err := fetch(client, http.MethodGet, base+"/readyz", nil, nil)
		if err == nil && a.status == http.StatusOK {
			return base
		}
		select {
		case c := <-code:
			code <- c
			t.Fatalf("meterd %s exited with %d at start:\n%s", name, c, stderr.tail(16<<10))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("status %d: %s", a.status, a.body)
			}
			t.Fatalf("meterd %s: /readyz not 200 after 30 s: %v", name, err)
		}
	}
}

// checkStatus asks the gate at base about tenant.
func checkStatus(t *testing.T, base, tenant string) (int, string) {
	t.Helper()
	a, err := fetch(http.DefaultClient, http.MethodGet, base+"/v1/check", http.Header{"X-Tenant-Id": {tenant}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return a.status, string(a.body)
}

func wantCheck(t *testing.T, base, tenant string, status int) {
	t.Helper()
	got, body := checkStatus(t, base, tenant)
	if got != status || (status == http.StatusForbidden && !strings.Contains(body, "has no plan")) {
		t.Fatalf("%s: check of %s: status %d %s, want %d", base, tenant, got, body, status)
	}
}

// eventuallyCheck polls until the check of tenant answers status, within.
func eventuallyCheck(t *testing.T, base, tenant string, status int, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		got, body := checkStatus(t, base, tenant)
		if got == status {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("%s: check of %s: status %d %s after %s, want %d", base, tenant, got, body, within, status)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// put sends PUT (or DELETE, when body is empty) to the admin API at base.
func put(t *testing.T, base, path, body string, status int) {
	t.Helper()
	method := http.MethodPut
	if body == "" {
		method = http.MethodDelete
	}
	a, err := fetch(http.DefaultClient, method, base+path, http.Header{"Content-Type": {"application/json"}}, []byte(body))
	if err != nil {
		t.Fatal(err)
	}
	if a.status != status {
		t.Fatalf("%s %s: status %d %s, want %d", method, path, a.status, a.body, status)
	}
}
