package main

import (
	"bytes"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/internal/proctest"
)

// Prometheus's own tool checks meterd's alerting rules and each process's
// /metrics (Debian's prometheus package ships /usr/bin/promtool;
// scripts/test-deps installs it in CI).

// promtool returns the path of promtool: skipped without it, failed in CI.
func promtool(t *testing.T) string {
	t.Helper()
	return proctest.Binary(t, "promtool", "prometheus")
}

// runPromtool runs promtool args… with stdin and returns its output; it
// fails t unless promtool exits with 0 and reports nothing.
func runPromtool(t *testing.T, stdin []byte, args ...string) string {
	t.Helper()
	cmd := exec.Command(promtool(t), args...)
	cmd.Stdin = bytes.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v:\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// `promtool check rules` accepts deploy/grafana/alerts.yml and finds every
// rule TestDashboardMetricsExported reads from it.
func TestPromtoolCheckRules(t *testing.T) {
	out := runPromtool(t, nil, "check", "rules", alertsPath)
	m := regexp.MustCompile(`SUCCESS: (\d+) rules found`).FindStringSubmatch(out)
	if want := len(alertQueries(t, alertsPath)); m == nil || m[1] != fmt.Sprint(want) {
		t.Fatalf("promtool check rules: want SUCCESS with %d rules:\n%s", want, out)
	}
	// And it can fail: a rule with a broken expression is refused.
	bad := filepath.Join(t.TempDir(), "bad.yml")
	writeFile(t, bad, "groups:\n  - name: bad\n    rules:\n      - alert: Broken\n        expr: rate(meterd_collector_events_accepted_total[5m]\n")
	if out, err := exec.Command(promtool(t), "check", "rules", bad).CombinedOutput(); err == nil {
		t.Fatalf("promtool check rules accepted a broken rule:\n%s", out)
	}
}

// `promtool check metrics` finds nothing to lint in the /metrics of a
// running collector, aggregator and enforcer, each after some traffic so
// that their labelled series and histograms are there.
func TestPromtoolCheckMetrics(t *testing.T) {
	promtool(t)
	b := startKillBroker(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "meterd.yaml")
	writeFile(t, cfg, gatewayConfig)
	common := []string{"--nats-url", b.URL(), "--config", cfg, "--insecure", "--log-format", "text"}
	processes := map[string]string{
		"enforcer":   startComponent(t, "enforcer", append([]string{"--sqlite-path", filepath.Join(dir, "enforcer.db"), "--nats-replicas", "1"}, common...)...),
		"aggregator": startComponent(t, "aggregator", append([]string{"--sqlite-path", filepath.Join(dir, "meterd.db"), "--nats-replicas", "1", "--fetch-wait", "20ms"}, common...)...),
		"collector":  startComponent(t, "collector", append([]string{"--spool-dir", filepath.Join(dir, "spool")}, common...)...),
	}
	// acme crosses its quota of 3: events counted, a decision, 402s.
	collector := processes["collector"]
	a, err := fetch(http.DefaultClient, http.MethodPost, collector+"/v1/events", http.Header{"Content-Type": {"application/json"}}, e2eEvents(nil, 0, "acme", 5))
	if err != nil || a.status != http.StatusAccepted {
		t.Fatalf("POST /v1/events: %v %+v", err, a)
	}
	eventuallyCheck(t, collector, "acme", http.StatusPaymentRequired, 20*time.Second)
	wantCheck(t, collector, "globex", http.StatusOK)

	for name, base := range processes {
		a, err := fetch(http.DefaultClient, http.MethodGet, base+"/metrics", nil, nil)
		if err != nil || a.status != http.StatusOK {
			t.Fatalf("%s /metrics: %v %+v", name, err, a)
		}
		if !bytes.Contains(a.body, []byte("meterd_"+name+"_")) {
			t.Fatalf("%s /metrics has no meterd_%s_ metric:\n%.2000s", name, name, a.body)
		}
		t.Logf("%s: %d metric families", name, bytes.Count(a.body, []byte("# TYPE ")))
		cmd := exec.Command(promtool(t), "check", "metrics")
		cmd.Stdin = bytes.NewReader(a.body)
		if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("promtool check metrics on the %s's /metrics: %v:\n%s", name, err, out)
		}
	}
}
