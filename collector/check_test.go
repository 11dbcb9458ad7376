package collector

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/gate"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// checkEnv is a collector with a real gate watching a real KV bucket.
type checkEnv struct {
	*ingestEnv
	kv   jetstream.KeyValue
	gate *gate.Gate
}

func newCheckEnv(t testing.TB, mutate func(*Config)) *checkEnv {
	t.Helper()
	env := &checkEnv{}
	base := newIngestEnv(t, func(c *Config) {
		kv, err := createBlocklist(c)
		if err != nil {
			t.Fatal(err)
		}
		g := runGate(t, gate.Config{NATS: c.NATS})
		c.Gate, env.kv, env.gate = g, kv, g
		c.KnownTenant = func(tenant string) bool { return tenant != "stranger" }
		if mutate != nil {
			mutate(c)
		}
	})
	env.ingestEnv = base
	return env
}

func createBlocklist(c *Config) (jetstream.KeyValue, error) {
	js, err := jetstream.New(c.NATS)
	if err != nil {
		return nil, err
	}
	return js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: schemas.BlocklistBucket})
}

func (env *checkEnv) block(t testing.TB, d schemas.Decision) {
	t.Helper()
	data, _ := json.Marshal(d)
	if _, err := env.kv.Put(context.Background(), d.Tenant, data); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for env.gate.Check(d.Tenant).Block == nil {
		if time.Now().After(deadline) {
			t.Fatalf("gate never saw the block of %s", d.Tenant)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (env *checkEnv) check(t testing.TB, method string, headers map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, env.srv.URL+"/v1/check/some/original/path", nil)
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, body
}

func TestCheck(t *testing.T) {
	env := newCheckEnv(t, nil)
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC) // the collector's clock in tests
	periodEnd := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	env.block(t, schemas.Decision{
		Tenant: "acme", Reason: schemas.ReasonQuotaExceeded, Meter: "api_calls", Limit: 1000, Used: 1004,
		PeriodStart: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC), PeriodEnd: periodEnd,
		BillingURL: "https://billing.example.com/acme", Version: 42, DecidedAt: now,
	})
	env.block(t, schemas.Decision{Tenant: "globex", Reason: schemas.ReasonPaymentOverdue,
		BillingURL: "https://billing.example.com/globex", Version: 1, DecidedAt: now})

	t.Run("quota exceeded", func(t *testing.T) {
		resp, body := env.check(t, http.MethodGet, map[string]string{"X-Tenant-ID": "acme"})
		if resp.StatusCode != http.StatusPaymentRequired {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		if got, want := resp.Header.Get("Retry-After"), strconv.Itoa(int(periodEnd.Sub(now).Seconds())); got != want {
			t.Fatalf("Retry-After %q, want %q", got, want)
		}
		if got := resp.Header.Get("Link"); got != `<https://billing.example.com/acme>; rel="payment"` {
			t.Fatalf("Link %q", got)
		}
		if ct := resp.Header.Get("Content-Type"); ct != schemas.MediaProblem {
			t.Fatalf("Content-Type %q", ct)
		}
		var p map[string]any
		if err := json.Unmarshal(body, &p); err != nil {
			t.Fatal(err)
		}
		want := map[string]any{
			"type": "https://meterd.dev/problems/quota-exceeded", "title": "Payment Required", "status": 402.0,
			"detail": "acme used 1004 of 1000 api_calls in the period ending 2026-12-01T00:00:00Z; upgrade the plan or wait for the next period.",
			"reason": "quota_exceeded", "tenant": "acme", "meter": "api_calls", "limit": 1000.0, "used": 1004.0,
			"period_end": "2026-12-01T00:00:00Z", "billing_url": "https://billing.example.com/acme",
		}
		for k, v := range want {
			if p[k] != v {
				t.Errorf("%s = %v, want %v", k, p[k], v)
			}
		}
	})
	t.Run("payment overdue by tenant key", func(t *testing.T) {
		resp, body := env.check(t, http.MethodPost, map[string]string{"X-Tenant-ID": "globex"})
		if resp.StatusCode != 402 || resp.Header.Get("Retry-After") != "" {
			t.Fatalf("status %d Retry-After %q: %s", resp.StatusCode, resp.Header.Get("Retry-After"), body)
		}
		var p schemas.Problem
		json.Unmarshal(body, &p)
		if p.Block == nil || p.Reason != schemas.ReasonPaymentOverdue || p.Type != schemas.ProblemBase+"payment-overdue" {
			t.Fatalf("problem %s", body)
		}
	})
	t.Run("allowed calls are recorded", func(t *testing.T) {
		for i, h := range []map[string]string{
			{"X-Tenant-ID": "initech", "X-Request-ID": "call-1"},
			{"Authorization": "Bearer " + ingestAcmeKey, "X-Tenant-ID": "initech"}, // the key decides: acme is blocked
			{"X-Tenant-ID": "initech", "X-Request-ID": "call-2", "X-Meter": "tokens", "X-Meter-Value": "250"},
			{"X-Tenant-ID": "stranger", "X-Request-ID": "call-3"},
		} {
			resp, body := env.check(t, http.MethodGet, h)
			want := 200
			if i == 1 {
				want = 402
			}
			if resp.StatusCode != want {
				t.Fatalf("call %d: status %d, want %d: %s", i, resp.StatusCode, want, body)
			}
		}
		deadline := time.Now().Add(3 * time.Second)
		for {
			seen := env.streamEvents(t)
			if seen["initech/call-1"] == 1 && seen["initech/call-2"] == 1 && seen["stranger/call-3"] == 1 {
				if len(seen) != 3 {
					t.Fatalf("stream holds %v, want the 3 allowed calls only", seen)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("recorded calls not in the stream: %v", seen)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	t.Run("bad requests", func(t *testing.T) {
		for _, tc := range []struct {
			headers map[string]string
			status  int
		}{
			{map[string]string{}, 401},
			{map[string]string{"X-Tenant-ID": "no spaces"}, 400},
			{map[string]string{"X-Tenant-ID": "initech", "X-Meter": "Bad"}, 400},
			{map[string]string{"X-Tenant-ID": "initech", "X-Meter-Value": "-3"}, 400},
			{map[string]string{"X-Tenant-ID": "initech", "X-Meter-Value": strconv.Itoa(schemas.MaxValue + 1)}, 400},
		} {
			resp, body := env.check(t, http.MethodGet, tc.headers)
			if resp.StatusCode != tc.status || resp.Header.Get("Content-Type") != schemas.MediaProblem {
				t.Errorf("%v: status %d, want %d: %s", tc.headers, resp.StatusCode, tc.status, body)
			}
		}
	})
	t.Run("unblock", func(t *testing.T) {
		if err := env.kv.Delete(context.Background(), "acme"); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(2 * time.Second)
		for env.gate.Check("acme").Block != nil && time.Now().Before(deadline) {
			time.Sleep(2 * time.Millisecond)
		}
		if resp, body := env.check(t, http.MethodGet, map[string]string{"X-Tenant-ID": "acme"}); resp.StatusCode != 200 {
			t.Fatalf("after unblock: %d %s", resp.StatusCode, body)
		}
	})
}

func TestCheckUnknownTenantDenied(t *testing.T) {
	env := newCheckEnv(t, func(c *Config) { c.UnknownTenantPolicy = gate.Deny })
	resp, body := env.check(t, http.MethodGet, map[string]string{"X-Tenant-ID": "stranger"})
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("unknown tenant: %d %s", resp.StatusCode, body)
	}
	if resp, _ := env.check(t, http.MethodGet, map[string]string{"X-Tenant-ID": "initech"}); resp.StatusCode != 200 {
		t.Fatalf("known tenant: %d", resp.StatusCode)
	}
}

// An X-Request-ID that cannot be an event id as it is (over 128 characters,
// or not UTF-8) is hashed, never replaced by a random id: a gateway's retry
// of the call records the same id and counts once (docs/architecture.md#money-safety), and two
// different headers stay two ids.
func TestCheckUnusableRequestIDIsHashed(t *testing.T) {
	env := newCheckEnv(t, nil)
	long := strings.Repeat("r", schemas.MaxIDLen) + "-call-1"
	other := strings.Repeat("r", schemas.MaxIDLen) + "-call-2"
	exact := strings.Repeat("é", schemas.MaxIDLen) // 128 characters, 256 bytes: an id as it is
	calls := []string{long, long, other, "call-\xff", "call-\xfe", "call-\xff", exact, exact}
	for _, id := range calls {
		if resp, body := env.check(t, http.MethodGet, map[string]string{"X-Tenant-ID": "initech", "X-Request-ID": id}); resp.StatusCode != 200 {
			t.Fatalf("X-Request-ID %q: status %d: %s", id, resp.StatusCode, body)
		}
	}
	hashed := func(s string) string {
		sum := sha256.Sum256([]byte(s))
		return "initech/sha256:" + hex.EncodeToString(sum[:])
	}
	env.waitStreamEvents(t, map[string]int{hashed(long): 2, hashed(other): 1, hashed("call-\xff"): 2, hashed("call-\xfe"): 1, "initech/" + exact: 2})
}

// A stale gate under the deny policy answers 503 with Retry-After (the time
// in which it usually hears from the enforcer again), so gateways and their
// clients retry instead of giving up.
func TestCheckStaleDenyRetryAfter(t *testing.T) {
	env := newStaleDenyEnv(t)
	req, _ := http.NewRequest(http.MethodGet, env.srv.URL+"/v1/check", nil)
	req.Header.Set("X-Tenant-ID", "initech")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	// DefaultStaleAfter (15 s) spans three heartbeats: 5 s.
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") != "5" ||
		resp.Header.Get("Content-Type") != schemas.MediaProblem {
		t.Fatalf("stale deny: status %d, Retry-After %q, Content-Type %q: %s",
			resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("Content-Type"), body)
	}
}

// BenchmarkCheck compares /v1/check over loopback (allowed tenant, the call
// recorded as an event) with an empty Go handler in the same run, and with
// the same check over Envoy's gRPC ext_authz (grpc: one connection, as one
// Envoy worker). Each op is one request; parallel clients keep both cores
// busy.
func BenchmarkCheck(b *testing.B) {
	env := newCheckEnv(b, func(c *Config) { c.Now = time.Now; c.BatchMaxWait = DefaultBatchMaxWait })
	empty := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(200) }))
	b.Cleanup(empty.Close)
	run := func(b *testing.B, check func(tenant string) error) {
		var n atomic.Int64
		b.ReportAllocs()
		b.SetParallelism(4)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := check("tenant-" + strconv.FormatInt(n.Add(1)%100, 10)); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
	}
	overHTTP := func(url string) func(string) error {
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
		return func(tenant string) error {
			req, _ := http.NewRequest(http.MethodGet, url, nil)
			req.Header.Set("X-Tenant-ID", tenant)
			resp, err := client.Do(req)
			if err != nil {
				return err
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				return fmt.Errorf("status %d", resp.StatusCode)
			}
			return nil
		}
	}
	b.Run("empty-handler", func(b *testing.B) { run(b, overHTTP(empty.URL+"/")) })
	b.Run("check", func(b *testing.B) { run(b, overHTTP(env.srv.URL+"/v1/check")) })
	b.Run("grpc", func(b *testing.B) {
		g := startGRPC(b, env.col)
		run(b, func(tenant string) error {
			resp, err := g.client.Check(context.Background(), checkRequest(map[string]string{"X-Tenant-ID": tenant}, false))
			if err == nil && resp.GetStatus().GetCode() != 0 {
				err = fmt.Errorf("not allowed: %v", resp)
			}
			return err
		})
	})
}

// With NATS away and the spool full, an allowed check is still answered 200
// (the check never waits on NATS) but its call is not recorded, and that is
// counted as rejected (spool_full) instead of accepted: the spool never holds
// more than its bound.
func TestCheckSpoolFull(t *testing.T) {
	reg := prometheus.NewRegistry()
	env := newCheckEnv(t, func(c *Config) { c.SpoolMaxBytes = 2000; c.Registerer = reg })
	env.ns.Stop()
	deadline := time.Now().Add(5 * time.Second)
	for env.nc.IsConnected() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	const checks = 40
	for i := range checks {
		resp, body := env.check(t, http.MethodGet, map[string]string{"Authorization": "Bearer " + ingestAcmeKey, "X-Request-ID": fmt.Sprintf("call-%d", i)})
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("check %d: %d %s", i, resp.StatusCode, body)
		}
		time.Sleep(3 * time.Millisecond) // let batches seal and spool
	}
	deadline = time.Now().Add(5 * time.Second)
	for env.col.pipe.Reserved() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	accepted := metrictest.Value(t, reg, "meterd_collector_events_accepted_total")
	refused := metrictest.Value(t, reg, "meterd_collector_events_rejected_total", "reason", rejectSpoolFull)
	if accepted == 0 || refused == 0 || accepted+refused != checks {
		t.Fatalf("%v calls recorded and %v refused for a full spool; want both, %d in all", accepted, refused, checks)
	}
	if b := env.col.spool.Bytes(); b > 2000 {
		t.Fatalf("spool holds %d bytes, over its bound 2000", b)
	}
}

// newStaleDenyEnv is an ingest environment whose gate is stale once loaded
// (the enforcer's last heartbeat lies an hour before the gate's clock) and
// denies under the stale policy.
func newStaleDenyEnv(t testing.TB) *ingestEnv {
	t.Helper()
	return newIngestEnv(t, func(c *Config) {
		kv, err := createBlocklist(c)
		if err != nil {
			t.Fatal(err)
		}
		hb := fmt.Appendf(nil, `{"at":%q}`, time.Now().UTC().Format(time.RFC3339Nano))
		if _, err := kv.Put(t.Context(), schemas.HeartbeatKey, hb); err != nil {
			t.Fatal(err)
		}
		c.Gate = runGate(t, gate.Config{NATS: c.NATS, StalePolicy: gate.Deny, Now: func() time.Time { return time.Now().Add(time.Hour) }})
	})
}

// runGate runs a gate of cfg until the test ends and waits until it is
// ready (its KV watch delivered the initial values).
func runGate(t testing.TB, cfg gate.Config) *gate.Gate {
	t.Helper()
	g, err := gate.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); g.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	for deadline := time.Now().Add(5 * time.Second); g.Ready(ctx) != nil; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal(g.Ready(ctx))
		}
	}
	return g
}
