package enforcer

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/lease"
	"github.com/meterd/meterd/schemas"
)

// freezableLease is the real lease whose renewals can be held up: a frozen
// replica stops renewing (as under SIGSTOP, a long GC pause or a suspended
// VM) and, thawed, renews late.
type freezableLease struct {
	*lease.Lease
	mu   sync.Mutex
	thaw chan struct{} // nil while not frozen
}

func (l *freezableLease) freeze() {
	l.mu.Lock()
	l.thaw = make(chan struct{})
	l.mu.Unlock()
}

func (l *freezableLease) unfreeze() {
	l.mu.Lock()
	close(l.thaw)
	l.thaw = nil
	l.mu.Unlock()
}

func (l *freezableLease) Renew(ctx context.Context) (time.Time, error) {
	l.mu.Lock()
	thaw := l.thaw
	l.mu.Unlock()
	if thaw != nil {
		select {
		case <-thaw:
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
	return l.Lease.Renew(ctx)
}

// replica is one of several enforcers on the env's NATS and store, each
// with its own connection, lease, metrics and API.
type replica struct {
	name   string
	e      *Enforcer
	lease  *freezableLease
	api    *httptest.Server
	cancel context.CancelFunc
	done   chan error
}

// replica starts an enforcer replica with a lease of duration d (0: the
// default) and waits until it is ready.
func (v *env) replica(name string, d time.Duration) *replica {
	v.t.Helper()
	nc := v.ns.Connect("enforcer " + name)
	js, err := jetstream.New(nc)
	if err != nil {
		v.t.Fatal(err)
	}
	cfg := v.config()
	cfg.NATS = nc
	cfg.Logger = cfg.Logger.With("replica", name)
	l, err := lease.New(context.Background(), lease.Config{JS: js, Key: LeaseKey, Holder: name,
		Duration: cmpOr(d, DefaultLeaseDuration), Logger: cfg.Logger})
	if err != nil {
		v.t.Fatal(err)
	}
	r := &replica{name: name, lease: &freezableLease{Lease: l}, done: make(chan error, 1)}
	cfg.Lease = r.lease
	if r.e, err = New(cfg); err != nil {
		v.t.Fatal(err)
	}
	r.e.notify.newBackOff = fastBackOff
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() { r.done <- r.e.Run(ctx) }()
	mux := http.NewServeMux()
	r.e.Register(mux)
	r.api = httptest.NewServer(mux)
	v.t.Cleanup(func() { r.stop(v.t) })
	v.eventually(name+" ready", 10*time.Second, func() error { return r.e.Ready(context.Background()) })
	return r
}

func cmpOr(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// stop stops the replica as SIGTERM does (the lease is released).
func (r *replica) stop(t *testing.T) {
	if r.cancel == nil {
		return
	}
	r.api.Close()
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("%s: Run: %v", r.name, err)
		}
	case <-time.After(10 * time.Second):
		t.Errorf("%s: Run did not return 10s after cancellation", r.name)
	}
	r.cancel = nil
}

// active reads the replica's meterd_enforcer_active_leases.
func (r *replica) active() float64 { return value(r.e.m.active) }

// value reads a gauge or a counter.
func value(c prometheus.Metric) float64 {
	var m dto.Metric
	if c.Write(&m) != nil {
		return -1
	}
	return m.GetGauge().GetValue() + m.GetCounter().GetValue()
}

// blocklist is the replica's GET /v1/blocklist.
func (v *env) blocklistOf(r *replica) BlocklistView {
	v.t.Helper()
	req, _ := http.NewRequest(http.MethodGet, r.api.URL+"/v1/blocklist", nil)
	req.Header.Set("Authorization", "Bearer "+adminKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		v.t.Fatal(err)
	}
	defer resp.Body.Close()
	var bl BlocklistView
	if err := json.NewDecoder(resp.Body).Decode(&bl); err != nil {
		v.t.Fatal(err)
	}
	return bl
}

// heartbeatRev is the revision of the heartbeat key.
func (v *env) heartbeatRev() uint64 {
	v.t.Helper()
	en, err := v.kv(schemas.BlocklistBucket).Get(context.Background(), schemas.HeartbeatKey)
	if err != nil {
		v.t.Fatal(err)
	}
	return en.Revision()
}

// waitActive waits until r's meterd_enforcer_active_leases is want.
func (v *env) waitActive(r *replica, want float64, within time.Duration) {
	v.t.Helper()
	v.eventually(fmt.Sprintf("%s active = %v", r.name, want), within, func() error {
		if got := r.active(); got != want {
			return fmt.Errorf("active = %v", got)
		}
		return nil
	})
}

// waitHeartbeat waits until the heartbeat key moves past revision hb.
func (v *env) waitHeartbeat(hb uint64, within time.Duration) {
	v.t.Helper()
	v.eventually("a heartbeat after revision "+fmt.Sprint(hb), within, func() error {
		if v.heartbeatRev() == hb {
			return errors.New("heartbeat not rewritten")
		}
		return nil
	})
}

// notified counts the notifications published on NATS, by id.
type notified struct {
	mu  sync.Mutex
	ids map[string]int
}

func (v *env) countNotifications() *notified {
	n := &notified{ids: map[string]int{}}
	sub, err := v.nc.Subscribe(schemas.NotifySubject("*"), func(m *nats.Msg) {
		var x Notification
		if json.Unmarshal(m.Data, &x) == nil {
			n.mu.Lock()
			n.ids[x.ID]++
			n.mu.Unlock()
		}
	})
	if err != nil {
		v.t.Fatal(err)
	}
	v.t.Cleanup(func() { sub.Unsubscribe() })
	return n
}

func (n *notified) count(id string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ids[id]
}

// hookCount counts the notifications of id the URL received.
func (v *env) hookCount(id string) int {
	c := 0
	for _, x := range v.hooks.of(NotifyUsageThreshold) {
		if x.ID == id {
			c++
		}
	}
	return c
}

// Two enforcers on one NATS: one is active, the other stands by, ready and
// serving the blocklist it follows. Frozen (it stops renewing), the active
// one is replaced within the lease and two polls; the decisions keep their
// revisions (no flap), heartbeats go on, a tenant crossing 100 % while no
// replica may write is notified exactly once (by the new active replica),
// and the thawed replica stands by. Stopped cleanly, the active one is
// replaced at the next poll.
func TestReplicasFailover(t *testing.T) {
	v := newEnv(t)
	notes := v.countNotifications()
	const d = 2 * time.Second
	a := v.replica("a", d)
	v.waitActive(a, 1, 5*time.Second)
	b := v.replica("b", d)
	if a.active()+b.active() != 1 || b.active() != 0 {
		t.Fatalf("active: a %v, b %v; want a alone", a.active(), b.active())
	}

	// acme reaches its limit while a is active: blocked, notified at 80 %
	// and 100 %; b follows the block.
	period := v.clock.Period(catalog.Monthly)
	v.usage("acme", "api_calls", time.Now(), true, 1000)
	blockedAcme := v.waitDecision("acme", 5*time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	_, acmeRev := v.decision("acme")
	v.eventually("b follows the blocklist", 5*time.Second, func() error {
		if bl := v.blocklistOf(b); len(bl.Decisions) != 1 || bl.Decisions[0].Version != blockedAcme.Version {
			return fmt.Errorf("b's blocklist %+v", bl)
		}
		// b's blocked-tenants gauge follows the bucket too.
		if n := value(b.e.m.blocked.WithLabelValues(string(schemas.ReasonQuotaExceeded))); n != 1 {
			return fmt.Errorf("b's gauge of tenants blocked over quota: %v, want 1", n)
		}
		return nil
	})
	// daily passes 80 % while a is active.
	day := v.clock.Period(catalog.Daily)
	v.usage("daily", "api_calls", time.Now(), true, 850)
	daily80 := thresholdID("daily", "api_calls", day.Start, WarnPercent)
	daily100 := thresholdID("daily", "api_calls", day.Start, 100)
	v.eventually("daily's 80 % notification", 5*time.Second, func() error {
		if v.hookCount(daily80) != 1 {
			return errors.New("not received")
		}
		return nil
	})

	// a freezes: its lease runs out before b may take it over, and while
	// neither may write daily crosses 100 %.
	frozenAt := time.Now()
	a.lease.freeze()
	v.eventually("a stops writing", d, func() error {
		if a.e.writer.isActive() {
			return errors.New("a still writes")
		}
		return nil
	})
	v.usage("daily", "api_calls", time.Now(), true, 150)
	v.waitActive(b, 1, 2*d)
	failover := time.Since(frozenAt)
	t.Logf("failover after a freeze: %s (lease %s)", failover.Round(time.Millisecond), d)
	if bound := d + 2*(d/10) + 500*time.Millisecond; failover > bound {
		t.Errorf("failover took %s, want at most %s", failover, bound)
	}
	v.waitDecision("daily", 5*time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	if got, rev := v.decision("acme"); rev != acmeRev || got.Version != blockedAcme.Version {
		t.Errorf("acme's decision was rewritten by the takeover: revision %d → %d, version %d → %d", acmeRev, rev, blockedAcme.Version, got.Version)
	}
	hb := v.heartbeatRev()
	v.waitHeartbeat(hb, 2*time.Second)

	// Thawed, a finds its lease taken and stands by.
	a.lease.unfreeze()
	v.waitActive(a, 0, 5*time.Second)
	if b.active() != 1 {
		t.Fatalf("b active %v after a thawed", b.active())
	}
	if n := value(a.e.m.leaseLost); n != 1 {
		t.Errorf("a's meterd_enforcer_lease_lost_total = %v, want 1", n)
	}
	// Ready once its lease bucket answers again: the freeze stopped its
	// reads of the bucket too.
	v.eventually("a standing by is ready", 5*time.Second, func() error { return a.e.Ready(context.Background()) })

	// b stops cleanly: a takes over at its next poll, and keeps the
	// decisions.
	_, dailyRev := v.decision("daily")
	stoppedAt := time.Now()
	b.e.Close()
	select {
	case err := <-b.done:
		if err != nil {
			t.Errorf("b: Run: %v", err)
		}
		b.cancel()
		b.cancel = nil
		b.api.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("b's Run did not return 5s after Close")
	}
	v.waitActive(a, 1, 2*time.Second)
	t.Logf("failover after a clean stop: %s", time.Since(stoppedAt).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond) // room for a flap or a second notification
	if _, rev := v.decision("acme"); rev != acmeRev {
		t.Errorf("acme's decision rewritten by the second takeover: revision %d → %d", acmeRev, rev)
	}
	if _, rev := v.decision("daily"); rev != dailyRev {
		t.Errorf("daily's decision rewritten by the second takeover: revision %d → %d", dailyRev, rev)
	}

	// Every threshold was notified exactly once, on NATS and to the URL,
	// across two takeovers.
	for _, id := range []string{
		thresholdID("acme", "api_calls", period.Start, WarnPercent), thresholdID("acme", "api_calls", period.Start, 100),
		daily80, daily100,
	} {
		if n, h := notes.count(id), v.hookCount(id); n != 1 || h != 1 {
			t.Errorf("notification %s: %d on NATS, %d to the URL; want 1 and 1", id, n, h)
		}
	}
}

// With the default lease, a frozen active replica is replaced within 10 s,
// and the blocklist heartbeat lapses for less than the gates' default
// staleness bound (15 s: gate.DefaultStaleAfter).
func TestReplicasDefaultLeaseFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("waits a default lease (6 s)")
	}
	v := newEnv(t)
	v.mutate = func(c *Config) { c.HeartbeatEvery = DefaultHeartbeatEvery }
	a := v.replica("a", 0)
	v.waitActive(a, 1, 5*time.Second)
	b := v.replica("b", 0)
	hb := v.heartbeatRev()
	v.waitHeartbeat(hb, 2*DefaultHeartbeatEvery)
	// Frozen right after a heartbeat: the worst case for the gates.
	lastBeat := time.Now()
	a.lease.freeze()
	hb = v.heartbeatRev()
	v.waitHeartbeat(hb, 15*time.Second)
	gap := time.Since(lastBeat)
	t.Logf("failover after a freeze with the default lease: heartbeat gap %s", gap.Round(time.Millisecond))
	if b.active() != 1 {
		t.Fatalf("b active %v", b.active())
	}
	if gap > 10*time.Second {
		t.Errorf("the heartbeat lapsed for %s, want a takeover within 10 s", gap)
	}
	a.lease.unfreeze()
}

// A zombie whose clock still tells it its lease is safe (frozen between its
// check and its write) is refused by the bucket: the new active replica
// wrote since the zombie's last write.
func TestReplicasZombieWriteRefused(t *testing.T) {
	v := newEnv(t)
	const d = time.Second
	a := v.replica("a", d)
	v.waitActive(a, 1, 5*time.Second)
	b := v.replica("b", d)
	a.lease.freeze()
	v.waitActive(b, 1, 3*d)
	hb := v.heartbeatRev()
	v.waitHeartbeat(hb, time.Second)

	// a wakes thinking it is active with time left.
	a.e.writer.mu.Lock()
	a.e.writer.active, a.e.writer.until = true, time.Now().Add(time.Hour)
	a.e.writer.mu.Unlock()
	data, _ := json.Marshal(schemas.Decision{Tenant: "bigco", Reason: schemas.ReasonSuspended, Version: 1})
	err := a.e.writer.put(context.Background(), "bigco", data)
	if !errors.Is(err, ErrNotActive) || !errors.Is(err, errFenced) {
		t.Fatalf("zombie write: %v, want refused as fenced", err)
	}
	if got, _ := v.decision("bigco"); got != nil {
		t.Fatalf("the zombie's decision reached the bucket: %+v", got)
	}
	if a.e.writer.isActive() {
		t.Error("the refused zombie still counts itself active")
	}
	a.lease.unfreeze()
	v.waitActive(a, 0, 5*time.Second)
	if b.active() != 1 {
		t.Errorf("b active %v, want 1", b.active())
	}
	// A billing webhook the standby receives is stored; the active
	// replica decides it.
	body := stripeEvent("evt_f", "invoice.payment_failed", "cus_acme", "in_1", "", v.clock.Now())
	req, _ := http.NewRequest(http.MethodPost, a.api.URL+"/v1/billing/webhook", bytes.NewReader(body))
	req.Header.Set(StripeSignatureHeader, Sign(body, webhookSecret, time.Now()))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("webhook to the standby: %d", resp.StatusCode)
	}
	v.waitDecision("acme", 5*time.Second, blockedFor(schemas.ReasonPaymentOverdue))
}

