package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meterd/meterd/enforcer"
	"github.com/meterd/meterd/internal/jstest"
)

// Two `meterd enforcer` processes with the same flags and the default lease:
// one is active, the other stands by, ready. SIGKILL of the active one: the
// standby takes over within 10 s, the gate keeps answering 402 for the
// blocked tenant throughout (never stale, never open), and each threshold
// notification reaches the notify URL exactly once although the new active
// enforcer queues every threshold reached again.
func TestKillEnforcer(t *testing.T) {
	if testing.Short() {
		t.Skip("two enforcer processes and a default lease (6 s)")
	}
	bin := buildMeterd(t)
	b := startKillBroker(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "meterd.yaml")
	writeFile(t, cfg, gatewayConfig)
	db := filepath.Join(dir, "meterd.db")

	var mu sync.Mutex
	received := map[string]int{} // notification id → deliveries
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var n enforcer.Notification
		if json.Unmarshal(body, &n) == nil {
			mu.Lock()
			received[n.ID]++
			mu.Unlock()
		}
	}))
	defer hook.Close()

	common := []string{"--nats-url", b.URL(), "--config", cfg, "--insecure", "--log-format", "text"}
	startComponent(t, "aggregator", append([]string{"--sqlite-path", db, "--nats-replicas", "1", "--fetch-wait", "20ms"}, common...)...)
	startEnforcer := func() *killProc {
		addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
		return startKillProc(t, bin, addr, append([]string{"enforcer", "--listen", addr, "--sqlite-path", db,
			"--nats-replicas", "1", "--notify-urls", hook.URL}, common...)...)
	}
	const active = "meterd_enforcer_active_leases"
	ready := func(p *killProc) bool {
		resp, err := http.Get("http://" + p.addr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}

	first := startEnforcer()
	pollUntil(t, "the first enforcer is active", 20*time.Second, func() bool { return first.metric(t, active) == 1 })
	// The gate waits for the blocklist bucket, which the enforcer creates.
	collector := startComponent(t, "collector", append([]string{"--spool-dir", filepath.Join(dir, "spool")}, common...)...)
	second := startEnforcer()
	pollUntil(t, "the second enforcer is ready", 20*time.Second, func() bool { return ready(second) })
	if second.metric(t, active) != 0 {
		t.Fatal("the second enforcer is active beside the first")
	}

	// acme crosses its quota of 3: blocked, notified at 80 % and 100 %.
	a, err := fetch(http.DefaultClient, http.MethodPost, collector+"/v1/events", http.Header{"Content-Type": {"application/json"}}, e2eEvents(nil, 0, "acme", 5))
	if err != nil || a.status != http.StatusAccepted {
		t.Fatalf("POST /v1/events: %v %+v", err, a)
	}
	eventuallyCheck(t, collector, "acme", http.StatusPaymentRequired, 20*time.Second)
	notified := func() map[string]int {
		mu.Lock()
		defer mu.Unlock()
		out := map[string]int{}
		for id, n := range received {
			out[id] = n
		}
		return out
	}
	pollUntil(t, "acme's notifications", 10*time.Second, func() bool { return len(notified()) == 2 })

	// The active one dies; the gate keeps blocking acme meanwhile, and
	// never goes stale.
	gate := &killProc{addr: strings.TrimPrefix(collector, "http://")}
	const staleness = "meterd_gate_staleness_seconds"
	maxStale, checks := 0.0, 0
	watchGate := func() {
		if got, body := checkStatus(t, collector, "acme"); got != http.StatusPaymentRequired {
			t.Fatalf("during the failover the gate answered %d for acme: %s", got, body)
		}
		checks++
		maxStale = max(maxStale, gate.metric(t, staleness))
	}
	first.kill(t)
	takeover := pollUntil(t, "the standby takes over", 15*time.Second, func() bool {
		watchGate()
		return second.metric(t, active) == 1
	})
	t.Logf("takeover %s after SIGKILL of the active enforcer", takeover.Round(time.Millisecond))
	if takeover > 10*time.Second {
		t.Errorf("the standby took over %s after the kill, want within 10 s", takeover)
	}
	pollUntil(t, "the new active enforcer is ready", 5*time.Second, func() bool { return ready(second) })
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		watchGate() // and room for a second notification
	}
	t.Logf("the gate answered 402 to %d checks during the failover; its staleness peaked at %.1f s", checks, maxStale)
	if maxStale >= 15 {
		t.Errorf("the gate's staleness reached %.1f s, its default --stale-after is 15 s", maxStale)
	}
	for id, n := range notified() {
		if n != 1 {
			t.Errorf("notification %s delivered %d times, want once", id, n)
		}
	}
	if n := len(notified()); n != 2 {
		t.Errorf("%d notifications, want 2 (acme at 80 %% and 100 %%): %v", n, notified())
	}
	if err := second.terminate(); err != nil {
		t.Errorf("the enforcer's SIGTERM exit: %v", err)
	}
}

// pollUntil polls cond every 20 ms until it holds and returns how long that
// took; it fails t after within.
func pollUntil(t *testing.T, what string, within time.Duration, cond func() bool) time.Duration {
	t.Helper()
	begin := time.Now()
	timeout := time.After(within)
	for !cond() {
		select {
		case <-timeout:
			t.Fatalf("%s: not within %s", what, within)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return time.Since(begin)
}
