// Package gateprom exports a gate's measurements as Prometheus metrics
// (the meterd_gate_* families). It is apart from package gate so that a
// gateway embedding the gate without Prometheus does not link the client.
//
//	obs, err := gateprom.New(reg)
//	g, err := gate.New(gate.Config{NATS: nc, Observer: obs})
package gateprom

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/promreg"
	"github.com/meterd/meterd/schemas"
)

// Observer is a gate.Observer that keeps the gate's metrics in Prometheus
// collectors. One Observer serves one gate.
type Observer struct {
	blocked   prometheus.Gauge
	applied   prometheus.Counter
	ignored   prometheus.Counter
	malformed prometheus.Counter
	snapshots prometheus.Counter
	freshness prometheus.Histogram
	staleness atomic.Pointer[func() time.Duration] // set by the gate's New
}

// New returns an Observer with its metrics registered on reg.
func New(reg prometheus.Registerer) (*Observer, error) {
	s := promreg.On(reg)
	o := &Observer{
		blocked:   s.Gauge("meterd_gate_blocked_tenants", "Tenants the gate holds a block for."),
		applied:   s.Counter("meterd_gate_updates_applied_total", "Changes applied to the gate's snapshot: blocks added, replaced or removed."),
		ignored:   s.Counter("meterd_gate_updates_ignored_total", "Decisions ignored because the gate held a newer version for the tenant."),
		malformed: s.Counter("meterd_gate_updates_malformed_total", "Blocklist values ignored because they are not a valid decision for their key."),
		snapshots: s.Counter("meterd_gate_snapshots_total", "Snapshots published; each applies a burst of updates at once."),
		freshness: s.Histogram("meterd_gate_freshness_seconds", "Freshness: time from the sealing of the usage that crossed a limit (its batch, at the collector) to this gate answering with the block.", schemas.FreshnessBuckets),
	}
	s.GaugeFunc("meterd_gate_staleness_seconds", "Time since the gate last received a decision or the enforcer's heartbeat (since start before the first).", func() float64 {
		if f := o.staleness.Load(); f != nil {
			return (*f)().Seconds()
		}
		return 0 // no gate yet
	})
	if err := s.Err(); err != nil {
		return nil, err
	}
	return o, nil
}

// WatchStaleness makes meterd_gate_staleness_seconds read staleness.
func (o *Observer) WatchStaleness(staleness func() time.Duration) { o.staleness.Store(&staleness) }

// SnapshotPublished counts the snapshot and its changes and sets the
// number of blocked tenants.
func (o *Observer) SnapshotPublished(changes uint64, blocked int) {
	o.applied.Add(float64(changes))
	o.blocked.Set(float64(blocked))
	o.snapshots.Inc()
}

// DecisionIgnored counts an older decision the gate ignored.
func (o *Observer) DecisionIgnored() { o.ignored.Inc() }

// ValueMalformed counts a blocklist value the gate ignored as malformed.
func (o *Observer) ValueMalformed() { o.malformed.Inc() }

// Freshness observes d in the freshness histogram, in seconds.
func (o *Observer) Freshness(d time.Duration) { o.freshness.Observe(d.Seconds()) }
