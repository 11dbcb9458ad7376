package enforcer

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/sqlite"
	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/schemas"
)

// Every aggregator store serves as the enforcer's UsageSource; the enforcer
// itself does not import the aggregator.
var (
	_ UsageSource = aggregator.Store(nil)
	_ UsageSource = (*sqlite.Store)(nil)
)

const (
	adminKey      = "admin-key-0123456789"
	tenantKey     = "acme-key-0123456789"
	webhookSecret = "whsec_test_secret"
	notifySecret  = "notify-secret"
)

// testClock is the wall clock moved by an offset a test can advance.
type testClock struct{ offset atomic.Int64 }

func (c *testClock) Now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *testClock) Advance(d time.Duration) { c.offset.Add(int64(d)) }
func (c *testClock) Period(cad catalog.Cadence) catalog.Period {
	return catalog.PeriodAt(cad, time.Time{}, c.Now())
}

// hooks is an HTTP server receiving notifications; it verifies each
// signature.
type hooks struct {
	t   testing.TB
	srv *httptest.Server

	mu  sync.Mutex
	got []Notification
	bad []string // what was wrong with a request
}

func newHooks(t testing.TB) *hooks {
	h := &hooks{t: t}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		h.mu.Lock()
		defer h.mu.Unlock()
		if err := VerifySignature(r.Header.Get(SignatureHeader), body, notifySecret, time.Now(), time.Minute); err != nil {
			h.bad = append(h.bad, "signature: "+err.Error())
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		var n Notification
		if err := json.Unmarshal(body, &n); err != nil {
			h.bad = append(h.bad, "body: "+err.Error())
		}
		h.got = append(h.got, n)
	}))
	t.Cleanup(h.srv.Close)
	return h
}

// of returns the notifications received of type typ.
func (h *hooks) of(typ string) []Notification {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.bad) > 0 {
		h.t.Errorf("bad notification requests: %v", h.bad)
	}
	var out []Notification
	for _, n := range h.got {
		if n.Type == typ {
			out = append(out, n)
		}
	}
	return out
}

// env is an enforcer on the shared embedded JetStream of internal/jstest
// and a real embedded store.
type env struct {
	t  *testing.T
	ns *jstest.Server
	// nc is the enforcer's connection, on which the tests also publish what
	// the aggregator would; js is the test's own, which reads the buckets.
	nc    *nats.Conn
	js    jetstream.JetStream
	store *sqlite.Store
	db    string // the store's file
	clock *testClock
	hooks *hooks
	keys  *auth.Keys
	cat   *catalog.Catalog
	seq   atomic.Int64

	// mutate adjusts the config of every enforcer started.
	mutate func(*Config)

	e      *Enforcer
	api    *httptest.Server
	cancel context.CancelFunc
	done   chan error
}

// testCatalog: acme (free, 1000 api_calls, block), bigco (pro, overage),
// daily (1000 api_calls per UTC day, block).
func testCatalog(t testing.TB) *catalog.Catalog {
	t.Helper()
	cat, err := catalog.NewCatalog([]catalog.Plan{
		{Name: "free", Limits: map[string]int64{"api_calls": 1000}, OnExceed: catalog.OnExceedBlock},
		{Name: "pro", Limits: map[string]int64{"api_calls": 1_000_000, "tokens": 5000}, OnExceed: catalog.OnExceedOverage},
		{Name: "day", Period: catalog.Daily, Limits: map[string]int64{"api_calls": 1000}},
	}, []catalog.Tenant{
		{Name: "acme", Plan: "free", CustomerID: "cus_acme", BillingURL: "https://billing.example.com/acme"},
		{Name: "bigco", Plan: "pro", CustomerID: "cus_bigco"},
		{Name: "daily", Plan: "day"},
	})
	if err != nil {
		t.Fatal(err)
	}
	return cat
}

