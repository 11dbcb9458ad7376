package gate

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/schemas"
)

type metrics struct {
	blocked   prometheus.Gauge
	applied   prometheus.Counter
	ignored   prometheus.Counter
	malformed prometheus.Counter
	snapshots prometheus.Counter
	freshness prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer, g *Gate) (*metrics, error) {
	m := &metrics{
		blocked: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meterd_gate_blocked_tenants",
			Help: "Tenants the gate holds a block for.",
		}),
		applied: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_gate_updates_applied_total",
			Help: "Changes applied to the gate's snapshot: blocks added, replaced or removed.",
		}),
		ignored: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_gate_updates_ignored_total",
			Help: "Decisions ignored because the gate held a newer version for the tenant.",
		}),
		malformed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_gate_updates_malformed_total",
			Help: "Blocklist values ignored because they are not a valid decision for their key.",
		}),
		snapshots: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_gate_snapshots_total",
			Help: "Snapshots published; each applies a burst of updates at once.",
		}),
		freshness: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meterd_gate_freshness_seconds",
			Help:    "Freshness: time from the sealing of the usage that crossed a limit (its batch, at the collector) to this gate answering with the block.",
			Buckets: schemas.FreshnessBuckets,
		}),
	}
	staleness := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meterd_gate_staleness_seconds",
		Help: "Time since the gate last received a decision or the enforcer's heartbeat (since start before the first).",
	}, func() float64 { return g.staleness().Seconds() })
	for _, c := range []prometheus.Collector{m.blocked, m.applied, m.ignored, m.malformed, m.snapshots, m.freshness, staleness} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
