package gateprom_test

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/gate"
	"github.com/meterd/meterd/gate/gateprom"
	"github.com/meterd/meterd/internal/metrictest"
)

// The Observer is a gate.Observer.
var _ gate.Observer = (*gateprom.Observer)(nil)

// Each call lands in its metric; staleness reads the gate's function once
// handed over, 0 before.
func TestObserver(t *testing.T) {
	reg := prometheus.NewRegistry()
	o, err := gateprom.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	metrictest.Check(t, reg, 7)
	if v := metrictest.Value(t, reg, "meterd_gate_staleness_seconds"); v != 0 {
		t.Errorf("staleness without a gate = %v, want 0", v)
	}
	o.WatchStaleness(func() time.Duration { return 1500 * time.Millisecond })
	o.SnapshotPublished(3, 2)
	o.SnapshotPublished(1, 1)
	o.DecisionIgnored()
	o.ValueMalformed()
	o.ValueMalformed()
	o.Freshness(250 * time.Millisecond)
	for name, want := range map[string]float64{
		"meterd_gate_staleness_seconds":       1.5,
		"meterd_gate_updates_applied_total":   4,
		"meterd_gate_blocked_tenants":         1,
		"meterd_gate_snapshots_total":         2,
		"meterd_gate_updates_ignored_total":   1,
		"meterd_gate_updates_malformed_total": 2,
	} {
		if got := metrictest.Value(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if count, sum := metrictest.Histogram(t, reg, "meterd_gate_freshness_seconds"); count != 1 || sum != 0.25 {
		t.Errorf("freshness: %d observations summing to %v, want 1 of 0.25", count, sum)
	}
	if _, err := gateprom.New(reg); err == nil {
		t.Error("a second Observer on the same registry: no error")
	}
}
