// Package promreg makes a component's Prometheus metrics and registers each
// one as it is made, so that a metric cannot be made and left unregistered
// (a series that silently never appears) and a component states each metric
// once: its name, its help and its labels or buckets.
//
//	s := promreg.On(reg)
//	m := &metrics{
//		accepted: s.Counter("meterd_x_accepted_total", "Events accepted."),
//		rejected: s.CounterVec("meterd_x_rejected_total", "Events rejected, by reason.", "reason"),
//	}
//	if err := s.Err(); err != nil {
//		return nil, err
//	}
package promreg

import "github.com/prometheus/client_golang/prometheus"

// Set makes metrics and registers them on one Registerer. After a
// registration fails it registers nothing more, and Err returns that
// error; the metrics it makes are usable either way.
type Set struct {
	reg prometheus.Registerer
	err error
}

// On returns a Set that registers on reg.
func On(reg prometheus.Registerer) *Set { return &Set{reg: reg} }

// Err returns the first registration error, or nil.
func (s *Set) Err() error { return s.err }

// register registers c and returns it.
func register[C prometheus.Collector](s *Set, c C) C {
	if s.err == nil {
		s.err = s.reg.Register(c)
	}
	return c
}

// Counter makes and registers a counter.
func (s *Set) Counter(name, help string) prometheus.Counter {
	return register(s, prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help}))
}

// CounterVec makes and registers a counter with labels.
func (s *Set) CounterVec(name, help string, labels ...string) *prometheus.CounterVec {
	return register(s, prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels))
}

// Gauge makes and registers a gauge.
func (s *Set) Gauge(name, help string) prometheus.Gauge {
	return register(s, prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help}))
}

// GaugeVec makes and registers a gauge with labels.
func (s *Set) GaugeVec(name, help string, labels ...string) *prometheus.GaugeVec {
	return register(s, prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, labels))
}

// GaugeFunc makes and registers a gauge whose value is read from f at
// every scrape; f must be safe to call concurrently.
func (s *Set) GaugeFunc(name, help string, f func() float64) {
	register(s, prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
}

// Histogram makes and registers a histogram with the given buckets.
func (s *Set) Histogram(name, help string, buckets []float64) prometheus.Histogram {
	return register(s, prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets}))
}
