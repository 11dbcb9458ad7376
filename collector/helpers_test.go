package collector

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/broker"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// testBroker is the shared restartable JetStream of internal/jstest, with
// the streams of docs/architecture.md#nats-names-and-stores, and what the
// collector's tests ask of it.
type testBroker struct {
	*jstest.Server
	t testing.TB
	// js is the test's own connection (the oracle's), never the collector's.
	js jetstream.JetStream
}

// startTestBroker starts a testBroker on a free port and creates the streams
// (1 replica). The server stops at the end of the test.
func startTestBroker(t testing.TB) *testBroker {
	t.Helper()
	s := jstest.Start(t, jstest.Config{Streams: true})
	return &testBroker{Server: s, t: t, js: s.JetStream()}
}

// StreamMsgs is the number of messages (batches) in METERD_USAGE.
func (b *testBroker) StreamMsgs() uint64 {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.t.Context(), 5*time.Second)
	defer cancel()
	s, err := b.js.Stream(ctx, schemas.UsageStream)
	if err != nil {
		b.t.Fatalf("stream %s: %v", schemas.UsageStream, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		b.t.Fatalf("stream %s info: %v", schemas.UsageStream, err)
	}
	return info.State.Msgs
}

// SetMaxMsgSize sets METERD_USAGE's MaxMsgSize, the bound a collector
// reads from the server, to n bytes.
func (b *testBroker) SetMaxMsgSize(n int32) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.t.Context(), 10*time.Second)
	defer cancel()
	s, err := b.js.Stream(ctx, schemas.UsageStream)
	if err != nil {
		b.t.Fatal(err)
	}
	sc := s.CachedInfo().Config
	sc.MaxMsgSize = n
	if _, err := b.js.UpdateStream(ctx, sc); err != nil {
		b.t.Fatal(err)
	}
}

// testLogger logs errors to the test's output. Fault tests provoke the
// warnings on purpose and assert the metrics instead.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelError}))
}

// connectTestNATS dials url with broker.Connect (reconnecting forever) and
// closes the connection at the end of the test. Register it before the
// collector using it, so cleanups stop the collector first.
func connectTestNATS(t testing.TB, url, name string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := broker.Connect(broker.ConnConfig{URL: url, Name: name, Logger: testLogger(t), Options: opts})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// testCollector is a Collector behind a real HTTP server with its Run
// loop in a goroutine and its own metrics registry.
type testCollector struct {
	*Collector
	reg  *prometheus.Registry
	srv  *httptest.Server
	stop context.CancelFunc
	done chan error

	shutdownOnce sync.Once
	runErr       error
}

// startTestCollector builds a collector from cfg (Keys default to
// auth.Open(), SpoolDir to a temporary directory, Registerer to a new
// registry), serves it with httptest and runs it until the end of the test.
func startTestCollector(t testing.TB, cfg Config) *testCollector {
	t.Helper()
	reg := prometheus.NewRegistry()
	if cfg.Keys == nil {
		cfg.Keys = auth.Open()
	}
	if cfg.SpoolDir == "" {
		cfg.SpoolDir = t.TempDir()
	}
	if cfg.Name == "" {
		cfg.Name = "test"
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	cfg.Registerer = reg
	col, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	col.Register(mux)
	ctx, stop := context.WithCancel(context.Background())
	tc := &testCollector{Collector: col, reg: reg, srv: httptest.NewServer(mux), stop: stop, done: make(chan error, 1)}
	go func() { tc.done <- col.Run(ctx) }()
	t.Cleanup(func() {
		if err := tc.Shutdown(); err != nil {
			t.Errorf("collector shutdown: %v", err)
		}
		if err := col.Close(); err != nil {
			t.Errorf("collector close: %v", err)
		}
	})
	return tc
}

// URL is the collector's POST /v1/events endpoint.
func (tc *testCollector) URL() string { return tc.srv.URL + "/v1/events" }

// Shutdown stops the collector the way main does: the HTTP server first
// (in-flight requests finish), then Run, whose error it returns. It does not
// Close the collector. It is idempotent.
func (tc *testCollector) Shutdown() error {
	tc.shutdownOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := tc.srv.Config.Shutdown(ctx)
		tc.srv.Close()
		tc.stop()
		select {
		case rerr := <-tc.done:
			err = errors.Join(err, rerr)
		case <-ctx.Done():
			err = errors.Join(err, errors.New("Run did not return"))
		}
		tc.runErr = err
	})
	return tc.runErr
}

// Metric is the value of the collector's metric name with the given label
// pairs (name, value, …); see metricValue.
func (tc *testCollector) Metric(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	return metrictest.Value(t, tc.reg, name, labels...)
}

// WaitSpoolEmpty waits until meterd_collector_spool_batches is 0.
func (tc *testCollector) WaitSpoolEmpty(t testing.TB, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for tc.Metric(t, "meterd_collector_spool_batches") > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("spool still holds %v batches after %v", tc.Metric(t, "meterd_collector_spool_batches"), timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// eventKey is the idempotency key of a usage event.
type eventKey struct{ tenant, id string }

// readUsageStream reads every batch in METERD_USAGE with an ordered
// consumer and returns how often each event occurs and how many batches
// there are. It fails the test on a batch it cannot decode and on a batch_id
// stored twice (JetStream dedups publishes by Nats-Msg-Id).
func readUsageStream(t testing.TB, js jetstream.JetStream) (map[eventKey]int, int) {
	t.Helper()
	events := make(map[eventKey]int)
	batchIDs := map[string]uint64{}
	read := 0
	jstest.Messages(t, js, schemas.UsageStream, func(m jetstream.Msg) {
		read++
		meta, err := m.Metadata()
		if err != nil {
			t.Fatal(err)
		}
		b, err := schemas.DecodeBatch(m.Headers().Get(schemas.HeaderContentType), m.Data())
		if err != nil {
			t.Fatalf("stream seq %d: %v", meta.Sequence.Stream, err)
		}
		if seq, dup := batchIDs[b.ID]; dup {
			t.Errorf("batch %s is stored twice: stream seq %d and %d", b.ID, seq, meta.Sequence.Stream)
		}
		batchIDs[b.ID] = meta.Sequence.Stream
		if got := m.Headers().Get(jetstream.MsgIDHeader); got != b.ID {
			t.Errorf("stream seq %d: Nats-Msg-Id %q, batch_id %q", meta.Sequence.Stream, got, b.ID)
		}
		for _, e := range b.Events {
			events[eventKey{e.Tenant, e.ID}]++
		}
	})
	return events, read
}
