package collector

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/metrictest"
)

// Every metric the collector exports follows the naming rules.
func TestMetricNames(t *testing.T) {
	reg := prometheus.NewRegistry()
	newIngestEnv(t, func(c *Config) { c.Registerer = reg })
	metrictest.Check(t, reg, 17)
	if got := metrictest.Value(t, reg, "meterd_collector_spool_limit_bytes"); got != DefaultSpoolMaxBytes {
		t.Errorf("spool limit = %v, want the default %d", got, DefaultSpoolMaxBytes)
	}
	if got, want := metrictest.Value(t, reg, "meterd_collector_inflight_body_limit_bytes"), defaultMaxInflightBodyBytes(DefaultMaxBodyBytes); got != float64(want) {
		t.Errorf("in-flight body limit = %v, want the default %d", got, want)
	}
}
