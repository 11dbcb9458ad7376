// Package serve is the HTTP plumbing every meterd process shares: the
// /healthz, /readyz, /metrics and /openapi.yaml endpoints and a server that
// shuts down gracefully.
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

	"github.com/meterd/meterd/api"
	"github.com/meterd/meterd/schemas"
)

// ReadyFunc reports why a component is not ready, or nil. An error made by
// Degraded says how a ready component runs degraded: /readyz still answers
// 200 and shows it.
type ReadyFunc func(ctx context.Context) error

// DegradedError is the state of a component that works, but not as usual
// (a collector spooling while NATS is away). See Degraded.
type DegradedError struct{ State string }

func (e *DegradedError) Error() string { return e.State }

// Degraded returns the error a ReadyFunc returns to say the component is
// ready in a degraded state, which /readyz reports beside its 200.
func Degraded(state string) error { return &DegradedError{State: state} }

// NewRegistry returns a Prometheus registry with the Go and process collectors.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// NewMux returns a mux serving GET /healthz (the process is alive), GET
// /readyz (every check passes or is degraded; the body lists each check's
// state: "ok", the degraded state, or why it is not ready), GET /metrics
// from reg and GET /openapi.yaml (the description of every meterd HTTP API,
// package api). Components add their own routes to it.
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
			err := checks[n](ctx)
			var degraded *DegradedError
			switch {
			case err == nil:
				status[n] = "ok"
			case errors.As(err, &degraded):
				status[n] = degraded.State
			default:
				status[n] = err.Error()
				ready = false
			}
		}
		if !ready {
			p := schemas.NewProblem(schemas.ProblemNotReady, "not ready")
			body, _ := json.Marshal(status)
			p.Detail = "not ready: " + string(body)
			p.Write(w)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(status)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.Handle("GET /openapi.yaml", api.Handler())
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
	t, detail := schemas.ProblemNotFound, "no such endpoint"
	if code == http.StatusMethodNotAllowed {
		t, detail = schemas.ProblemMethodNotAllowed, "method not allowed; see the Allow header"
	} else {
		// The mux also redirects an unclean path (//x, /a/../b) that,
		// cleaned, matches nothing either, and answers 400 to a request
		// for *: both are no endpoint, so 404 not-found, without the
		// redirect's Location.
		s.ResponseWriter.Header().Del("Location")
	}
	schemas.NewProblem(t, detail).Write(s.ResponseWriter)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if !s.wrote {
		s.WriteHeader(http.StatusNotFound)
	}
	return len(b), nil
}

// Defaults of Timeouts.
const (
	DefaultReadHeaderTimeout = 10 * time.Second
	DefaultReadTimeout       = time.Minute
	DefaultIdleTimeout       = 2 * time.Minute
)

// Timeouts bound how long a client may hold a connection without sending
// what it owes, so slow or stalled clients cannot pile up (docs/architecture.md#money-safety).
// Zero fields take the defaults.
type Timeouts struct {
	// ReadHeader bounds reading a request's headers (default 10s).
	ReadHeader time.Duration
	// Read bounds reading a whole request, headers and body (default 1m: a
	// 5 MiB body needs at least ~90 KB/s). It ends once the body is read
	// (net/http lifts the deadline then), so a handler that runs long
	// afterwards, such as a report, keeps its context.
	Read time.Duration
	// Idle bounds a keep-alive connection between requests (default 2m).
	Idle time.Duration
}

func (t Timeouts) withDefaults() Timeouts {
	if t.ReadHeader <= 0 {
		t.ReadHeader = DefaultReadHeaderTimeout
	}
	if t.Read <= 0 {
		t.Read = DefaultReadTimeout
	}
	if t.Idle <= 0 {
		t.Idle = DefaultIdleTimeout
	}
	return t
}

// Server runs an HTTP server until ctx ends, then shuts it down gracefully:
// it stops accepting and waits up to grace for in-flight requests. Every
// request's headers and body are read within the bounds of t.
func Server(ctx context.Context, ln net.Listener, h http.Handler, t Timeouts, grace time.Duration, log *slog.Logger) error {
	t = t.withDefaults()
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: t.ReadHeader,
		ReadTimeout:       t.Read,
		IdleTimeout:       t.Idle,
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