// A write into the blocklist by anyone but the active replica (a zombie's
// that slipped in before the new replica's first write) fails the active
// replica's next write: it gives the lease up, takes over again, reads the
// bucket again and corrects the foreign decision.
func TestReplicasForeignWriteCorrected(t *testing.T) {
	v := newEnv(t)
	a := v.replica("a", time.Second)
	v.waitActive(a, 1, 5*time.Second)
	data, _ := json.Marshal(schemas.Decision{Tenant: "bigco", Reason: schemas.ReasonSuspended, Version: 1})
	if _, err := v.kv(schemas.BlocklistBucket).Put(context.Background(), "bigco", data); err != nil {
		t.Fatal(err)
	}
	v.eventually("a fenced", 5*time.Second, func() error {
		if n := value(a.e.m.leaseLost); n != 1 {
			return fmt.Errorf("lease lost %v times", n)
		}
		return nil
	})
	v.waitDecision("bigco", 5*time.Second, unblocked)
	v.waitActive(a, 1, 5*time.Second)
	// The first heartbeat of the new term may be a few ms away.
	v.eventually("a ready", time.Second, func() error { return a.e.Ready(context.Background()) })
}

// The fenced writer refuses the keys JetStream's key-value store refuses,
// as the plain one does: a tenant name valid for schemas but not as a key
// is reported, not retried.
func TestBlocklistKeyValid(t *testing.T) {
	for key, want := range map[string]bool{
		"acme": true, "a-b_c/d=e.f": true, schemas.HeartbeatKey: true, "A9": true,
		"": false, ".acme": false, "acme.": false, "a..b": false, "a b": false, "a*b": false, "a>b": false, "ü": false,
	} {
		if got := validKey("$KV." + schemas.BlocklistBucket + "." + key); got != want {
			t.Errorf("validKey(%q) = %v, want %v", key, got, want)
		}
	}
}

