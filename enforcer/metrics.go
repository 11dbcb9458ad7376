package enforcer

import (
	"github.com/prometheus/client_golang/prometheus"

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
	m := &metrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meterd_enforcer_decisions_total",
			Help: "Decisions written to the blocklist bucket, by reason (unblocked for a delete).",
		}, []string{"reason"}),
		blocked: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meterd_enforcer_blocked_tenants",
			Help: "Tenants the blocklist bucket holds a block for, by reason.",
		}, []string{"reason"}),
		webhooks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meterd_enforcer_webhooks_total",
			Help: "Billing webhook deliveries by outcome.",
		}, []string{"outcome"}),
		notifySent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meterd_enforcer_notifications_sent_total",
			Help: "Notification deliveries by type, one per target (the NATS subject and each URL).",
		}, []string{"type"}),
		notifyFailed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meterd_enforcer_notifications_failed_total",
			Help: "Notification deliveries to a URL given up after the retries, by type.",
		}, []string{"type"}),
		freshness: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meterd_enforcer_freshness_seconds",
			Help:    "Time from the sealing of the usage that crossed a limit (its batch, at the collector) to the blocklist write of the block it caused.",
			Buckets: schemas.FreshnessBuckets,
		}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meterd_enforcer_catalog_reloads_total",
			Help: "Reloads of the catalog file by result (ok, error: the previous catalog stays).",
		}, []string{"result"}),
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meterd_enforcer_reconciles_total",
			Help: "Recomputations of usage totals from the store by result.",
		}, []string{"result"}),
		corrections: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_enforcer_reconcile_corrections_total",
			Help: "Tenant meters whose in-memory usage a reconcile found different from the store's.",
		}),
		writeFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_enforcer_blocklist_write_errors_total",
			Help: "Failed writes to the blocklist bucket (retried).",
		}),
		active: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meterd_enforcer_active_leases",
			Help: "1 while this enforcer is the active replica (it holds the enforcer lease and writes the blocklist), 0 while it stands by.",
		}),
		leaseLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meterd_enforcer_lease_lost_total",
			Help: "Times this enforcer lost the enforcer lease while active (it was replaced, or a write of another replica fenced it) and stood by.",
		}),
	}
	for _, c := range []prometheus.Collector{m.decisions, m.blocked, m.webhooks, m.notifySent, m.notifyFailed,
		m.freshness, m.reloads, m.reconciles, m.corrections, m.writeFailures, m.active, m.leaseLost} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
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
