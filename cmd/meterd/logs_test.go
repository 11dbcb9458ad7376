package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/meterd/meterd/enforcer"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/schemas"
)

// Recognisable secrets of the logging tests: none may appear in any output.
const (
	logAdminKey     = "mk_admin_SECRET_4f1c9a"
	logAcmeKey      = "mk_acme_SECRET_77d2e0"
	logWrongKey     = "mk_wrong_SECRET_0b3a55"
	logWebhookKey   = "whsec_SECRET_9e8d7c"
	logNotifyKey    = "notify_SECRET_31a4b6"
	logNotifyPass   = "hookpass_SECRET_5c2d"
	logNotifyToken  = "hooktoken_SECRET_8a1f"
	logNATSPass     = "natspass_SECRET_6d0e"
	logDSNPass      = "dsnpass_SECRET_2b9c"
	logForgedSecret = "whsec_forged_SECRET_1e2f"
)

var logSecrets = []string{logAdminKey, logAcmeKey, logWrongKey, logWebhookKey, logNotifyKey,
	logNotifyPass, logNotifyToken, logNATSPass, logDSNPass, logForgedSecret}

// assertNoSecrets fails t for every secret in out.
func assertNoSecrets(t *testing.T, what, out string) {
	t.Helper()
	for _, s := range logSecrets {
		if i := strings.Index(out, s); i >= 0 {
			start, end := max(i-200, 0), min(i+len(s)+100, len(out))
			t.Errorf("%s holds the secret %q: …%s…", what, s, out[start:end])
		}
	}
}

// jsonLines decodes every line of out as a JSON log record; lines
// starting with "meterd:" are the exit error run prints, not logs.
func jsonLines(t *testing.T, out string) []map[string]any {
	t.Helper()
	var recs []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" || strings.HasPrefix(line, "meterd: ") {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Errorf("log line is not JSON (%v): %s", err, line)
			continue
		}
		if rec["level"] == nil || rec["msg"] == nil || rec["time"] == nil {
			t.Errorf("log line without time, level or msg: %s", line)
		}
		recs = append(recs, rec)
	}
	return recs
}

// findLog returns the first record whose msg is msg and whose fields hold
// want (values compared as text), or nil.
func findLog(recs []map[string]any, msg string, want map[string]string) map[string]any {
next:
	for _, r := range recs {
		if r["msg"] != msg {
			continue
		}
		for k, v := range want {
			if fmt.Sprint(r[k]) != v {
				continue next
			}
		}
		return r
	}
	return nil
}