// Increments are published at most once, so a standby may miss one the
// active replica counted. Taking over, it reads usage from the store before
// it decides: the block the missed increment caused stays as written,
// instead of being lifted until the next reconcile.
func TestReplicasTakeoverMissedIncrement(t *testing.T) {
	v := newEnv(t)
	const d = time.Second
	a := v.replica("a", d)
	v.waitActive(a, 1, 5*time.Second)
	b := v.replica("b", d)
	// Committed to the store; the increment reaches a alone.
	b0 := &schemas.Batch{ID: "missed", Collector: "test", SealedAt: time.Now(),
		Events: []schemas.Event{{ID: "m1", Tenant: "acme", Meter: "api_calls", Value: 1000, Time: time.Now()}}}
	incs, err := v.store.Apply(context.Background(), []*schemas.Batch{b0})
	if err != nil || len(incs) != 1 {
		t.Fatalf("apply: %v %v", incs, err)
	}
	data, _ := json.Marshal(schemas.Committed{Tenant: "acme", Meter: "api_calls", Hour: incs[0].Hour, Value: incs[0].Value, Events: incs[0].Events})
	a.e.track.onCommitted(&nats.Msg{Subject: schemas.CommittedSubject(0), Data: data})
	v.waitDecision("acme", 5*time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	_, rev := v.decision("acme")
	if _, _, used := b.e.track.usageOf("acme"); used["api_calls"] != 0 {
		t.Fatalf("b counted %d api_calls, want 0: it must have missed the increment", used["api_calls"])
	}

	a.lease.freeze()
	defer a.lease.unfreeze()
	v.waitActive(b, 1, 3*d)
	hb := v.heartbeatRev()
	v.waitHeartbeat(hb, time.Second)
	time.Sleep(300 * time.Millisecond) // room for a flap
	if got, r := v.decision("acme"); got == nil || r != rev {
		t.Errorf("acme after the takeover: %+v at revision %d, want the block at revision %d", got, r, rev)
	}
	if _, _, used := b.e.track.usageOf("acme"); used["api_calls"] != 1000 {
		t.Errorf("b's usage of acme after the takeover: %d, want 1000 from the store", used["api_calls"])
	}
}
