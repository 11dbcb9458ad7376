package gate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/broker"
	"github.com/meterd/meterd/internal/tcpproxy"
	"github.com/meterd/meterd/schemas"
)

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"no NATS", Config{}},
		{"negative StaleAfter", Config{NATS: &nats.Conn{}, StaleAfter: -time.Second}},
		{"unknown policy", Config{NATS: &nats.Conn{}, StalePolicy: Deny + 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(tc.cfg); err == nil {
				t.Error("New accepted the config")
			}
		})
	}
	cfg := Config{NATS: &nats.Conn{}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.Bucket != schemas.BlocklistBucket || cfg.StaleAfter != 15*time.Second || cfg.StalePolicy != Allow {
		t.Errorf("defaults: %+v", cfg)
	}
}

// The gate is ready only once the bucket's values are in its snapshot, and
// answers with the bodies of docs/architecture.md#http-apis.
func TestInitialValuesBeforeReady(t *testing.T) {
	n := startNATS(t)
	n.createBucket()
	decisions := []schemas.Decision{
		quota("acme", 42),
		unpaid("bravo", schemas.ReasonPaymentOverdue, "https://billing.example.com/bravo?invoice=in_1&pay=1", 7),
		unpaid("charlie", schemas.ReasonSuspended, "", 3),
	}
	for _, d := range decisions {
		n.put(d)
	}
	n.heartbeat()
	reg := prometheus.NewRegistry()
	g := startGate(t, n, Config{Observer: observer(t, reg)})

	// Whenever Ready says yes, every value must already be there.
	waitFor(t, 10*time.Second, "ready", func() bool {
		if g.Ready(t.Context()) != nil {
			return false
		}
		if got := g.Snapshot(); !reflect.DeepEqual(got, decisions) {
			t.Fatalf("ready with snapshot %+v, want %+v", got, decisions)
		}
		return true
	})
	for _, d := range decisions {
		v := g.Check(d.Tenant)
		if v.Stale || v.Block == nil {
			t.Fatalf("Check(%s) = %+v, want blocked and current", d.Tenant, v)
		}
		if v.Block.Decision != d || v.Block.Status != http.StatusPaymentRequired {
			t.Errorf("Check(%s): decision %+v status %d", d.Tenant, v.Block.Decision, v.Block.Status)
		}
		if got, want := decodeProblem(t, v.Block.Problem), wantBody(d); !reflect.DeepEqual(got, want) {
			t.Errorf("Check(%s) body\n got %v\nwant %v", d.Tenant, got, want)
		}
	}
	if got := g.Check("acme").Block.Link; got != `<https://billing.example.com/acme>; rel="payment"` {
		t.Errorf("acme Link = %q", got)
	}
	if v := g.Check("unknown"); v != (Verdict{}) {
		t.Errorf("Check(unknown) = %+v, want allowed and current", v)
	}
	if g.Version() != 3 {
		t.Errorf("Version = %d, want 3", g.Version())
	}
	if metric(t, g, "updates_applied_total") != 3 || metric(t, g, "blocked_tenants") != 3 || metric(t, g, "snapshots_total") != 1 || metric(t, g, "updates_malformed_total") != 0 {
		t.Errorf("applied %v blocked %v snapshots %v malformed %v; want 3 3 1 0",
			metric(t, g, "updates_applied_total"), metric(t, g, "blocked_tenants"), metric(t, g, "snapshots_total"), metric(t, g, "updates_malformed_total"))
	}
	if s := g.staleness(); s < 0 || s > 5*time.Second {
		t.Errorf("staleness %s right after a heartbeat", s)
	}
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
}

