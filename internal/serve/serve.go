// Package serve is the HTTP plumbing every meterd process shares: the
// /healthz, /readyz and /metrics endpoints and a server that shuts down
// gracefully.
package serve

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meterd/meterd/schemas"
)

// ReadyFunc reports why a component is not ready, or nil.
type ReadyFunc func(ctx context.Context) error

// DegradedError is a readiness condition an operator must see that is no
// reason to take the process out of service: /readyz lists it as
// "degraded: …" and still answers 200 (a gateway's sidecar collector that
// can accept events must stay in its Service). Alert on it from metrics.
type DegradedError struct{ Err error }

// Degraded wraps err as a DegradedError.
func Degraded(err error) error { return &DegradedError{Err: err} }

func (e *DegradedError) Error() string { return "degraded: " + e.Err.Error() }
func (e *DegradedError) Unwrap() error { return e.Err }

// NewRegistry returns a Prometheus registry with the Go and process collectors.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// NewMux returns a mux serving GET /healthz (the process is alive), GET
// /readyz (every check passes or is only degraded; the body lists each
// check's state) and GET
// /metrics from reg. Components add their own routes to it.
func NewMux(reg *prometheus.Registry, checks map[string]ReadyFunc) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok\n"))
	})
	names := make([]string, 0, len(checks))
	for n := range checks {
		names = append(names, n)
	}
	sort.Strings(names)
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		status := make(map[string]string, len(names))
		ready := true
		for _, n := range names {
			var degraded *DegradedError
			if err := checks[n](ctx); errors.As(err, &degraded) {
				status[n] = degraded.Error()
			} else if err != nil {
				status[n] = err.Error()
				ready = false
			} else {
				status[n] = "ok"
			}
		}
		if !ready {
			p := schemas.NewProblem(http.StatusServiceUnavailable, "not-ready", "not ready")
			body, _ := json.Marshal(status)
			p.Detail = "not ready: " + string(body)
			p.Write(w)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(status)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	return mux
}

// NotFound answers every unrouted request with a 404 problem.
func NotFound(next *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := next.Handler(r); pattern != "" {
			next.ServeHTTP(w, r) // the mux sets the path values
			return
		}
		// Let the mux answer 405 with its Allow header, as a problem.
		rec := &statusRecorder{ResponseWriter: w}
		next.ServeHTTP(rec, r)
	})
}

// statusRecorder turns the mux's plain-text 404/405 into problem+json.
type statusRecorder struct {
	http.ResponseWriter
	wrote bool
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.wrote {
		return
	}
	s.wrote = true
	slug, detail := "not-found", "no such endpoint"
	if code == http.StatusMethodNotAllowed {
		slug, detail = "method-not-allowed", "method not allowed; see the Allow header"
	}
	schemas.NewProblem(code, slug, detail).Write(s.ResponseWriter)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if !s.wrote {
		s.WriteHeader(http.StatusNotFound)
	}
	return len(b), nil
}

// Server runs an HTTP server until ctx ends, then shuts it down gracefully:
// it stops accepting and waits up to grace for in-flight requests.
func Server(ctx context.Context, ln net.Listener, h http.Handler, grace time.Duration, log *slog.Logger) error {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	err := srv.Shutdown(sctx)
	if serr := <-errc; !errors.Is(serr, http.ErrServerClosed) && serr != nil {
		return serr
	}
	return err
}