func newEnv(t *testing.T) *env {
	t.Helper()
	// The tests are not about durability: skip the fsync per write.
	ns := jstest.Start(t, jstest.Config{NoSync: true})
	db := filepath.Join(t.TempDir(), "meterd.db")
	st, err := sqlite.New(sqlite.Config{Path: db})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	keys, err := auth.NewKeys([]auth.Key{{Key: adminKey, Admin: true}, {Key: tenantKey, Tenant: "acme"}})
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, ns: ns, nc: ns.Connect("enforcer"), js: ns.JetStream(), store: st, db: db, clock: &testClock{}, hooks: newHooks(t), keys: keys, cat: testCatalog(t)}
}

func (v *env) config() Config {
	cfg := Config{
		NATS: v.nc, Store: v.store, Catalog: v.cat, Keys: v.keys,
		WebhookSecret: webhookSecret,
		NotifyURLs:    []string{v.hooks.srv.URL}, NotifySecret: notifySecret,
		HeartbeatEvery: 200 * time.Millisecond,
		ReconcileEvery: time.Hour, // tests reconcile explicitly
		Now:            v.clock.Now,
		Logger:         slog.New(slog.NewTextHandler(testWriter{v.t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registerer:     prometheus.NewRegistry(),
	}
	if v.mutate != nil {
		v.mutate(&cfg)
	}
	return cfg
}

// start runs an enforcer until stop (or the end of the test) and waits
// until it is ready.
func (v *env) start() *Enforcer {
	v.t.Helper()
	e := v.launch()
	v.eventually("ready", 10*time.Second, func() error { return e.Ready(context.Background()) })
	return e
}

// launch runs an enforcer until stop (or the end of the test).
func (v *env) launch() *Enforcer {
	v.t.Helper()
	e, err := New(v.config())
	if err != nil {
		v.t.Fatal(err)
	}
	e.notify.newBackOff = fastBackOff
	ctx, cancel := context.WithCancel(context.Background())
	v.e, v.cancel, v.done = e, cancel, make(chan error, 1)
	go func() { v.done <- e.Run(ctx) }()
	mux := http.NewServeMux()
	e.Register(mux)
	v.api = httptest.NewServer(mux)
	v.t.Cleanup(v.stop)
	return e
}

// stop stops the running enforcer and checks Run returned nil.
func (v *env) stop() {
	if v.e == nil {
		return
	}
	v.api.Close()
	v.cancel()
	select {
	case err := <-v.done:
		if err != nil {
			v.t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		v.t.Error("Run did not return 10s after cancellation")
	}
	v.e.Close()
	v.e = nil
}

// fastBackOff paces notification retries in tests.
func fastBackOff() backoff.BackOff {
	return backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(10*time.Millisecond),
		backoff.WithMaxInterval(50*time.Millisecond),
		backoff.WithMaxElapsedTime(2*time.Second),
	)
}

// usage writes events of value each for tenant's meter into the store at
// time at and, when publish is set, publishes the increments as the
// aggregator does after its commit.
func (v *env) usage(tenant, meter string, at time.Time, publish bool, values ...int64) {
	v.t.Helper()
	b := &schemas.Batch{ID: fmt.Sprintf("b-%d", v.seq.Add(1)), Collector: "test", SealedAt: time.Now()}
	for _, val := range values {
		b.Events = append(b.Events, schemas.Event{ID: fmt.Sprintf("e-%d", v.seq.Add(1)), Tenant: tenant, Meter: meter, Value: val, Time: at})
	}
	incs, err := v.store.Apply(context.Background(), []*schemas.Batch{b})
	if err != nil {
		v.t.Fatal(err)
	}
	if publish {
		v.publish(incs...)
	}
}

func (v *env) publish(incs ...schemas.Increment) {
	v.t.Helper()
	for _, inc := range incs {
		data, _ := json.Marshal(schemas.Committed{Tenant: inc.Tenant, Meter: inc.Meter, Hour: inc.Hour, Value: inc.Value, Events: inc.Events})
		if err := v.nc.Publish(schemas.CommittedSubject(schemas.Partition(inc.Tenant, schemas.DefaultPartitions)), data); err != nil {
			v.t.Fatal(err)
		}
	}
	if err := v.nc.Flush(); err != nil {
		v.t.Fatal(err)
	}
}

func (v *env) kv(bucket string) jetstream.KeyValue {
	v.t.Helper()
	kv, err := v.js.KeyValue(context.Background(), bucket)
	if err != nil {
		v.t.Fatal(err)
	}
	return kv
}

// decision returns tenant's decision in the blocklist and its revision, or
// nil when the key is absent or deleted.
func (v *env) decision(tenant string) (*schemas.Decision, uint64) {
	v.t.Helper()
	en, err := v.kv(schemas.BlocklistBucket).Get(context.Background(), tenant)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return nil, 0
	}
	if err != nil {
		v.t.Fatal(err)
	}
	var d schemas.Decision
	if err := json.Unmarshal(en.Value(), &d); err != nil {
		v.t.Fatal(err)
	}
	return &d, en.Revision()
}

// waitDecision waits until tenant's decision satisfies ok.
func (v *env) waitDecision(tenant string, within time.Duration, ok func(*schemas.Decision) bool) *schemas.Decision {
	v.t.Helper()
	var d *schemas.Decision
	v.eventually("decision of "+tenant, within, func() error {
		d, _ = v.decision(tenant)
		if !ok(d) {
			return fmt.Errorf("decision %+v", d)
		}
		return nil
	})
	return d
}

func blockedFor(r schemas.Reason) func(*schemas.Decision) bool {
	return func(d *schemas.Decision) bool { return d != nil && d.Reason == r }
}

func unblocked(d *schemas.Decision) bool { return d == nil }

func (v *env) eventually(what string, within time.Duration, f func() error) {
	v.t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			v.t.Fatalf("%s: not within %s: %v", what, within, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// do sends an API request with key (none when empty) and decodes a JSON
// answer into out (when not nil).
func (v *env) do(method, path, key string, body any, out any) *http.Response {
	v.t.Helper()
	var rd io.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		rd = bytes.NewReader(data)
	}
	req, _ := http.NewRequest(method, v.api.URL+path, rd)
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		v.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			v.t.Fatalf("%s %s: %d %s: %v", method, path, resp.StatusCode, data, err)
		}
	}
	return resp
}

func (v *env) view(tenant string) TenantView {
	v.t.Helper()
	var tv TenantView
	if resp := v.do(http.MethodGet, "/v1/tenants/"+tenant, adminKey, nil, &tv); resp.StatusCode != http.StatusOK {
		v.t.Fatalf("GET tenant %s: %d", tenant, resp.StatusCode)
	}
	return tv
}

// stripeEvent is a billing webhook body.
func stripeEvent(id, typ, customer, object, status string, created time.Time) []byte {
	obj := map[string]any{"id": object, "customer": customer}
	if status != "" {
		obj["status"] = status
	}
	data, _ := json.Marshal(map[string]any{
		"id": id, "object": "event", "type": typ, "created": created.Unix(),
		"data": map[string]any{"object": obj},
	})
	return data
}

// webhook POSTs body signed at t with secret and returns the status code.
func (v *env) webhook(body []byte, secret string, t time.Time) int {
	v.t.Helper()
	req, _ := http.NewRequest(http.MethodPost, v.api.URL+"/v1/billing/webhook", bytes.NewReader(body))
	req.Header.Set(StripeSignatureHeader, Sign(body, secret, t))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		v.t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// writeFile replaces path's content, moving its mtime forward so a poll
// sees the change even within the file system's time resolution.
func writeFile(t testing.TB, path, content string) {
	t.Helper()
	var mtime time.Time
	if fi, err := os.Stat(path); err == nil {
		mtime = fi.ModTime().Add(time.Second)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if !mtime.IsZero() {
		os.Chtimes(path, mtime, mtime)
	}
}

// testWriter sends log lines to t.Log.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}