// The flows that log — ingest with API keys, a quota block, signed and
// forged billing webhooks, a notification a receiver refuses, a poison
// batch dead-lettered — log JSON lines carrying the ids an operator traces
// by, and none of the configured secrets.
func TestLogsCarryIDsAndNoSecrets(t *testing.T) {
	var hookHits atomic.Int64
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hookHits.Add(1)
		http.Error(w, "no such hook", http.StatusGone) // permanent: given up at once
	}))
	defer hook.Close()
	hookURL := strings.Replace(hook.URL, "http://", "http://meterd:"+logNotifyPass+"@", 1) + "/hooks/" + logNotifyToken
	config := fmt.Sprintf(`api_keys:
  - {key: %s, admin: true}
  - {key: %s, tenant: acme}
plans:
  free: {period: monthly, limits: {api_calls: 1000}, on_exceed: block}
tenants:
  acme:   {plan: free, billing_url: "https://billing.example.com/acme"}
  globex: {plan: free, customer_id: cus_globex}
enforcer:
  webhook_secret: %s
  notify_secret: %s
  notify_urls: %s
  heartbeat_every: 1s
`, logAdminKey, logAcmeKey, logWebhookKey, logNotifyKey, hookURL)
	natsPort := jstest.FreePort(t)
	s := startE2EDev(t, config, "--log-format", "json", "--log-level", "debug",
		"--nats-listen", "127.0.0.1:"+strconv.Itoa(natsPort))
	auth := func(key string) http.Header {
		return http.Header{"Authorization": {"Bearer " + key}, "Content-Type": {"application/json"}}
	}

	// acme crosses its limit through its own key; a wrong key is refused.
	if r, err := s.do(http.MethodPost, "/v1/events", auth(logAcmeKey), e2eEvents(nil, 1, "acme", 1001)); err != nil || r.status != http.StatusAccepted {
		t.Fatalf("POST /v1/events with acme's key: %v %+v", err, r)
	}
	if r, err := s.do(http.MethodPost, "/v1/events", auth(logWrongKey), e2eEvents(nil, 2, "acme", 1)); err != nil || r.status != http.StatusUnauthorized {
		t.Fatalf("POST /v1/events with a wrong key: %v %+v, want 401", err, r)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		r, err := s.do(http.MethodGet, "/v1/check", http.Header{"X-Api-Key": {logAcmeKey}}, nil)
		if err == nil && r.status == http.StatusPaymentRequired {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("acme not blocked 10 s after crossing its limit: %v %+v", err, r)
		}
	}

	// A signed webhook is applied, a forged one refused.
	failed := e2eStripeEvent("evt_logs_fail_1", "invoice.payment_failed", "in_logs_1", "cus_globex", time.Now().Add(-time.Minute))
	s.webhook(t, failed, enforcer.Sign(failed, logWebhookKey, time.Now()), "applied")
	if r, err := s.do(http.MethodPost, "/v1/billing/webhook",
		http.Header{enforcer.StripeSignatureHeader: {enforcer.Sign(failed, logForgedSecret, time.Now())}}, failed); err != nil || r.status != http.StatusBadRequest {
		t.Fatalf("forged webhook: %v %+v, want 400", err, r)
	}

	// A batch no aggregator can decode goes to the DLQ.
	nc, err := nats.Connect("nats://127.0.0.1:" + strconv.Itoa(natsPort))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	poison := &nats.Msg{Subject: schemas.UsageSubject(3), Data: []byte("{not a batch"), Header: nats.Header{}}
	poison.Header.Set(schemas.HeaderContentType, schemas.BatchContentType)
	poison.Header.Set(nats.MsgIdHdr, "poison-batch-logs-1")
	if _, err := nc.RequestMsg(poison, 5*time.Second); err != nil {
		t.Fatalf("publish the poison batch: %v", err)
	}

	want := []struct {
		msg    string
		fields map[string]string
	}{
		{"tenant blocked", map[string]string{"tenant": "acme", "reason": "quota_exceeded", "meter": "api_calls", "limit": "1000"}},
		{"tenant blocked", map[string]string{"tenant": "globex", "reason": "payment_overdue"}},
		{"billing webhook", map[string]string{"event_id": "evt_logs_fail_1", "tenant": "globex", "outcome": "applied", "type": "invoice.payment_failed"}},
		{"billing webhook refused", nil},
		{"message dead-lettered", map[string]string{"batch_id": "poison-batch-logs-1", "component": "aggregator"}},
		{"notification not delivered; giving up", map[string]string{"url": hook.URL, "tenant": "acme"}},
	}
	var recs []map[string]any
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		recs = jsonLines(t, s.stderr.String())
		missing := 0
		for _, w := range want {
			if findLog(recs, w.msg, w.fields) == nil {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) || t.Failed() {
			for _, w := range want {
				if findLog(recs, w.msg, w.fields) == nil {
					t.Errorf("no log line %q with %v", w.msg, w.fields)
				}
			}
			break
		}
	}
	s.stop()
	if hookHits.Load() == 0 {
		t.Error("the notification receiver was never called")
	}
	recs = jsonLines(t, s.stderr.String())
	if r := findLog(recs, "tenant blocked", map[string]string{"tenant": "acme"}); r != nil {
		if v, ok := r["version"].(float64); !ok || v <= 0 {
			t.Errorf("the block of acme logged version %v, want the decision's version", r["version"])
		}
	}
	if r := findLog(recs, "message dead-lettered", nil); r != nil && (r["stream_seq"] == nil || r["reason"] == nil) {
		t.Errorf("the DLQ line lacks stream_seq or reason: %v", r)
	}
	assertNoSecrets(t, "meterd dev's log", s.stderr.String())
}