// Puts, deletes and purges reach Check within 100 ms while Check is called
// concurrently.
func TestUpdatesReachCheck(t *testing.T) {
	n := startNATS(t)
	n.createBucket()
	n.heartbeat()
	g := startGate(t, n, Config{})
	waitReady(t, g)

	ctx, cancel := context.WithCancel(t.Context())
	var readers sync.WaitGroup
	var checks atomic.Int64
	for range 2 {
		readers.Go(func() {
			for ctx.Err() == nil {
				g.Check("acme")
				g.Check("nobody")
				checks.Add(2)
				time.Sleep(time.Microsecond) // readers race the writer, not hog the 2 cores
			}
		})
	}
	defer readers.Wait()
	defer cancel()

	const within = 100 * time.Millisecond
	steps := []struct {
		name  string
		write func()
		done  func(Verdict) bool
	}{
		{"put", func() { n.put(quota("acme", 1)) }, func(v Verdict) bool { return v.Block != nil }},
		{"newer version", func() {
			d := quota("acme", 2)
			d.Used = 1200
			n.put(d)
		}, func(v Verdict) bool { return v.Block != nil && v.Block.Decision.Used == 1200 }},
		{"delete", func() { n.del("acme", false) }, func(v Verdict) bool { return v.Block == nil }},
		{"put again", func() { n.put(unpaid("acme", schemas.ReasonPaymentOverdue, "", 3)) }, func(v Verdict) bool { return v.Block != nil }},
		{"purge", func() { n.del("acme", true) }, func(v Verdict) bool { return v.Block == nil }},
	}
	for i, s := range steps {
		start := time.Now()
		s.write()
		acked := time.Since(start)
		took := waitFor(t, time.Second, s.name, func() bool { return s.done(g.Check("acme")) })
		t.Logf("%s: acknowledged by JetStream in %s, in Check %s later", s.name, acked.Round(time.Microsecond), took.Round(time.Microsecond))
		if took > within {
			t.Errorf("%s reached Check %s after the write was acknowledged, want ≤ %s", s.name, took, within)
		}
		if g.Version() != uint64(i+1) {
			t.Errorf("after %s Version = %d, want %d", s.name, g.Version(), i+1)
		}
	}
	if checks.Load() == 0 {
		t.Error("no concurrent Check ran")
	}
}

// A decision older than the one held is ignored, live and on a reload.
func TestOlderVersionIgnored(t *testing.T) {
	n := startNATS(t)
	n.createBucket()
	// Without heartbeats the watch reloads every 2×StaleAfter (silentAfter),
	// replaying what the bucket holds.
	g := startGate(t, n, Config{StaleAfter: 250 * time.Millisecond})
	waitReady(t, g)

	n.put(quota("acme", 5))
	waitFor(t, 5*time.Second, "v5", func() bool { return g.Check("acme").Block != nil })
	old := unpaid("acme", schemas.ReasonPaymentOverdue, "", 3)
	n.put(old)
	waitFor(t, 5*time.Second, "v3 ignored", func() bool { return metric(t, g, "updates_ignored_total") == 1 })
	if d := g.Check("acme").Block.Decision; d.Version != 5 || d.Reason != schemas.ReasonQuotaExceeded {
		t.Errorf("after v3 the gate holds %+v, want v5", d)
	}

	// The bucket now holds v3; a gate that saw v5 keeps it through reloads.
	waitFor(t, 5*time.Second, "v3 ignored on a reload", func() bool { return metric(t, g, "updates_ignored_total") >= 2 })
	if d := g.Check("acme").Block.Decision; d.Version != 5 {
		t.Errorf("after a reload replaying v3 the gate holds v%d", d.Version)
	}
	if g.Version() != 1 || metric(t, g, "updates_applied_total") != 1 {
		t.Errorf("after reloads Version %d applied %v, want 1 1", g.Version(), metric(t, g, "updates_applied_total"))
	}

	// The same decision again changes nothing.
	n.put(quota("acme", 5))
	n.put(quota("bravo", 1))
	waitFor(t, 5*time.Second, "bravo", func() bool { return g.Check("bravo").Block != nil })
	if g.Version() != 2 {
		t.Errorf("Version = %d, want 2 (acme v5 twice counts once)", g.Version())
	}

	n.put(quota("acme", 6))
	waitFor(t, 5*time.Second, "v6", func() bool { return g.Check("acme").Block.Decision.Version == 6 })
}

