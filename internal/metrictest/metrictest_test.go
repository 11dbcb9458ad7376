package metrictest

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestLint(t *testing.T) {
	counter := func(name string, labels ...string) prometheus.Collector {
		c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: "h"}, labels)
		if len(labels) == 0 {
			c.WithLabelValues()
		}
		for i, l := range labels {
			vals := make([]string, len(labels))
			for j := range vals {
				vals[j] = "v"
			}
			vals[i] = l + "-value"
			c.WithLabelValues(vals...)
		}
		return c
	}
	gauge := func(name string) prometheus.Collector {
		return prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: "h"})
	}
	histogram := func(name string) prometheus.Collector {
		return prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: "h"})
	}
	manySeries := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meterd_collector_checks_total", Help: "h"}, []string{"outcome"})
	for i := range MaxSeries + 1 {
		manySeries.WithLabelValues(strings.Repeat("x", i+1))
	}
	tests := []struct {
		name string
		c    prometheus.Collector
		want string // "" = passes
	}{
		{"counter", counter("meterd_collector_events_accepted_total"), ""},
		{"counter with reason", counter("meterd_collector_events_rejected_total", "reason"), ""},
		{"gauge of a count", gauge("meterd_aggregator_consumer_lag_messages"), ""},
		{"gauge in seconds", gauge("meterd_gate_staleness_seconds"), ""},
		{"histogram", histogram("meterd_aggregator_flush_duration_seconds"), ""},
		{"not ours", gauge("go_whatever"), ""},
		{"counter without _total", counter("meterd_collector_events_accepted"), "must end in _total"},
		{"gauge with _total", gauge("meterd_collector_spool_total"), "only counters end in _total"},
		{"histogram without unit", histogram("meterd_aggregator_flush_duration"), "_seconds or _bytes"},
		{"milliseconds", histogram("meterd_aggregator_flush_duration_milliseconds"), "scaled unit"},
		{"ms counter", counter("meterd_aggregator_flush_ms_total"), "scaled unit"},
		{"gauge without unit", gauge("meterd_collector_spool_depth"), "a gauge must end in"},
		{"no component", counter("meterd_events_total"), "meterd_<component>"},
		{"unknown component", counter("meterd_proxy_events_total"), "meterd_<component>"},
		{"upper case", counter("meterd_collector_Events_total"), "lower case"},
		{"double underscore", counter("meterd_collector__events_total"), "lower case"},
		{"tenant label", counter("meterd_collector_events_accepted_total", "tenant"), `label "tenant"`},
		{"batch label", counter("meterd_aggregator_batches_committed_total", "reason", "batch_id"), `label "batch_id"`},
		{"unbounded values", manySeries, "not bounded"},
		{"no help", prometheus.NewGauge(prometheus.GaugeOpts{Name: "meterd_gate_blocked_tenants"}), "no help"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg := prometheus.NewPedanticRegistry()
			reg.MustRegister(tt.c)
			mfs, err := reg.Gather()
			if err != nil {
				t.Fatal(err)
			}
			errs := Lint(mfs)
			switch {
			case tt.want == "" && len(errs) > 0:
				t.Errorf("Lint = %v, want no error", errs)
			case tt.want != "" && len(errs) == 0:
				t.Errorf("Lint found nothing, want %q", tt.want)
			case tt.want != "":
				found := false
				for _, err := range errs {
					found = found || strings.Contains(err.Error(), tt.want)
				}
				if !found {
					t.Errorf("Lint = %v, want one saying %q", errs, tt.want)
				}
			}
		})
	}
}
