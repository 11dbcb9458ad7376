package enforcer

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/promreg"
	"github.com/meterd/meterd/schemas"
)

// Outcomes of meterd_enforcer_webhooks_total (bounded label values).
const (
	webhookApplied          = "applied"
	webhookDuplicate        = "duplicate"
	webhookIgnored          = "ignored"
	webhookUnknownCustomer  = "unknown_customer"
	webhookInvalidSignature = "invalid_signature"
	webhookMalformed        = "malformed"
	webhookUnavailable      = "unavailable"
	webhookDisabled         = "disabled"
)

// reasonUnblocked labels the decisions that lift a block.
const reasonUnblocked = "unblocked"

type metrics struct {
	decisions     *prometheus.CounterVec
	blocked       *prometheus.GaugeVec
	webhooks      *prometheus.CounterVec
	notifySent    *prometheus.CounterVec
	notifyFailed  *prometheus.CounterVec
	freshness     prometheus.Histogram
	reloads       *prometheus.CounterVec
	reconciles    *prometheus.CounterVec
	corrections   prometheus.Counter
	writeFailures prometheus.Counter
	active        prometheus.Gauge
	leaseLost     prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	s := promreg.On(reg)
	m := &metrics{
		decisions:     s.CounterVec("meterd_enforcer_decisions_total", "Decisions written to the blocklist bucket, by reason (unblocked for a delete).", "reason"),
		blocked:       s.GaugeVec("meterd_enforcer_blocked_tenants", "Tenants the blocklist bucket holds a block for, by reason.", "reason"),
		webhooks:      s.CounterVec("meterd_enforcer_webhooks_total", "Billing webhook deliveries by outcome.", "outcome"),
		notifySent:    s.CounterVec("meterd_enforcer_notifications_sent_total", "Notification deliveries by type, one per target (the NATS subject and each URL).", "type"),
		notifyFailed:  s.CounterVec("meterd_enforcer_notifications_failed_total", "Notification deliveries to a URL given up after the retries, by type.", "type"),
		freshness:     s.Histogram("meterd_enforcer_freshness_seconds", "Time from the sealing of the usage that crossed a limit (its batch, at the collector) to the blocklist write of the block it caused.", schemas.FreshnessBuckets),
		reloads:       s.CounterVec("meterd_enforcer_catalog_reloads_total", "Reloads of the catalog file by result (ok, error: the previous catalog stays).", "result"),
		reconciles:    s.CounterVec("meterd_enforcer_reconciles_total", "Recomputations of usage totals from the store by result.", "result"),
		corrections:   s.Counter("meterd_enforcer_reconcile_corrections_total", "Tenant meters whose in-memory usage a reconcile found different from the store's."),
		writeFailures: s.Counter("meterd_enforcer_blocklist_write_errors_total", "Failed writes to the blocklist bucket (retried)."),
		active:        s.Gauge("meterd_enforcer_active_leases", "1 while this enforcer is the active replica (it holds the enforcer lease and writes the blocklist), 0 while it stands by."),
		leaseLost:     s.Counter("meterd_enforcer_lease_lost_total", "Times this enforcer lost the enforcer lease while active (it was replaced, or a write of another replica fenced it) and stood by."),
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	// Every bounded label value exists from the start: rates and alerts see
	// 0, not a missing series.
	for _, r := range []schemas.Reason{schemas.ReasonQuotaExceeded, schemas.ReasonPaymentOverdue,
		schemas.ReasonPaymentMethodRequired, schemas.ReasonSuspended} {
		m.decisions.WithLabelValues(string(r))
		m.blocked.WithLabelValues(string(r))
	}
	m.decisions.WithLabelValues(reasonUnblocked)
	for _, o := range []string{webhookApplied, webhookDuplicate, webhookIgnored, webhookUnknownCustomer,
		webhookInvalidSignature, webhookMalformed, webhookUnavailable, webhookDisabled} {
		m.webhooks.WithLabelValues(o)
	}
	for _, t := range []string{NotifyUsageThreshold, NotifyBillingUnpaid, NotifyAccessRestored} {
		m.notifySent.WithLabelValues(t)
		m.notifyFailed.WithLabelValues(t)
	}
	for _, r := range []string{"ok", "error"} {
		m.reloads.WithLabelValues(r)
		m.reconciles.WithLabelValues(r)
	}
	return m, nil
}