// Malformed values are counted and ignored: they neither unblock a blocked
// tenant, nor block anyone, nor stop the gate.
func TestMalformedIgnored(t *testing.T) {
	n := startNATS(t)
	n.createBucket()
	n.put(quota("acme", 1))
	n.heartbeat()
	g := startGate(t, n, Config{})
	waitReady(t, g)

	bad := []struct{ key, value string }{
		{"acme", "not json"},
		{"acme", `{"tenant":"acme","reason":"over_the_moon","version":9}`},
		{"acme", `{"tenant":"bravo","reason":"suspended","version":9}`},
		{"bravo", `{"tenant":"bravo","reason":"payment_overdue","billing_url":"javascript:alert(1)","version":1}`},
		{"bravo", `{}`},
		{"x=y", `{"tenant":"x=y","reason":"suspended","version":1}`},
	}
	// One at a time: a watch that resets under load resumes with the last
	// value of each key, so a burst of values of one key may be seen only in
	// part; each value waited for is the last of its key while it is read.
	for i, b := range bad {
		n.putRaw(b.key, []byte(b.value))
		waitFor(t, 5*time.Second, "malformed counted: "+b.value, func() bool { return metric(t, g, "updates_malformed_total") == float64(i+1) })
	}
	if v := g.Check("acme"); v.Block == nil || v.Block.Decision != quota("acme", 1) {
		t.Errorf("acme after malformed values: %+v", v)
	}
	for _, tenant := range []string{"bravo", "x=y"} {
		if v := g.Check(tenant); v.Block != nil {
			t.Errorf("%s blocked by a malformed value: %+v", tenant, v.Block.Decision)
		}
	}
	if g.Version() != 1 || metric(t, g, "updates_applied_total") != 1 {
		t.Errorf("Version %d applied %v, want 1 1", g.Version(), metric(t, g, "updates_applied_total"))
	}
	n.put(quota("bravo", 1))
	waitFor(t, 5*time.Second, "a good value after bad ones", func() bool { return g.Check("bravo").Block != nil })
}

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// With nothing received for StaleAfter, verdicts turn stale: Deny blocks
// tenants without a decision with the stale block, Allow lets them through,
// blocked tenants stay blocked; a heartbeat makes the gate current again.
func TestStaleness(t *testing.T) {
	n := startNATS(t)
	n.createBucket()
	n.put(quota("acme", 1))
	clock := &fakeClock{now: time.Now()}
	const staleAfter = time.Second
	allow := startGate(t, n, Config{StaleAfter: staleAfter, StalePolicy: Allow, Now: clock.Now})
	deny := startGate(t, n, Config{StaleAfter: staleAfter, StalePolicy: Deny, Now: clock.Now})
	for _, g := range []*Gate{allow, deny} {
		waitReady(t, g)
		waitFor(t, time.Second, "current", func() bool { return !g.Check("nobody").Stale })
		if v := g.Check("nobody"); v.Block != nil {
			t.Errorf("current gate blocks nobody: %+v", v)
		}
	}

	clock.Add(staleAfter / 2)
	time.Sleep(50 * time.Millisecond) // several clock ticks
	if allow.Check("nobody").Stale || deny.Check("nobody").Stale {
		t.Fatal("stale before StaleAfter")
	}
	clock.Add(staleAfter/2 + 10*time.Millisecond)
	for _, g := range []*Gate{allow, deny} {
		waitFor(t, time.Second, "stale", func() bool { return g.Check("nobody").Stale })
		if v := g.Check("acme"); !v.Stale || v.Block == nil || v.Block.Decision.Tenant != "acme" {
			t.Errorf("stale Check(acme) = %+v, want acme's own block", v)
		}
		if s := g.staleness(); s < staleAfter {
			t.Errorf("staleness %s, want > %s", s, staleAfter)
		}
	}
	if v := allow.Check("nobody"); v.Block != nil {
		t.Errorf("Allow: stale Check(nobody) blocks: %+v", v.Block.Decision)
	}
	v := deny.Check("nobody")
	if v.Block == nil || v.Block.Status != http.StatusServiceUnavailable || v.Block.Decision.Reason != ReasonStale {
		t.Fatalf("Deny: stale Check(nobody) = %+v, want the stale block", v)
	}
	if p := decodeProblem(t, v.Block.Problem); p["reason"] != "stale" || p["status"] != json.Number("503") {
		t.Errorf("stale body %s", v.Block.Problem)
	}
	if deny.Check("someone-else").Block != v.Block {
		t.Error("the stale block is not shared")
	}

	n.heartbeat()
	for _, g := range []*Gate{allow, deny} {
		waitFor(t, 5*time.Second, "current after a heartbeat", func() bool { return !g.Check("nobody").Stale })
		if v := g.Check("nobody"); v.Block != nil {
			t.Errorf("current again, still blocks nobody: %+v", v.Block.Decision)
		}
	}
}

