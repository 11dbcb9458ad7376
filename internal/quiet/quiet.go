// Package quiet gives a component configured without a logger or a metrics
// registerer the defaults every meterd component takes: a logger that
// discards and a registry of its own, so a library user who configures
// neither gets no output and no collisions in the default registry.
package quiet

import (
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
)

// Defaults sets *log to a discarding logger if it is nil and *reg to a new
// registry if it is nil.
func Defaults(log **slog.Logger, reg *prometheus.Registerer) {
	if *log == nil {
		*log = slog.New(slog.DiscardHandler)
	}
	if *reg == nil {
		*reg = prometheus.NewRegistry()
	}
}
