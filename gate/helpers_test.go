package gate

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/gate/gateprom"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// testNATS is the shared restartable JetStream of internal/jstest and the
// test's own connection to it, which plays the enforcer.
type testNATS struct {
	*jstest.Server
	t  testing.TB
	js jetstream.JetStream
	kv jetstream.KeyValue // nil until createBucket
}

// startNATS starts a server on a free port; it stops at the end of the test.
func startNATS(t testing.TB) *testNATS {
	t.Helper()
	// The tests are not about durability: skip the fsync per write.
	s := jstest.Start(t, jstest.Config{NoSync: true})
	return &testNATS{Server: s, t: t, js: s.JetStream()}
}

// createBucket creates the blocklist bucket the way the enforcer does.
func (n *testNATS) createBucket() {
	n.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := n.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:  schemas.BlocklistBucket,
		Storage: jetstream.FileStorage,
	})
	if err != nil {
		n.t.Fatal(err)
	}
	n.kv = kv
}

// put writes d under its tenant's key.
func (n *testNATS) put(d schemas.Decision) {
	n.t.Helper()
	v, err := json.Marshal(d)
	if err != nil {
		n.t.Fatal(err)
	}
	n.putRaw(d.Tenant, v)
}

// putRaw writes value under key, retrying while NATS is away.
func (n *testNATS) putRaw(key string, value []byte) {
	n.t.Helper()
	n.retry("put "+key, func(ctx context.Context) error {
		_, err := n.kv.Put(ctx, key, value)
		return err
	})
}

// heartbeat writes the enforcer's heartbeat.
func (n *testNATS) heartbeat() {
	n.t.Helper()
	n.putRaw(schemas.HeartbeatKey, fmt.Appendf(nil, `{"at":%q}`, time.Now().UTC().Format(time.RFC3339Nano)))
}

// del deletes key (purge: true purges it).
func (n *testNATS) del(key string, purge bool) {
	n.t.Helper()
	n.retry("delete "+key, func(ctx context.Context) error {
		if purge {
			return n.kv.Purge(ctx, key)
		}
		return n.kv.Delete(ctx, key)
	})
}

func (n *testNATS) retry(what string, f func(ctx context.Context) error) {
	n.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := f(ctx)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startGate builds a gate on its own connection and runs it until the end
// of the test, when Run must return nil.
func startGate(t testing.TB, n *testNATS, cfg Config) *Gate {
	t.Helper()
	g, run := newGate(t, n, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return 10s after its context ended")
		}
	})
	return g
}

// newGate builds a gate without running it, on its own connection unless
// cfg has one.
func newGate(t testing.TB, n *testNATS, cfg Config) (*Gate, func(context.Context) error) {
	t.Helper()
	if cfg.NATS == nil {
		cfg.NATS = n.Connect("gate")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if cfg.Observer == nil {
		cfg.Observer = observer(t, prometheus.NewRegistry())
	}
	g, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return g, g.Run
}

// waitReady waits until the gate loaded the bucket.
func waitReady(t testing.TB, g *Gate) {
	t.Helper()
	waitFor(t, 30*time.Second, "gate ready", func() bool { return g.Ready(context.Background()) == nil })
}

// waitFor polls cond until it holds and returns how long that took.
func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > within {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(200 * time.Microsecond)
	}
	return time.Since(start)
}

// registries maps each Prometheus observer built by observer to the
// registry it registered on, so that metric finds a gate's metrics.
var registries sync.Map // *gateprom.Observer → *prometheus.Registry

// observer returns a Prometheus observer registered on reg.
func observer(t testing.TB, reg *prometheus.Registry) *gateprom.Observer {
	t.Helper()
	o, err := gateprom.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	registries.Store(o, reg)
	return o
}

// metric reads the counter or gauge meterd_gate_<name> of g, a gate built
// by newGate.
func metric(t testing.TB, g *Gate, name string) float64 {
	t.Helper()
	o, ok := g.obs.(*gateprom.Observer)
	if !ok {
		t.Fatalf("gate observer %T, want *gateprom.Observer", g.obs)
	}
	reg, ok := registries.Load(o)
	if !ok {
		t.Fatal("gate observer not built by observer()")
	}
	return metrictest.Value(t, reg.(*prometheus.Registry), "meterd_gate_"+name)
}

// decodeProblem decodes a problem body keeping numbers exact.
func decodeProblem(t testing.TB, body []byte) map[string]any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("decode problem %s: %v", body, err)
	}
	return m
}

var (
	periodStart = time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	periodEnd   = time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
)

// quota is tenant's quota decision of docs/architecture.md#decision at version.
func quota(tenant string, version uint64) schemas.Decision {
	return schemas.Decision{
		Tenant: tenant, Reason: schemas.ReasonQuotaExceeded, Meter: "api_calls", Limit: 1000, Used: 1004,
		PeriodStart: periodStart, PeriodEnd: periodEnd,
		BillingURL: "https://billing.example.com/" + tenant, Version: version,
		DecidedAt: time.Date(2026, 11, 28, 16, 0, 0, 0, time.UTC),
	}
}

// unpaid is tenant's decision for an unpaid reason at version.
func unpaid(tenant string, reason schemas.Reason, url string, version uint64) schemas.Decision {
	return schemas.Decision{Tenant: tenant, Reason: reason, BillingURL: url, Version: version,
		DecidedAt: time.Date(2026, 11, 28, 16, 0, 0, 0, time.UTC)}
}
