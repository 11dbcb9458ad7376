package enforcer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

func TestSeedFromStoreBlocksAtStart(t *testing.T) {
	v := newEnv(t)
	p := v.clock.Period(catalog.Monthly)
	v.usage("acme", "api_calls", p.Start, false, 700, 500)             // 1200 of 1000
	v.usage("acme", "api_calls", p.Start.Add(-time.Hour), false, 5000) // the previous period
	v.usage("bigco", "api_calls", p.Start, false, 2_000_000)           // overage plan: never blocked
	v.usage("stranger", "api_calls", p.Start, false, 1_000_000)        // not in the catalog
	v.start()

	// Ready means seeded; the decisions of the seed are written right after.
	d := v.waitDecision("acme", 5*time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	want := schemas.Decision{Tenant: "acme", Reason: schemas.ReasonQuotaExceeded, Meter: "api_calls", Limit: 1000, Used: 1200,
		PeriodStart: p.Start, PeriodEnd: p.End, BillingURL: "https://billing.example.com/acme"}
	if !sameBlock(*d, want) || d.Used != 1200 || d.Version == 0 || d.DecidedAt.IsZero() {
		t.Errorf("decision = %+v, want %+v", *d, want)
	}
	for _, tenant := range []string{"bigco", "stranger", "daily"} {
		if d, _ := v.decision(tenant); d != nil {
			t.Errorf("%s blocked: %+v", tenant, *d)
		}
	}
	if got := v.view("acme").Usage["api_calls"]; got != 1200 {
		t.Errorf("acme usage = %d, want 1200 (the previous period does not count)", got)
	}
}

// gatedStore is the real store whose first Totals of period, once it has
// read the totals, waits until the test releases it: the window in which
// increments committed after the store's snapshot reach the enforcer.
type gatedStore struct {
	UsageSource
	period   catalog.Period
	once     sync.Once
	snapshot chan struct{}
	release  chan struct{}
}

func (g *gatedStore) Totals(ctx context.Context, from, to time.Time) ([]schemas.Increment, error) {
	incs, err := g.UsageSource.Totals(ctx, from, to)
	if from.Equal(g.period.Start) && to.Equal(g.period.End) {
		g.once.Do(func() {
			close(g.snapshot)
			select {
			case <-g.release:
			case <-ctx.Done():
			}
		})
	}
	return incs, err
}

func TestSeedCountsIncrementsDuringSeedingOnce(t *testing.T) {
	v := newEnv(t)
	p := v.clock.Period(catalog.Monthly)
	v.usage("acme", "api_calls", p.Start, true, 500) // committed (and published) before the start
	g := &gatedStore{UsageSource: v.store, period: p, snapshot: make(chan struct{}), release: make(chan struct{})}
	v.mutate = func(c *Config) { c.Store = g }
	e := v.launch()
	<-g.snapshot
	v.usage("acme", "api_calls", p.Start, true, 300) // committed after the snapshot
	v.eventually("increment journaled", 5*time.Second, func() error {
		e.track.mu.Lock()
		defer e.track.mu.Unlock()
		for j := range e.track.journals {
			if j.adds["acme"]["api_calls"] == 300 {
				return nil
			}
		}
		return errors.New("not yet")
	})
	close(g.release)
	v.eventually("ready", 10*time.Second, func() error { return e.Ready(context.Background()) })
	if got := v.view("acme").Usage["api_calls"]; got != 800 {
		t.Errorf("usage after seeding = %d, want 800 (500 from the store, 300 arrived during the query)", got)
	}
}

func TestIncrementsCrossLimitAndNotifyOnce(t *testing.T) {
	v := newEnv(t)
	p := v.clock.Period(catalog.Monthly)
	v.usage("acme", "api_calls", p.Start, false, 900)
	e := v.start()

	// 900 of 1000 at start: 80 % is reached, 100 % not yet.
	v.eventually("80% notification", 5*time.Second, func() error {
		if n := len(v.hooks.of(NotifyUsageThreshold)); n != 1 {
			return errors.New("not yet")
		}
		return nil
	})
	if d, _ := v.decision("acme"); d != nil {
		t.Fatalf("blocked at 900 of 1000: %+v", *d)
	}

	kv := v.kv(schemas.BlocklistBucket)
	w, err := kv.Watch(context.Background(), "acme", jetstream.UpdatesOnly())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	sent := time.Now()
	v.usage("acme", "api_calls", p.Start.Add(2*time.Hour), true, 100, 50) // → 1050
	select {
	case en := <-w.Updates():
		if took := time.Since(sent); took > time.Second {
			t.Errorf("block written %s after the increment, want ≤ 1s", took)
		}
		var d schemas.Decision
		if err := json.Unmarshal(en.Value(), &d); err != nil {
			t.Fatal(err)
		}
		if d.Reason != schemas.ReasonQuotaExceeded || d.Meter != "api_calls" || d.Limit != 1000 || d.Used != 1050 ||
			!d.PeriodStart.Equal(p.Start) || !d.PeriodEnd.Equal(p.End) {
			t.Errorf("decision = %+v", d)
		}
	case <-time.After(time.Second):
		t.Fatal("no block within 1s of the increment that crossed the limit")
	}
	_, rev := v.decision("acme")

	// More usage changes Used only: the key is not rewritten.
	v.usage("acme", "api_calls", p.Start.Add(3*time.Hour), true, 10)
	v.eventually("usage 1060", 5*time.Second, func() error {
		if got := v.view("acme").Usage["api_calls"]; got != 1060 {
			return fmt.Errorf("usage %d", got)
		}
		return nil
	})
	if _, r := v.decision("acme"); r != rev {
		t.Errorf("decision rewritten for a usage change: revision %d → %d", rev, r)
	}

	// A reconcile finds what the increments said: nothing counted twice.
	if err := e.rec.reconcile(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if got := v.view("acme").Usage["api_calls"]; got != 1060 {
		t.Errorf("usage after reconcile = %d, want 1060", got)
	}

	v.eventually("100% notification", 5*time.Second, func() error {
		if n := len(v.hooks.of(NotifyUsageThreshold)); n != 2 {
			return errors.New("not yet")
		}
		return nil
	})
	got := v.hooks.of(NotifyUsageThreshold)
	for i, pct := range []int{80, 100} {
		n := got[i]
		if n.Threshold != pct || n.Tenant != "acme" || n.Meter != "api_calls" || n.Limit != 1000 ||
			!n.PeriodStart.Equal(p.Start) || !n.PeriodEnd.Equal(p.End) || n.ID == "" {
			t.Errorf("notification %d = %+v", i, n)
		}
	}
	if got[0].Used != 900 || got[1].Used != 1050 {
		t.Errorf("used in notifications = %d, %d; want 900, 1050", got[0].Used, got[1].Used)
	}

	// A restart finds both thresholds reached and both already sent.
	v.stop()
	v.start()
	time.Sleep(500 * time.Millisecond)
	if n := len(v.hooks.of(NotifyUsageThreshold)); n != 2 {
		t.Errorf("%d threshold notifications after a restart, want still 2", n)
	}
	if n := len(v.hooks.of(NotifyBillingUnpaid)) + len(v.hooks.of(NotifyAccessRestored)); n != 0 {
		t.Errorf("%d billing notifications for a quota block", n)
	}
	if c, _ := metrictest.Histogram(t, v.e.cfg.Registerer.(*prometheus.Registry), "meterd_enforcer_freshness_seconds"); c != 0 {
		t.Errorf("freshness observed %d times for a block from the seed, want 0", c)
	}
}

// Freshness is measured from the seal of the crossing usage, which the
// block carries to the gates as crossed_at.
func TestFreshnessMetric(t *testing.T) {
	v := newEnv(t)
	p := v.clock.Period(catalog.Monthly)
	v.start()
	v.usage("acme", "api_calls", p.Start, false, 1000)
	sealed := time.Now().Add(-300 * time.Millisecond).UTC()
	data, _ := json.Marshal(schemas.Committed{Tenant: "acme", Meter: "api_calls", Hour: p.Start, Value: 1000, Events: 1, SealedAt: sealed})
	if err := v.nc.Publish(schemas.CommittedSubject(schemas.Partition("acme", schemas.DefaultPartitions)), data); err != nil {
		t.Fatal(err)
	}
	d := v.waitDecision("acme", time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	if !d.CrossedAt.Equal(sealed) {
		t.Errorf("crossed_at = %s, want the seal of the crossing usage %s", d.CrossedAt, sealed)
	}
	// The writer observes the freshness once its write is acknowledged,
	// which may be just after a watcher of the bucket saw the block.
	count, sum := metrictest.Histogram(t, v.e.cfg.Registerer.(*prometheus.Registry), "meterd_enforcer_freshness_seconds")
	for deadline := time.Now().Add(time.Second); count == 0 && time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		count, sum = metrictest.Histogram(t, v.e.cfg.Registerer.(*prometheus.Registry), "meterd_enforcer_freshness_seconds")
	}
	if count != 1 || sum < 0.3 || sum > 5 {
		t.Errorf("freshness: %d observations summing to %.3f s, want 1 of 0.3 s or a little more", count, sum)
	}

	// A block for billing carries no crossing.
	v.usage("bigco", "api_calls", p.Start, true, 10)
	v.do(http.MethodPut, "/v1/tenants/bigco", adminKey, map[string]any{"status": "suspended"}, nil)
	d = v.waitDecision("bigco", time.Second, blockedFor(schemas.ReasonSuspended))
	if !d.CrossedAt.IsZero() {
		t.Errorf("a suspension has crossed_at %s, want none", d.CrossedAt)
	}
}

func TestPeriodRolloverUnblocks(t *testing.T) {
	v := newEnv(t)
	p := v.clock.Period(catalog.Daily)
	v.usage("daily", "api_calls", p.Start, false, 1000)
	v.start()
	d := v.waitDecision("daily", time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	if !d.PeriodEnd.Equal(p.End) {
		t.Fatalf("period end %s, want %s", d.PeriodEnd, p.End)
	}
	// Usage of the next day, committed early (event times may lie ahead).
	v.usage("daily", "api_calls", p.End, true, 7)
	time.Sleep(100 * time.Millisecond)

	v.clock.Advance(p.End.Sub(v.clock.Now()) + time.Second)
	v.waitDecision("daily", 3*time.Second, unblocked)
	tv := v.view("daily")
	if !tv.PeriodStart.Equal(p.End) || tv.Usage["api_calls"] != 7 {
		t.Errorf("after rollover: period %s, usage %v; want %s and 7", tv.PeriodStart, tv.Usage, p.End)
	}
	v.eventually("restored notification", 5*time.Second, func() error {
		if n := v.hooks.of(NotifyAccessRestored); len(n) != 1 || n[0].Tenant != "daily" || n[0].Reason != schemas.ReasonQuotaExceeded {
			return errors.New("not yet")
		}
		return nil
	})
}

func TestReloadKeepsCatalogOnInvalidFile(t *testing.T) {
	v := newEnv(t)
	path := filepath.Join(t.TempDir(), "meterd.yaml")
	writeFile(t, path, `
plans:
  free: {limits: {api_calls: 1000}}
tenants:
  acme: {plan: free}
`)
	v.cat = nil
	v.mutate = func(c *Config) { c.CatalogPath = path }
	p := v.clock.Period(catalog.Monthly)
	v.usage("acme", "api_calls", p.Start, false, 500)
	e := v.start()

	writeFile(t, path, `
plans:
  free: {limits: {api_calls: -1}}
tenants:
  acme: {plan: gold}
`)
	if err := e.Reload(); err == nil {
		t.Fatal("Reload of an invalid file succeeded")
	}
	if tv := v.view("acme"); tv.Plan != "free" || tv.Limits["api_calls"] != 1000 {
		t.Errorf("after a failed reload: plan %q limits %v, want free with 1000", tv.Plan, tv.Limits)
	}
	if d, _ := v.decision("acme"); d != nil {
		t.Errorf("blocked after a failed reload: %+v", *d)
	}

	// A valid file is picked up by the mtime poll, without Reload.
	writeFile(t, path, `
plans:
  free: {limits: {api_calls: 400}}
tenants:
  acme: {plan: free}
`)
	d := v.waitDecision("acme", 5*time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	if d.Limit != 400 || d.Used != 500 {
		t.Errorf("decision after reload = %+v, want limit 400 used 500", *d)
	}
}

func TestVersionsGrowAcrossRestarts(t *testing.T) {
	v := newEnv(t)
	p := v.clock.Period(catalog.Monthly)
	ctx := context.Background()

	// Before the first start the bucket does not exist; create it as the
	// enforcer does, with a stale block and a block of acme of a version
	// far ahead of the clock.
	if _, err := v.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: schemas.BlocklistBucket, History: 1, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	kv := v.kv(schemas.BlocklistBucket)
	ahead := uint64(v.clock.Now().Add(time.Hour).UnixNano())
	put := func(d schemas.Decision) {
		data, _ := json.Marshal(d)
		if _, err := kv.Put(ctx, d.Tenant, data); err != nil {
			t.Fatal(err)
		}
	}
	put(schemas.Decision{Tenant: "ghost", Reason: schemas.ReasonSuspended, Version: 5})
	put(schemas.Decision{Tenant: "acme", Reason: schemas.ReasonSuspended, Version: ahead})
	v.usage("acme", "api_calls", p.Start, false, 1000)

	v.start()
	v.waitDecision("ghost", 2*time.Second, unblocked)
	d1 := v.waitDecision("acme", 2*time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	if d1.Version != ahead+1 {
		t.Errorf("version = %d, want %d (previous + 1)", d1.Version, ahead+1)
	}
	_, rev1 := v.decision("acme")

	// A restart with the same state rewrites nothing.
	v.stop()
	v.start()
	time.Sleep(300 * time.Millisecond)
	if d, rev := v.decision("acme"); d == nil || rev != rev1 || d.Version != d1.Version {
		t.Errorf("after a restart without change: %+v rev %d, want version %d rev %d", d, rev, d1.Version, rev1)
	}

	// A restart then a new decision: the version grows again.
	v.stop()
	v.start()
	if code := v.webhook(stripeEvent("evt_1", "customer.subscription.deleted", "cus_acme", "sub_1", "canceled", v.clock.Now()), webhookSecret, v.clock.Now()); code != 200 {
		t.Fatalf("webhook: %d", code)
	}
	d2 := v.waitDecision("acme", time.Second, blockedFor(schemas.ReasonSuspended))
	if d2.Version <= d1.Version {
		t.Errorf("version after restart %d, not above %d", d2.Version, d1.Version)
	}
}

func TestHeartbeat(t *testing.T) {
	v := newEnv(t)
	v.start()
	kv := v.kv(schemas.BlocklistBucket)
	first := readHeartbeat(t, kv)
	v.eventually("next heartbeat", 2*time.Second, func() error {
		if at := readHeartbeat(t, kv); !at.After(first) {
			return errors.New("same heartbeat")
		}
		return nil
	})
}

func readHeartbeat(t *testing.T, kv jetstream.KeyValue) time.Time {
	t.Helper()
	en, err := kv.Get(context.Background(), schemas.HeartbeatKey)
	if err != nil {
		t.Fatal(err)
	}
	var hb struct{ At string }
	if err := json.Unmarshal(en.Value(), &hb); err != nil {
		t.Fatal(err)
	}
	at, err := time.Parse(time.RFC3339Nano, hb.At)
	if err != nil {
		t.Fatalf("heartbeat at %q: %v", hb.At, err)
	}
	return at
}

func TestRunStopsOnCloseAndJoinsGoroutines(t *testing.T) {
	v := newEnv(t)
	e := v.start()
	p := v.clock.Period(catalog.Monthly)
	v.usage("acme", "api_calls", p.Start, true, 900) // a notification in flight
	e.Close()
	select {
	case err := <-v.done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after Close")
	}
	e.Close() // idempotent
	v.api.Close()
	v.e = nil
	// The broker and the NATS client keep their own goroutines; none may
	// run the enforcer's code once Run returned.
	buf := make([]byte, 4<<20)
	stacks := string(buf[:runtime.Stack(buf, true)])
	for g := range strings.SplitSeq(stacks, "\n\n") {
		// Every part of the enforcer, and the catalog watch it runs.
		if strings.Contains(g, "meterd/enforcer.(*") || strings.Contains(g, "catalog.(*Watcher)") {
			t.Errorf("goroutine left running:\n%s", g)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	v := newEnv(t)
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
	}{
		{"no NATS", func(c *Config) { c.NATS = nil }},
		{"no store", func(c *Config) { c.Store = nil }},
		{"bad block-on", func(c *Config) { c.BlockOn = []string{"late"} }},
		{"bad notify URL", func(c *Config) { c.NotifyURLs = []string{"ftp://x"} }},
		{"negative tolerance", func(c *Config) { c.WebhookTolerance = -time.Second }},
		{"bad catalog file", func(c *Config) { c.Catalog = nil; c.CatalogPath = filepath.Join(t.TempDir(), "missing.yaml") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := v.config()
			tc.mutate(&cfg)
			if _, err := New(cfg); err == nil {
				t.Error("New succeeded")
			}
		})
	}
	cfg := Config{NATS: v.nc, Store: v.store}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.WebhookTolerance != DefaultWebhookTolerance || cfg.HeartbeatEvery != DefaultHeartbeatEvery ||
		cfg.ReconcileEvery != DefaultReconcileEvery || len(cfg.BlockOn) != len(DefaultBlockOn) {
		t.Errorf("defaults not applied: %+v", cfg)
	}
}