// A gate that loads a heartbeat written long ago is stale at once: replayed
// values count from when they were written.
func TestOldHeartbeatIsStale(t *testing.T) {
	n := startNATS(t)
	n.createBucket()
	n.heartbeat()
	clock := &fakeClock{now: time.Now().Add(time.Hour)}
	g := startGate(t, n, Config{StaleAfter: time.Minute, StalePolicy: Deny, Now: clock.Now})
	waitReady(t, g)
	if v := g.Check("nobody"); !v.Stale || v.Block != g.staleBlock {
		t.Errorf("Check after loading an hour-old heartbeat = %+v, want stale and denied", v)
	}
	n.heartbeat()
	waitFor(t, 5*time.Second, "current after a live heartbeat", func() bool { return !g.Check("nobody").Stale })
}

// The gate answers from its snapshot while NATS is down, and catches up
// after NATS comes back on the same port and store.
func TestNATSRestart(t *testing.T) {
	n := startNATS(t)
	n.createBucket()
	n.put(quota("acme", 1))
	n.put(quota("bravo", 1))
	n.heartbeat()
	g := startGate(t, n, Config{StaleAfter: time.Minute})
	waitReady(t, g)
	version := g.Version()

	n.Stop()
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		if v := g.Check("acme"); v.Block == nil || v.Stale {
			t.Fatalf("during the outage Check(acme) = %+v, want blocked from the snapshot", v)
		}
		if g.Ready(t.Context()) != nil {
			t.Fatal("not ready during the outage")
		}
		time.Sleep(10 * time.Millisecond)
	}

	n.Start()
	start := time.Now()
	n.put(quota("charlie", 1))
	n.del("acme", false)
	waitFor(t, 20*time.Second, "resync", func() bool {
		return g.Check("charlie").Block != nil && g.Check("acme").Block == nil
	})
	t.Logf("caught up %s after the restart", time.Since(start).Round(time.Millisecond))
	if v := g.Check("bravo"); v.Block == nil {
		t.Error("bravo lost across the restart")
	}
	if g.Version() != version+2 {
		t.Errorf("Version = %d, want %d", g.Version(), version+2)
	}
}

