package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meterd/meterd/enforcer"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/schemas"
)

// e2eConfig is the catalog of the end-to-end tests (docs/architecture.md#plans-and-billing-periods).
const e2eConfig = `plans:
  free: {period: monthly, limits: {api_calls: 1000}, on_exceed: block}
  pro:  {period: monthly, limits: {api_calls: 1000000}, on_exceed: overage}
tenants:
  acme:   {plan: free, billing_url: "https://billing.example.com/acme"}
  globex: {plan: pro, customer_id: cus_globex, billing_url: "https://billing.example.com/globex"}
enforcer:
  webhook_secret: whsec_test
  heartbeat_every: 1s
`

const e2eWebhookSecret = "whsec_test"

// freshnessTarget is the bound of docs/architecture.md#freshness-and-the-gate on the time from the call that
// crosses a limit to the gate answering 402.
const freshnessTarget = time.Second

// raceEnabled reports whether the test binary was built with -race, which
// slows every component of the pipeline several times over.
func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// Instant 402 enforcement through `meterd dev` in this process, on both
// stores: a tenant crossing its quota is blocked within a second with the
// docs/architecture.md#http-apis answer and an overshoot bounded by rate × freshness; billing
// webhooks block and unblock a tenant within a second, idempotently and in
// any order; and every allowed check is counted exactly once.
func TestEndToEndEnforcement(t *testing.T) {
	for _, kind := range []string{"sqlite", "clickhouse"} {
		t.Run(kind, func(t *testing.T) {
			var args []string
			if kind == "clickhouse" {
				args = []string{"--clickhouse", chtest.DSN(t)}
			}
			s := startE2EDev(t, e2eConfig, args...)
			var allowed int64
			t.Run("quota", func(t *testing.T) { allowed = e2eQuota(t, s) })
			t.Run("billing", func(t *testing.T) { e2eBilling(t, s) })
			t.Run("usage", func(t *testing.T) {
				if allowed == 0 {
					t.Skip("the quota subtest did not run to its end")
				}
				e2eUsage(t, s, "acme", allowed)
			})
			s.stop()
		})
	}
}

