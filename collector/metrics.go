package collector

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/collector/spool"
	"github.com/meterd/meterd/gate"
	"github.com/meterd/meterd/internal/promreg"
	"github.com/meterd/meterd/schemas"
)

type metrics struct {
	accepted          prometheus.Counter
	duplicates        prometheus.Counter
	rejected          *prometheus.CounterVec
	batches           *prometheus.CounterVec
	publishDuplicates prometheus.Counter
	publishSeconds    prometheus.Histogram
	checks            *prometheus.CounterVec
	check             map[string]prometheus.Counter // checks by outcome, resolved once: /v1/check is hot
	paymentRequired   *prometheus.CounterVec
	setAside          *prometheus.CounterVec
	batchLimit        prometheus.Gauge
}

// Outcomes of meterd_collector_checks_total.
const (
	checkAllowed        = "allowed"
	checkBlocked        = "blocked"
	checkStaleAllowed   = "stale_allowed"
	checkStaleDenied    = "stale_denied"
	checkUnknownAllowed = "unknown_allowed"
	checkUnknownDenied  = "unknown_denied"
	checkRejected       = "rejected"
)

// Reasons of meterd_collector_events_rejected_total (bounded label values).
const (
	rejectInvalid     = "invalid"
	rejectMalformed   = "malformed"
	rejectTooLarge    = "too_large"
	rejectMediaType   = "unsupported_media_type"
	rejectAuth        = "unauthorized"
	rejectForbidden   = "forbidden"
	rejectSpoolFull   = "spool_full"
	rejectUnavailable = "unavailable"
	rejectOverloaded  = "overloaded"
)

// paymentRequiredReasons label meterd_collector_payment_required_total: the
// reasons of docs/architecture.md#decision and the gate's stale block.
var paymentRequiredReasons = []schemas.Reason{schemas.ReasonQuotaExceeded, schemas.ReasonPaymentOverdue,
	schemas.ReasonPaymentMethodRequired, schemas.ReasonSuspended, gate.ReasonStale}

func newMetrics(reg prometheus.Registerer, sp *spool.Spool, spoolMaxBytes int64, inflight *bodyBudget, reserved func() int64) (*metrics, error) {
	s := promreg.On(reg)
	m := &metrics{
		accepted:          s.Counter("meterd_collector_events_accepted_total", "Usage events acknowledged with 202 (durable in JetStream or the spool)."),
		duplicates:        s.Counter("meterd_collector_events_duplicate_total", "Events dropped because the same tenant and id came earlier in the same request."),
		rejected:          s.CounterVec("meterd_collector_events_rejected_total", "Requests' events not accepted, by reason (requests that could not be parsed count once).", "reason"),
		batches:           s.CounterVec("meterd_collector_batches_total", "Sealed batches by outcome: published, spooled, replayed (from the spool).", "outcome"),
		publishDuplicates: s.Counter("meterd_collector_publish_duplicates_total", "Publishes JetStream recognised as a retry of a batch it already holds."),
		publishSeconds:    s.Histogram("meterd_collector_publish_duration_seconds", "Time from the first publish attempt of a batch to its JetStream ack.", prometheus.ExponentialBuckets(0.0005, 2, 14)),
		checks:            s.CounterVec("meterd_collector_checks_total", "Forward-auth checks by outcome (stale_*: the blocklist was stale; unknown_*: tenant without a plan).", "outcome"),
		paymentRequired:   s.CounterVec("meterd_collector_payment_required_total", "Checks answered 402 (or 503 when stale under the deny policy), by reason.", "reason"),
		setAside:          s.CounterVec("meterd_collector_spool_set_aside_total", "Spooled batches JetStream refused for good (too_large) or that could not be read (unreadable), moved to the spool's set-aside directory so they no longer block the spool.", "reason"),
		batchLimit:        s.Gauge("meterd_collector_batch_max_bytes", "Bound of a sealed batch's encoding, read from the server at start (stream MaxMsgSize or max_payload, minus headroom)."),
	}
	s.GaugeFunc("meterd_collector_spool_batches", "Batches in the on-disk spool waiting for NATS.", func() float64 { return float64(sp.Len()) })
	s.GaugeFunc("meterd_collector_spool_bytes", "Bytes in the on-disk spool waiting for NATS.", func() float64 { return float64(sp.Bytes()) })
	s.Gauge("meterd_collector_spool_limit_bytes", "Bound of the on-disk spool (--spool-max-bytes); past it /v1/events answers 429.").Set(float64(spoolMaxBytes))
	s.GaugeFunc("meterd_collector_inflight_body_bytes", "Request body bytes held by requests in flight (after decompression).", func() float64 { return float64(inflight.used.Load()) })
	s.Gauge("meterd_collector_inflight_body_limit_bytes", "Bound of the body bytes in flight (--max-inflight-body-bytes); past it /v1/events answers 503.").Set(float64(inflight.limit))
	s.GaugeFunc("meterd_collector_spool_reserved_bytes", "Spool room reserved by requests in flight: a request is admitted only if its events fit beside the spool and every reservation.", func() float64 { return float64(reserved()) })
	s.GaugeFunc("meterd_collector_spool_set_aside_batches", "Batches in the spool's set-aside directory: accepted events not counted until an operator replays and removes them.", func() float64 { return float64(sp.SetAsideCount()) })
	if err := s.Err(); err != nil {
		return nil, err
	}
	for _, r := range []string{rejectInvalid, rejectMalformed, rejectTooLarge, rejectMediaType, rejectAuth, rejectForbidden, rejectSpoolFull, rejectUnavailable, rejectOverloaded} {
		m.rejected.WithLabelValues(r)
	}
	m.check = map[string]prometheus.Counter{}
	for _, o := range []string{checkAllowed, checkBlocked, checkStaleAllowed, checkStaleDenied, checkUnknownAllowed, checkUnknownDenied, checkRejected} {
		m.check[o] = m.checks.WithLabelValues(o)
	}
	for _, r := range paymentRequiredReasons {
		m.paymentRequired.WithLabelValues(string(r))
	}
	for _, r := range []string{setAsideTooLarge, setAsideUnreadable} {
		m.setAside.WithLabelValues(r)
	}
	for _, o := range []string{"published", "spooled", "replayed"} {
		m.batches.WithLabelValues(o)
	}
	return m, nil
}