// A reload makes the snapshot exactly what the bucket holds: a tenant
// deleted while the gate heard nothing, its delete marker purged since, is
// unblocked on the reload that follows the reconnect.
func TestReloadDropsTenantsGoneFromBucket(t *testing.T) {
	n := startNATS(t)
	n.createBucket()
	n.put(quota("acme", 1))
	n.put(quota("bravo", 1))
	n.heartbeat()
	proxy, err := tcpproxy.New(n.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	nc, err := broker.Connect(broker.ConnConfig{URL: "nats://" + proxy.Addr(), Name: "gate", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	g := startGate(t, n, Config{NATS: nc})
	waitReady(t, g)
	version := g.Version()

	proxy.SetBlackholeServerToClient(true)
	n.del("acme", false)
	n.retry("purge delete markers", func(ctx context.Context) error {
		return n.kv.PurgeDeletes(ctx, jetstream.DeleteMarkersOlderThan(-1))
	})
	time.Sleep(100 * time.Millisecond)
	if g.Check("acme").Block == nil {
		t.Fatal("the gate heard of the delete through the blackhole")
	}
	proxy.SetBlackholeServerToClient(false)
	if err := nc.ForceReconnect(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "acme unblocked by the reload", func() bool { return g.Check("acme").Block == nil })
	if g.Check("bravo").Block == nil {
		t.Error("bravo lost in the reload")
	}
	if g.Version() != version+1 {
		t.Errorf("Version = %d, want %d", g.Version(), version+1)
	}
}

// The gate does not create the bucket: it waits until the enforcer has.
func TestWaitsForBucket(t *testing.T) {
	n := startNATS(t)
	g := startGate(t, n, Config{})
	time.Sleep(300 * time.Millisecond)
	err := g.Ready(t.Context())
	if !errors.Is(err, ErrNotReady) || !errors.Is(err, jetstream.ErrBucketNotFound) {
		t.Fatalf("Ready without a bucket = %v, want ErrNotReady and ErrBucketNotFound", err)
	}
	if v := g.Check("acme"); !v.Stale || v.Block != nil {
		t.Errorf("Check before loading = %+v, want stale (and allowed by default)", v)
	}
	n.createBucket()
	n.put(quota("acme", 1))
	waitReady(t, g)
	if g.Check("acme").Block == nil {
		t.Error("acme not blocked")
	}
	if _, err := n.js.KeyValue(t.Context(), schemas.BlocklistBucket); err != nil {
		t.Fatal(err)
	}
}

// A burst of 10k decisions is applied in far fewer than 10k snapshots, and
// a gate starting on 10k decisions loads them in one.
func TestBurst(t *testing.T) {
	const tenants = 10_000
	n := startNATS(t)
	n.createBucket()
	n.heartbeat()
	g := startGate(t, n, Config{})
	waitReady(t, g)

	start := time.Now()
	publishDecisions(t, n, tenants)
	published := time.Since(start)
	waitFor(t, 60*time.Second, "10k decisions applied", func() bool { return g.Version() == tenants })
	snapshots := metric(t, g, "snapshots_total")
	t.Logf("10k decisions published in %s, applied %s later, in %v snapshots",
		published.Round(time.Millisecond), (time.Since(start) - published).Round(time.Millisecond), snapshots)
	if got := len(g.Snapshot()); got != tenants {
		t.Errorf("snapshot holds %d decisions", got)
	}
	if metric(t, g, "blocked_tenants") != tenants || metric(t, g, "updates_applied_total") != tenants {
		t.Errorf("blocked %v applied %v", metric(t, g, "blocked_tenants"), metric(t, g, "updates_applied_total"))
	}
	if snapshots >= tenants/2 {
		t.Errorf("%v snapshots for %d updates: bursts are not applied together", snapshots, tenants)
	}

	late := startGate(t, n, Config{})
	t.Logf("a gate started on 10k decisions was ready in %s", waitFor(t, time.Minute, "late gate ready", func() bool { return late.Ready(t.Context()) == nil }))
	if late.Version() != tenants || metric(t, late, "snapshots_total") != 1 {
		t.Errorf("late gate: Version %d in %v snapshots, want %d in 1", late.Version(), metric(t, late, "snapshots_total"), tenants)
	}
	if !reflect.DeepEqual(late.Snapshot(), g.Snapshot()) {
		t.Error("the late gate's snapshot differs")
	}
}

// publishDecisions writes quota decisions for tenant-00000… as fast as
// JetStream takes them.
func publishDecisions(t testing.TB, n *testNATS, tenants int) {
	t.Helper()
	for i := range tenants {
		d := quota(fmt.Sprintf("tenant-%05d", i), 1)
		if _, err := n.js.PublishAsync("$KV."+schemas.BlocklistBucket+"."+d.Tenant, mustJSON(t, d)); err != nil {
			t.Fatal(err)
		}
		if (i+1)%1000 == 0 || i == tenants-1 { // stay under the client's pending limit
			select {
			case <-n.js.PublishAsyncComplete():
			case <-time.After(30 * time.Second):
				t.Fatal("publishes not acknowledged within 30s")
			}
		}
	}
}

// Run returns an error once its connection is closed for good, and the
// gate is stale from then on; a second Run is refused.
func TestRunEnds(t *testing.T) {
	n := startNATS(t)
	n.createBucket()
	n.heartbeat()
	g, run := newGate(t, n, Config{})
	done := make(chan error, 1)
	go func() { done <- run(t.Context()) }()
	waitReady(t, g)
	if err := g.Run(t.Context()); err == nil {
		t.Error("a second Run was accepted")
	}
	if g.Check("nobody").Stale {
		t.Fatal("stale while running")
	}
	g.cfg.NATS.Close()
	select {
	case err := <-done:
		if !errors.Is(err, nats.ErrConnectionClosed) {
			t.Errorf("Run = %v, want ErrConnectionClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after the connection closed")
	}
	if !g.Check("nobody").Stale {
		t.Error("not stale after Run returned")
	}
}
