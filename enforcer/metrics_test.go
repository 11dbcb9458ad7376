package enforcer

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/metrictest"
)

// Every metric the enforcer exports follows the naming rules.
func TestMetricNames(t *testing.T) {
	v := newEnv(t)
	reg := prometheus.NewRegistry()
	v.mutate = func(c *Config) { c.Registerer = reg }
	v.start()
	metrictest.Check(t, reg, 12)
}
