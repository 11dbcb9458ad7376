package gate

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// The gate's freshness histogram counts each crossing once, from the seal
// of the crossing usage to the snapshot holding the block: live or in the
// replay of a (re)starting watch, but not crossings older than the gate.
func TestFreshnessMetric(t *testing.T) {
	n := startNATS(t)
	n.createBucket()
	n.heartbeat()
	old := quota("old", 1)
	old.CrossedAt = time.Now().Add(-time.Hour)
	n.put(old)

	reg := prometheus.NewRegistry()
	g, run := newGate(t, n, Config{Observer: observer(t, reg)})
	time.Sleep(300 * time.Millisecond)
	replayed := quota("replayed", 1)
	replayed.CrossedAt = time.Now().Add(-200 * time.Millisecond) // after New: the gate existed
	n.put(replayed)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	waitReady(t, g)
	count, sum := metrictest.Histogram(t, reg, "meterd_gate_freshness_seconds")
	if count != 1 || sum < 0.2 || sum > 10 {
		t.Errorf("after the initial load: %d observations summing to %.3f s, want 1 of 0.2 s or a little more", count, sum)
	}

	live := quota("acme", 1)
	live.CrossedAt = time.Now().Add(-250 * time.Millisecond)
	n.put(live)
	waitFor(t, 5*time.Second, "acme blocked", func() bool { return g.Check("acme").Block != nil })
	count, sum2 := metrictest.Histogram(t, reg, "meterd_gate_freshness_seconds")
	if d := sum2 - sum; count != 2 || d < 0.25 || d > 10 {
		t.Errorf("after a live crossing: %d observations, the new one %.3f s; want 2, the new one 0.25 s or a little more", count, d)
	}

	// The same crossing decided again (usage grew), a block without a
	// crossing, and a delete observe nothing.
	again := live
	again.Version, again.Used = 2, 1500
	n.put(again)
	n.put(unpaid("globex", schemas.ReasonPaymentOverdue, "", 1))
	n.del("old", false)
	waitFor(t, 5*time.Second, "updates applied", func() bool {
		b := g.Check("acme").Block
		return b != nil && b.Decision.Used == 1500 && g.Check("globex").Block != nil && g.Check("old").Block == nil
	})
	if count, _ := metrictest.Histogram(t, reg, "meterd_gate_freshness_seconds"); count != 2 {
		t.Errorf("%d observations after updates that crossed nothing new, want still 2", count)
	}
}

// Every metric the gate exports follows the naming rules.
func TestMetricNames(t *testing.T) {
	n := startNATS(t)
	reg := prometheus.NewRegistry()
	newGate(t, n, Config{Observer: observer(t, reg)})
	metrictest.Check(t, reg, 7)
}

// The gate links no metrics client: a gateway embedding it chooses its own
// through Observer (gateprom is meterd's Prometheus one).
func TestNoPrometheusDependency(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command:", err)
	}
	out, err := exec.Command(goBin, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasPrefix(pkg, "github.com/prometheus/") {
			t.Errorf("the gate depends on %s", pkg)
		}
	}
}