// e2eQuota drives acme's /v1/check from 4 goroutines until the first 402 and
// returns how many calls were allowed.
func e2eQuota(t *testing.T, s *e2eDev) int64 {
	const (
		limit    = 1000
		workers  = 4
		maxCalls = 500_000 // far beyond the crossing at any plausible rate
	)
	bound := freshnessTarget
	if raceEnabled() {
		// -race slows every hop of the pipeline several times over: 85–805 ms
		// measured on 2 cores (65–226 ms without it), too close to 1 s on a
		// machine other tests share.
		bound = 2 * freshnessTarget
	}
	var (
		calls    atomic.Int64 // answered
		allowed  atomic.Int64
		crossing atomic.Int64 // unix nanoseconds of the answer of the 1000th allowed call
		stop     atomic.Bool

		mu          sync.Mutex
		first       *e2eAnswer // the first 402
		firstAt     time.Time
		callsBefore int64 // calls answered before the first 402
		failure     error
	)
	start := time.Now()
	deadline := start.Add(60 * time.Second)
	var wg sync.WaitGroup
	for g := range workers {
		wg.Go(func() {
			for i := 0; !stop.Load() && calls.Load() < maxCalls && time.Now().Before(deadline); i++ {
				a, err := s.check("acme", fmt.Sprintf("quota-%d-%d", g, i))
				now := time.Now()
				n := calls.Add(1)
				switch {
				case err == nil && a.status == http.StatusOK:
					if allowed.Add(1) == limit {
						crossing.Store(now.UnixNano())
					}
				case err == nil && a.status == http.StatusPaymentRequired:
					mu.Lock()
					if first == nil {
						first, firstAt, callsBefore = a, now, n-1
					}
					mu.Unlock()
					stop.Store(true)
				default:
					if err == nil {
						err = fmt.Errorf("status %d: %s", a.status, a.body)
					}
					mu.Lock()
					failure = e2eFirstErr(failure, err)
					mu.Unlock()
					stop.Store(true)
				}
			}
		})
	}
	wg.Wait()
	if failure != nil {
		t.Fatalf("check of acme: %v", failure)
	}
	total200 := allowed.Load()
	if first == nil {
		t.Fatalf("no 402 after %d calls (%d allowed) in %s", calls.Load(), total200, time.Since(start).Round(time.Millisecond))
	}
	if total200 < limit {
		t.Fatalf("402 after only %d allowed calls, want ≥ %d: %s", total200, limit, first.body)
	}
	crossedAt := time.Unix(0, crossing.Load())
	freshness := firstAt.Sub(crossedAt)
	rate := float64(callsBefore) / firstAt.Sub(start).Seconds()
	overshoot := total200 - limit
	maxOvershoot := int64(math.Ceil(rate * bound.Seconds()))
	t.Logf("acme: freshness %s (bound %s), overshoot %d calls (bound %d = %.0f calls/s × %s), %d allowed, %d calls in all",
		freshness.Round(time.Millisecond), bound, overshoot, maxOvershoot, rate, bound, total200, calls.Load())
	if freshness > bound {
		t.Errorf("freshness %s: the first 402 came that long after the crossing call was accepted, want ≤ %s", freshness, bound)
	}
	if overshoot > maxOvershoot {
		t.Errorf("overshoot %d calls > rate × freshness bound = %d", overshoot, maxOvershoot)
	}

	p := e2eCheckProblem(t, first, "quota-exceeded", "quota_exceeded", "acme", "https://billing.example.com/acme")
	if p.Meter != "api_calls" {
		t.Errorf("meter = %q, want api_calls", p.Meter)
	}
	if p.Limit == nil || *p.Limit != limit {
		t.Errorf("limit = %v, want %d", p.Limit, limit)
	}
	// The enforcer counted at least the limit, and never more than the
	// gate allowed.
	if p.Used == nil || *p.Used < limit || *p.Used > total200 {
		t.Errorf("used = %v, want in [%d, %d]", p.Used, limit, total200)
	}
	if p.PeriodEnd == nil || !p.PeriodEnd.After(firstAt) || p.PeriodEnd.After(firstAt.AddDate(0, 1, 1)) {
		t.Errorf("period_end = %v, want within a month after %s", p.PeriodEnd, firstAt.UTC().Format(time.RFC3339))
	} else {
		wantRetry := p.PeriodEnd.Sub(firstAt).Seconds()
		ra, err := strconv.ParseInt(first.header.Get("Retry-After"), 10, 64)
		if err != nil || math.Abs(float64(ra)-wantRetry) > 5 {
			t.Errorf("Retry-After = %q, want the %.0f seconds until period_end", first.header.Get("Retry-After"), wantRetry)
		}
	}

	// Every later call is refused too.
	for i := range 50 {
		a, err := s.check("acme", fmt.Sprintf("after-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if a.status != http.StatusPaymentRequired {
			t.Fatalf("call %d after the first 402: status %d, want 402", i, a.status)
		}
	}
	return total200
}

// e2eBilling blocks and unblocks globex through signed billing webhooks.
func e2eBilling(t *testing.T, s *e2eDev) {
	const tenant = "globex"
	if a := s.mustCheck(t, tenant); a.status != http.StatusOK {
		t.Fatalf("globex before any webhook: status %d, want 200: %s", a.status, a.body)
	}
	base := time.Now().Add(-time.Hour).Truncate(time.Second)

	// An unpaid invoice blocks within a second, without Retry-After.
	failed := e2eStripeEvent("evt_e2e_fail_1", "invoice.payment_failed", "in_e2e_1", "cus_globex", base)
	sent := time.Now()
	s.webhook(t, failed, enforcer.Sign(failed, e2eWebhookSecret, time.Now()), "applied")
	a, took := s.waitCheck(t, tenant, http.StatusPaymentRequired, sent, freshnessTarget)
	t.Logf("globex blocked %s after the payment_failed webhook was sent", took.Round(time.Millisecond))
	e2eCheckProblem(t, a, "payment-overdue", "payment_overdue", tenant, "https://billing.example.com/globex")
	if ra := a.header.Get("Retry-After"); ra != "" {
		t.Errorf("Retry-After = %q for an unpaid tenant, want none", ra)
	}

	// Stripe redelivers: the same event (signed again) changes nothing.
	s.webhook(t, failed, enforcer.Sign(failed, e2eWebhookSecret, time.Now()), "duplicate")
	s.holdCheck(t, tenant, http.StatusPaymentRequired, 300*time.Millisecond)

	// The invoice paid later unblocks within a second.
	paid := e2eStripeEvent("evt_e2e_paid_1", "invoice.paid", "in_e2e_1", "cus_globex", base.Add(time.Minute))
	sent = time.Now()
	s.webhook(t, paid, enforcer.Sign(paid, e2eWebhookSecret, time.Now()), "applied")
	_, took = s.waitCheck(t, tenant, http.StatusOK, sent, freshnessTarget)
	t.Logf("globex unblocked %s after the invoice.paid webhook was sent", took.Round(time.Millisecond))

	// Out of order: another invoice's payment arrives before its earlier
	// failure; the tenant stays allowed.
	paid2 := e2eStripeEvent("evt_e2e_paid_2", "invoice.paid", "in_e2e_2", "cus_globex", base.Add(3*time.Minute))
	failed2 := e2eStripeEvent("evt_e2e_fail_2", "invoice.payment_failed", "in_e2e_2", "cus_globex", base.Add(2*time.Minute))
	s.webhook(t, paid2, enforcer.Sign(paid2, e2eWebhookSecret, time.Now()), "applied")
	s.webhook(t, failed2, enforcer.Sign(failed2, e2eWebhookSecret, time.Now()), "applied")
	s.holdCheck(t, tenant, http.StatusOK, freshnessTarget+500*time.Millisecond)
	e2eBillingStatus(t, s, tenant, "active")

	// A forged webhook is refused and changes nothing.
	forged := e2eStripeEvent("evt_e2e_fail_3", "invoice.payment_failed", "in_e2e_3", "cus_globex", base.Add(4*time.Minute))
	r, err := s.do(http.MethodPost, "/v1/billing/webhook",
		http.Header{enforcer.StripeSignatureHeader: {enforcer.Sign(forged, "whsec_wrong", time.Now())}, "Content-Type": {"application/json"}}, forged)
	if err != nil {
		t.Fatal(err)
	}
	if r.status != http.StatusBadRequest || r.header.Get("Content-Type") != schemas.MediaProblem {
		t.Errorf("forged webhook: status %d, Content-Type %q, want 400 %s: %s", r.status, r.header.Get("Content-Type"), schemas.MediaProblem, r.body)
	}
	s.holdCheck(t, tenant, http.StatusOK, freshnessTarget+500*time.Millisecond)
	e2eBillingStatus(t, s, tenant, "active")
}

// e2eUsage waits until the enforcer's usage of tenant is the number of calls
// the gate allowed: each allowed check counted once, none lost.
func e2eUsage(t *testing.T, s *e2eDev, tenant string, allowed int64) {
	deadline := time.Now().Add(5 * time.Second)
	var got int64
	for {
		v := e2eTenant(t, s, tenant)
		got = v.Usage["api_calls"]
		if got > allowed {
			t.Fatalf("usage.api_calls of %s = %d > %d allowed calls: counted twice", tenant, got, allowed)
		}
		if v.UsageSeeded && got == allowed {
			t.Logf("usage.api_calls of %s = %d = allowed calls", tenant, got)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("usage.api_calls of %s = %d (seeded %v) after 5 s, want %d allowed calls", tenant, got, v.UsageSeeded, allowed)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func e2eTenant(t *testing.T, s *e2eDev, tenant string) enforcer.TenantView {
	t.Helper()
	r, err := s.do(http.MethodGet, "/v1/tenants/"+tenant, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r.status != http.StatusOK {
		t.Fatalf("GET /v1/tenants/%s: status %d: %s", tenant, r.status, r.body)
	}
	var v enforcer.TenantView
	if err := json.Unmarshal(r.body, &v); err != nil {
		t.Fatalf("GET /v1/tenants/%s: %v: %s", tenant, err, r.body)
	}
	return v
}

func e2eBillingStatus(t *testing.T, s *e2eDev, tenant, want string) {
	t.Helper()
	if v := e2eTenant(t, s, tenant); v.BillingStatus != want || v.Blocked != nil {
		t.Errorf("%s: billing_status %q, blocked %+v; want %q and not blocked", tenant, v.BillingStatus, v.Blocked, want)
	}
}

// e2eProblem is the 402 body of docs/architecture.md#http-apis.
type e2eProblem struct {
	Type       string     `json:"type"`
	Title      string     `json:"title"`
	Status     int        `json:"status"`
	Detail     string     `json:"detail"`
	Reason     string     `json:"reason"`
	Tenant     string     `json:"tenant"`
	Meter      string     `json:"meter"`
	Limit      *int64     `json:"limit"`
	Used       *int64     `json:"used"`
	PeriodEnd  *time.Time `json:"period_end"`
	BillingURL string     `json:"billing_url"`
}

// e2eCheckProblem checks the parts of a 402 every reason shares.
func e2eCheckProblem(t *testing.T, a *e2eAnswer, slug, reason, tenant, billingURL string) e2eProblem {
	t.Helper()
	var p e2eProblem
	if a.status != http.StatusPaymentRequired {
		t.Fatalf("status %d, want 402: %s", a.status, a.body)
	}
	if ct := a.header.Get("Content-Type"); ct != schemas.MediaProblem {
		t.Errorf("Content-Type = %q, want %s", ct, schemas.MediaProblem)
	}
	if err := json.Unmarshal(a.body, &p); err != nil {
		t.Fatalf("402 body: %v: %s", err, a.body)
	}
	if want := schemas.ProblemBase + slug; p.Type != want {
		t.Errorf("type = %q, want %q", p.Type, want)
	}
	if p.Title != "Payment Required" || p.Status != http.StatusPaymentRequired || p.Detail == "" {
		t.Errorf("title %q, status %d, detail %q; want Payment Required, 402 and a detail", p.Title, p.Status, p.Detail)
	}
	if p.Reason != reason || p.Tenant != tenant || p.BillingURL != billingURL {
		t.Errorf("reason %q, tenant %q, billing_url %q; want %q, %q, %q", p.Reason, p.Tenant, p.BillingURL, reason, tenant, billingURL)
	}
	if got, want := a.header.Values("Link"), []string{"<" + billingURL + `>; rel="payment"`}; !slices.Equal(got, want) {
		t.Errorf("Link = %q, want %q", got, want)
	}
	return p
}

// e2eStripeEvent is a Stripe invoice event as the webhook receives it.
func e2eStripeEvent(id, typ, invoice, customer string, created time.Time) []byte {
	body, err := json.Marshal(map[string]any{
		"id": id, "object": "event", "type": typ, "created": created.Unix(), "livemode": false,
		"data": map[string]any{"object": map[string]any{"id": invoice, "object": "invoice", "customer": customer}},
	})
	if err != nil {
		panic(err)
	}
	return body
}

// e2eDev is `meterd dev` running in this process through run.
type e2eDev struct {
	tb     testing.TB
	base   string // http://host:port
	client *http.Client
	stderr *e2eBuffer
	// auth, when set, is the Authorization of the test's own requests
	// that carry none.
	auth string

	cancel   context.CancelFunc
	code     chan int // run's exit code
	stopOnce sync.Once
}

// startE2EDev runs `meterd dev` with config and args on a free loopback port,
// a fresh data directory and text logs, and waits until /readyz answers
// 200. The server stops when tb ends, unless stop was called before.
func startE2EDev(tb testing.TB, config string, args ...string) *e2eDev {
	tb.Helper()
	dir := tb.TempDir()
	cfgPath := filepath.Join(dir, "meterd.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		tb.Fatal(err)
	}
	// Port 0: the listener is bound before dev prints its address, so no
	// other process can take the port between choosing and binding it.
	argv := append([]string{"dev", "--listen", "127.0.0.1:0", "--data-dir", filepath.Join(dir, "data"),
		"--config", cfgPath, "--log-format", "text", "--shutdown-grace", "10s"}, args...)
	ctx, cancel := context.WithCancel(context.Background())
	stdout := &e2eBuffer{}
	s := &e2eDev{
		tb:     tb,
		stderr: &e2eBuffer{},
		cancel: cancel,
		code:   make(chan int, 1),
		client: &http.Client{
			Timeout:   10 * time.Second,
			Transport: &http.Transport{Proxy: nil, MaxIdleConns: 256, MaxIdleConnsPerHost: 256, IdleConnTimeout: 30 * time.Second},
		},
	}
	go func() { s.code <- run(ctx, argv, stdout, s.stderr) }()
	tb.Cleanup(func() {
		s.stop()
		if tb.Failed() {
			tb.Logf("meterd dev log (end):\n%s", s.stderr.tail(32<<10))
		}
	})

	deadline := time.Now().Add(90 * time.Second) // a private ClickHouse starts first
	const marker = "listening on http://"
	for s.base == "" {
		if out := stdout.String(); strings.Contains(out, marker) {
			addr, _, _ := strings.Cut(out[strings.Index(out, marker)+len(marker):], "\n")
			s.base = "http://" + strings.TrimSpace(addr)
			break
		}
		select {
		case code := <-s.code:
			s.code <- code
			tb.Fatalf("meterd dev exited with %d before listening:\n%s", code, s.stderr.tail(16<<10))
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			tb.Fatalf("meterd dev not listening after 90 s:\n%s", s.stderr.tail(16<<10))
		}
	}
	for {
		r, err := s.do(http.MethodGet, "/readyz", nil, nil)
		if err == nil && r.status == http.StatusOK {
			return s
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("status %d: %s", r.status, r.body)
			}
			tb.Fatalf("/readyz not 200 after 90 s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop cancels run's context and fails the test unless run returns 0
// within a minute. It is idempotent.
func (s *e2eDev) stop() {
	s.stopOnce.Do(func() {
		s.cancel()
		select {
		case code := <-s.code:
			if code != 0 {
				s.tb.Errorf("meterd dev: run returned %d, want 0", code)
			}
		case <-time.After(time.Minute):
			s.tb.Errorf("meterd dev: run still running a minute after its context was canceled")
		}
		s.client.CloseIdleConnections()
	})
}

// e2eAnswer is an HTTP answer read to its end.
type e2eAnswer struct {
	status int
	header http.Header
	body   []byte
}

func (s *e2eDev) do(method, path string, header http.Header, body []byte) (*e2eAnswer, error) {
	if s.auth != "" && header.Get("Authorization") == "" {
		header = header.Clone()
		if header == nil {
			header = http.Header{}
		}
		header.Set("Authorization", s.auth)
	}
	return fetch(s.client, method, s.base+path, header, body)
}

// fetch sends a request with client and reads the answer to its end.
func fetch(client *http.Client, method, url string, header http.Header, body []byte) (*e2eAnswer, error) {
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	for k, vs := range header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	return &e2eAnswer{status: resp.StatusCode, header: resp.Header, body: data}, nil
}

// check calls GET /v1/check for tenant; requestID, when set, is the id of
// the usage event an allowed call records.
func (s *e2eDev) check(tenant, requestID string) (*e2eAnswer, error) {
	h := http.Header{"X-Tenant-Id": {tenant}}
	if requestID != "" {
		h.Set("X-Request-Id", requestID)
	}
	return s.do(http.MethodGet, "/v1/check", h, nil)
}

func (s *e2eDev) mustCheck(t *testing.T, tenant string) *e2eAnswer {
	t.Helper()
	a, err := s.check(tenant, "")
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// waitCheck polls tenant's check until it answers status, and fails t if
// that takes longer than within after start.
func (s *e2eDev) waitCheck(t *testing.T, tenant string, status int, start time.Time, within time.Duration) (*e2eAnswer, time.Duration) {
	t.Helper()
	for {
		a := s.mustCheck(t, tenant)
		took := time.Since(start)
		if a.status == status {
			return a, took
		}
		if took > within {
			t.Fatalf("%s: status %d after %s, want %d within %s: %s", tenant, a.status, took.Round(time.Millisecond), status, within, a.body)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// holdCheck asserts that tenant's check answers status throughout d.
func (s *e2eDev) holdCheck(t *testing.T, tenant string, status int, d time.Duration) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if a := s.mustCheck(t, tenant); a.status != status {
			t.Fatalf("%s: status %d, want %d throughout %s: %s", tenant, a.status, status, d, a.body)
		}
	}
}

// webhook posts a billing event signed with sig and wants a 2xx answer of
// the given outcome (applied, duplicate).
func (s *e2eDev) webhook(t *testing.T, body []byte, sig, outcome string) {
	t.Helper()
	r, err := s.do(http.MethodPost, "/v1/billing/webhook",
		http.Header{enforcer.StripeSignatureHeader: {sig}, "Content-Type": {"application/json"}}, body)
	if err != nil {
		t.Fatal(err)
	}
	var ans struct {
		Status string `json:"status"`
		Tenant string `json:"tenant"`
	}
	if r.status/100 != 2 || json.Unmarshal(r.body, &ans) != nil || ans.Status != outcome || ans.Tenant != "globex" {
		t.Fatalf("webhook %s: status %d %s, want 2xx with status %q for globex", body, r.status, r.body, outcome)
	}
}

// e2eBuffer is an io.Writer safe for concurrent use.
type e2eBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *e2eBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *e2eBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// tail returns the last n bytes written.
func (b *e2eBuffer) tail(n int) string {
	s := b.String()
	if len(s) > n {
		s = "…" + s[len(s)-n:]
	}
	return s
}

func e2eFirstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// BenchmarkFreshness measures freshness (docs/architecture.md#freshness-and-the-gate) under ingest load, on
// each store, at the 150 000 events/s of docs/architecture.md#performance-targets and, on the embedded store,
// also at 100 000: POST /v1/events in batches of 500 for many tenants whose
// limits are crossed one after the other during the run; per crossing, the
// time from the 202 of the request that holds the crossing event to the
// first 402 of /v1/check for that tenant. The whole of meterd dev (HTTP
// ingest, JetStream syncing every write, aggregator, store, enforcer) runs
// in this process, with ClickHouse beside it.
func BenchmarkFreshness(b *testing.B) {
	for _, bc := range []struct {
		store string
		rate  int
	}{{"sqlite", 100_000}, {"sqlite", 150_000}, {"clickhouse", 150_000}} {
		b.Run(fmt.Sprintf("%s/rate=%d", bc.store, bc.rate), func(b *testing.B) {
			var args []string
			if bc.store == "clickhouse" {
				args = []string{"--clickhouse", chtest.DSN(b)}
			}
			benchmarkFreshness(b, bc.rate, args...)
		})
	}
}

// benchmarkFreshness runs BenchmarkFreshness at targetRate events/s on
// meterd dev started with storeArgs.
func benchmarkFreshness(b *testing.B, targetRate int, storeArgs ...string) {
	const (
		tenants     = 64
		perRequest  = 500
		workers     = 8
		maxDuration = 8 * time.Second
		// Polling every 2 ms took enough of a 2-core machine from the
		// pipeline to double the freshness it measured.
		pollEvery = 5 * time.Millisecond
		// A crossing is waited for this long: a slow one is still a sample,
		// so a stall shows in p99 instead of being left out of it.
		waitFor402 = 30 * time.Second
		// Tenant k crosses its limit within its (k%spread+1)-th request,
		// so crossings are spread over the run instead of bunched.
		spread = 20
	)
	names := make([]string, tenants)
	limits := make([]int64, tenants)
	var cfg strings.Builder
	cfg.WriteString("plans:\n  free: {period: monthly, limits: {api_calls: 1000}, on_exceed: block}\ntenants:\n")
	for k := range tenants {
		names[k] = fmt.Sprintf("bench-%03d", k)
		limits[k] = int64(perRequest*(1+k%spread) - perRequest/2)
		fmt.Fprintf(&cfg, "  %s: {plan: free, billing_url: \"https://billing.example.com/%s\", overrides: {limits: {api_calls: %d}}}\n",
			names[k], names[k], limits[k])
	}
	cfg.WriteString("enforcer:\n  heartbeat_every: 1s\n")

	var (
		mu         sync.Mutex
		fresh      []time.Duration
		missed     int
		failures   int
		firstErr   error
		events     int64
		ingestTime time.Duration
	)
	for range b.N {
		b.StopTimer()
		// Checks are not recorded: polling must not add usage.
		s := startE2EDev(b, cfg.String(), append([]string{"--dont-record-checks"}, storeArgs...)...)
		b.StartTimer()

		var acked [tenants]atomic.Int64
		var polls sync.WaitGroup
		poll := func(tenant int, crossed time.Time) {
			tick := time.NewTicker(pollEvery)
			defer tick.Stop()
			for end := crossed.Add(waitFor402); time.Now().Before(end); <-tick.C {
				a, err := s.check(names[tenant], "")
				if err == nil && a.status == http.StatusPaymentRequired {
					d := time.Since(crossed)
					mu.Lock()
					fresh = append(fresh, d)
					mu.Unlock()
					return
				}
			}
			mu.Lock()
			missed++
			mu.Unlock()
		}

		start := time.Now()
		ctx, cancel := context.WithDeadline(context.Background(), start.Add(maxDuration))
		reqs := make(chan int)
		go func() { // the pacer: one request every perRequest/targetRate
			defer close(reqs)
			interval := time.Second * perRequest / time.Duration(targetRate)
			for i := range int(maxDuration/interval) + 1 {
				if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
					time.Sleep(d)
				}
				select {
				case reqs <- i:
				case <-ctx.Done():
					return
				}
			}
		}()
		var sent atomic.Int64
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				var body []byte
				for i := range reqs {
					k := i % tenants
					body = e2eEvents(body[:0], i, names[k], perRequest)
					r, err := s.do(http.MethodPost, "/v1/events", http.Header{"Content-Type": {"application/json"}}, body)
					now := time.Now()
					if err != nil || r.status != http.StatusAccepted {
						if err == nil {
							err = fmt.Errorf("status %d: %s", r.status, r.body)
						}
						mu.Lock()
						failures++
						firstErr = e2eFirstErr(firstErr, err)
						mu.Unlock()
						continue
					}
					sent.Add(perRequest)
					if n := acked[k].Add(perRequest); n >= limits[k] && n-perRequest < limits[k] {
						polls.Go(func() { poll(k, now) })
					}
				}
			})
		}
		wg.Wait()
		elapsed := time.Since(start)
		cancel()
		polls.Wait()
		b.StopTimer()
		events += sent.Load()
		ingestTime += elapsed
		s.stop()
	}
	if failures > 0 {
		b.Errorf("%d event requests failed; first: %v", failures, firstErr)
	}
	if missed > 0 {
		b.Errorf("%d tenants over their limit got no 402 within %s", missed, waitFor402)
	}
	if len(fresh) == 0 {
		b.Fatal("no tenant crossed its limit")
	}
	slices.Sort(fresh)
	p50, p99 := e2ePercentile(fresh, 0.50), e2ePercentile(fresh, 0.99)
	rate := float64(events) / ingestTime.Seconds()
	b.ReportMetric(float64(p50)/float64(time.Millisecond), "p50-freshness-ms")
	b.ReportMetric(float64(p99)/float64(time.Millisecond), "p99-freshness-ms")
	b.ReportMetric(rate, "events/s")
	b.ReportMetric(float64(len(fresh)), "crossings")
	b.Logf("%d crossings: freshness p50 %s, p99 %s, max %s; %.0f events/s ingested (target %d) for %s",
		len(fresh), p50.Round(time.Millisecond), p99.Round(time.Millisecond), fresh[len(fresh)-1].Round(time.Millisecond),
		rate, targetRate, ingestTime.Round(time.Millisecond))
}

// e2ePercentile returns the q-quantile of sorted (nearest rank).
func e2ePercentile(sorted []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(i, 0)]
}

// e2eEvents appends a JSON array of n api_calls events of tenant, with
// ids unique to request req.
func e2eEvents(buf []byte, req int, tenant string, n int) []byte {
	buf = append(buf, '[')
	for j := range n {
		if j > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, `{"id":"r`...)
		buf = strconv.AppendInt(buf, int64(req), 10)
		buf = append(buf, '-')
		buf = strconv.AppendInt(buf, int64(j), 10)
		buf = append(buf, `","tenant":"`...)
		buf = append(buf, tenant...)
		buf = append(buf, `","meter":"api_calls","value":1}`...)
	}
	return append(buf, ']')
}
