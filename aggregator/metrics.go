package aggregator

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/promreg"
)

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
	s := promreg.On(reg)
	m := &metrics{
		lag:          s.Gauge("meterd_aggregator_consumer_lag_messages", "Batches in METERD_USAGE not yet delivered to the aggregator, as of its last fetch."),
		flushSeconds: s.Histogram("meterd_aggregator_flush_duration_seconds", "Time to decode, write and acknowledge one fetched group of batches.", latency),
		storeSeconds: s.Histogram("meterd_aggregator_store_write_duration_seconds", "Time of one store Apply (durable write of a group of batches).", latency),
		storeErrors:  s.Counter("meterd_aggregator_store_write_errors_total", "Store writes that failed: retried until they succeed, or, for an invalid batch, dead-lettered."),
		batches:      s.Counter("meterd_aggregator_batches_committed_total", "Batches durably written and acknowledged."),
		events:       s.Counter("meterd_aggregator_events_committed_total", "Events newly counted by the store."),
		duplicates:   s.Counter("meterd_aggregator_events_duplicate_total", "Events received again (same tenant and id) and counted once."),
		deadLettered: s.Counter("meterd_aggregator_dead_lettered_total", "Messages moved to METERD_DLQ because they can never be processed."),
		fetchErrors:  s.Counter("meterd_aggregator_fetch_errors_total", "Fetches from the durable consumer that failed (a consumer that vanished is recreated; while fetches fail nothing is counted)."),
		leaseHeld:    s.Gauge("meterd_aggregator_writer_leases", "Writer leases this aggregator holds: 1 while it is the writer and consumes (or runs without a lease), 0 while it stands by."),
		leaseLost:    s.Counter("meterd_aggregator_lease_lost_total", "Times this aggregator lost the writer lease while consuming (another process took it over, or it could not renew in time)."),
	}
	s.GaugeFunc("meterd_aggregator_consumer_lag_seconds", "Time since JetStream stored the oldest batch the aggregator has not committed yet (0 between writes); it keeps growing while a flush is stuck.", lagSeconds)
	s.GaugeFunc("meterd_aggregator_store_failing_seconds", "Time since store writes started failing (they are retried until they succeed), 0 while they succeed.", storeFailing)
	if err := s.Err(); err != nil {
		return nil, err
	}
	return m, nil
}
