package aggregator

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	lag          prometheus.Gauge
	flushSeconds prometheus.Histogram
	storeSeconds prometheus.Histogram
	storeErrors  prometheus.Counter
	batches      prometheus.Counter
	events       prometheus.Counter
	duplicates   prometheus.Counter
	deadLettered prometheus.Counter
	fetchErrors  prometheus.Counter
	leaseHeld    prometheus.Gauge
	leaseLost    prometheus.Counter
}

// newMetrics registers the aggregator's metrics; lagSeconds reports the
// consumer lag in time and storeFailing how long store writes have been
// failing, when scraped.
func newMetrics(reg prometheus.Registerer, lagSeconds, storeFailing func() float64) (*metrics, error) {
	latency := prometheus.ExponentialBuckets(0.001, 2, 15)
	m := &metrics{
		lag: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meterd_aggregator_consumer_lag_messages",
			Help: "Batches in METERD_USAGE not yet delivered to the aggregator, as of its last fetch.",
		}),
		flushSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "meterd_aggregator_flush_duration_seconds", Buckets: latency,
			Help: "Time to decode, write and acknowledge one fetched group of batches.",
		}),
		storeSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "meterd_aggregator_store_write_duration_seconds", Buckets: latency,
			Help: "Time of one store Apply (durable write of a group of batches).",
		}),
		storeErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_aggregator_store_write_errors_total",
			Help: "Store writes that failed: retried until they succeed, or, for an invalid batch, dead-lettered.",
		}),
		batches: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_aggregator_batches_committed_total",
			Help: "Batches durably written and acknowledged.",
		}),
		events: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_aggregator_events_committed_total",
			Help: "Events newly counted by the store.",
		}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_aggregator_events_duplicate_total",
			Help: "Events received again (same tenant and id) and counted once.",
		}),
		deadLettered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_aggregator_dead_lettered_total",
			Help: "Messages moved to METERD_DLQ because they can never be processed.",
		}),
		fetchErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_aggregator_fetch_errors_total",
			Help: "Fetches from the durable consumer that failed (a consumer that vanished is recreated; while fetches fail nothing is counted).",
		}),
		leaseHeld: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meterd_aggregator_writer_leases",
			Help: "Writer leases this aggregator holds: 1 while it is the writer and consumes (or runs without a lease), 0 while it stands by.",
		}),
		leaseLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_aggregator_lease_lost_total",
			Help: "Times this aggregator lost the writer lease while consuming (another process took it over, or it could not renew in time).",
		}),
	}
	lagAge := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meterd_aggregator_consumer_lag_seconds",
		Help: "Time since JetStream stored the oldest batch the aggregator has not committed yet (0 between writes); it keeps growing while a flush is stuck.",
	}, lagSeconds)
	failing := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "meterd_aggregator_store_failing_seconds",
		Help: "Time since store writes started failing (they are retried until they succeed), 0 while they succeed.",
	}, storeFailing)
	for _, c := range []prometheus.Collector{m.lag, lagAge, failing, m.flushSeconds, m.storeSeconds, m.storeErrors, m.batches, m.events, m.duplicates, m.deadLettered, m.fetchErrors, m.leaseHeld, m.leaseLost} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