// A non-dev subcommand logs JSON unless told otherwise, and neither its
// logs, its exit error nor its -h or usage output shows a secret of the
// config file, the environment or the command line.
func TestSubcommandsLogJSONWithoutSecrets(t *testing.T) {
	ns := jstest.Start(t, jstest.Config{NoSync: true})
	natsURL := strings.Replace(ns.URL(), "nats://", "nats://meterd:"+logNATSPass+"@", 1)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "meterd.yaml")
	config := fmt.Sprintf(`api_keys:
  - {key: %s, admin: true}
aggregator:
  clickhouse: clickhouse://meterd:%s@127.0.0.1:1/meterd
enforcer:
  webhook_secret: %s
  notify_secret: %s
  notify_urls: https://meterd:%s@hooks.example.com/services/%s
`, logAdminKey, logDSNPass, logWebhookKey, logNotifyKey, logNotifyPass, logNotifyToken)
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("METERD_CONFIG", cfgPath)
	t.Setenv("METERD_NATS_URL", natsURL)
	t.Setenv("METERD_NATS_REPLICAS", "1")

	// runFor runs meterd with args until it exits or d passed, and returns
	// its exit code (-1 when it was still running) and stderr.
	runFor := func(d time.Duration, args ...string) (int, string) {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		var stderr bytes.Buffer
		code := run(ctx, args, io.Discard, &stderr)
		if ctx.Err() != nil && code == 0 {
			code = -1
		}
		return code, stderr.String()
	}

	t.Run("collector", func(t *testing.T) {
		code, out := runFor(time.Second, "collector", "--listen", "127.0.0.1:0", "--spool-dir", t.TempDir())
		if code != -1 {
			t.Errorf("collector exited with %d before it was stopped: %s", code, out)
		}
		if r := findLog(jsonLines(t, out), "collector listening", nil); r == nil || !strings.HasPrefix(fmt.Sprint(r["nats"]), "nats://") {
			t.Errorf("no JSON line \"collector listening\" naming the NATS server: %s", out)
		}
		assertNoSecrets(t, "the collector's output", out)
	})
	t.Run("collector with a malformed NATS URL", func(t *testing.T) {
		code, out := runFor(10*time.Second, "collector", "--listen", "127.0.0.1:0", "--spool-dir", t.TempDir(),
			"--nats-url", "nats://meterd:"+logNATSPass+"@127.0.0.1:bad")
		if code != 1 || !strings.Contains(out, "meterd: broker: connect") {
			t.Errorf("exit %d, want 1 with the connect error: %s", code, out)
		}
		assertNoSecrets(t, "the collector's output", out)
	})
	t.Run("enforcer", func(t *testing.T) {
		code, out := runFor(time.Second, "enforcer", "--listen", "127.0.0.1:0", "--sqlite-path", filepath.Join(t.TempDir(), "m.db"),
			"--clickhouse", "", "--webhook-secret", logForgedSecret)
		if code != -1 {
			t.Errorf("enforcer exited with %d before it was stopped: %s", code, out)
		}
		if len(jsonLines(t, out)) == 0 {
			t.Errorf("the enforcer logged nothing: %s", out)
		}
		assertNoSecrets(t, "the enforcer's output", out)
	})
	t.Run("aggregator", func(t *testing.T) {
		// ClickHouse is not there: the exit error names the DSN.
		code, out := runFor(30*time.Second, "aggregator", "--listen", "127.0.0.1:0")
		if code != 1 || !strings.Contains(out, "meterd: clickhouse") {
			t.Errorf("aggregator without ClickHouse: exit %d, want 1 with a clickhouse error: %s", code, out)
		}
		jsonLines(t, out)
		assertNoSecrets(t, "the aggregator's output", out)
		code, out = runFor(30*time.Second, "aggregator", "--listen", "127.0.0.1:0", "--clickhouse", "clickhouse://meterd:"+logDSNPass+"@ch:bad/meterd")
		if code == 0 || code == -1 || !strings.Contains(out, "meterd: ") {
			t.Errorf("aggregator with a malformed DSN: exit %d, want an error: %s", code, out)
		}
		assertNoSecrets(t, "the aggregator's output for a malformed DSN", out)
	})
	t.Run("help and usage errors", func(t *testing.T) {
		t.Setenv("METERD_WEBHOOK_SECRET", logForgedSecret)
		for _, cmd := range []string{"dev", "collector", "aggregator", "enforcer"} {
			for _, args := range [][]string{{cmd, "-h"}, {cmd, "--no-such-flag"}} {
				code, out := runFor(10*time.Second, args...)
				if code == 0 && args[1] != "-h" || !strings.Contains(out, "-listen") {
					t.Errorf("meterd %s: exit %d without the flags' usage: %s", strings.Join(args, " "), code, out)
				}
				assertNoSecrets(t, "meterd "+strings.Join(args, " "), out)
			}
		}
	})
	t.Run("text on request", func(t *testing.T) {
		t.Setenv("METERD_LOG_FORMAT", "text")
		_, out := runFor(time.Second, "collector", "--listen", "127.0.0.1:0", "--spool-dir", t.TempDir())
		if !strings.Contains(out, "level=INFO msg=\"collector listening\"") {
			t.Errorf("METERD_LOG_FORMAT=text: no text log line: %s", out)
		}
	})
}
