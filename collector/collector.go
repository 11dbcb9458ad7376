// Package collector is the sidecar API gateways report usage to: it
// validates events, seals them into batches and publishes each batch to
// JetStream with its batch_id as Nats-Msg-Id, answering 202 only once the
// batch is acknowledged by JetStream or fsync'd in the on-disk spool.
package collector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/collector/spool"
	"github.com/meterd/meterd/enforcer/gate"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/serve"
	"github.com/meterd/meterd/schemas"
)

// Defaults of Config.
const (
	DefaultMaxBodyBytes       = 5 << 20
	DefaultBatchMaxEvents     = 500
	DefaultBatchMaxWait       = 50 * time.Millisecond
	DefaultPublishWorkers     = 8
	DefaultPublishRetry       = 2 * time.Second
	DefaultPublishTimeout     = 5 * time.Second
	DefaultSpoolMaxBytes      = 1 << 30
	DefaultSpoolRetryAfterSec = 5
	// OverloadedRetryAfterSec is the Retry-After of a request shed because
	// the bodies in flight hold MaxInflightBodyBytes: they finish in
	// moments.
	OverloadedRetryAfterSec = 1
)

// Config configures a Collector.
type Config struct {
	// Name identifies this collector in batches (default: host name).
	Name string
	// NATS is the connection batches are published on. Required.
	NATS *nats.Conn
	// Keys authenticates requests. Required; auth.Open() disables auth.
	Keys *auth.Keys
	// SpoolDir holds the spool. Required.
	SpoolDir string
	// SpoolMaxBytes bounds the spool on disk (default 1 GiB).
	SpoolMaxBytes int64
	// Partitions is P of meterd.usage.<partition> (default 16).
	Partitions int
	// MaxBodyBytes bounds a request body (default 5 MiB).
	MaxBodyBytes int64
	// MaxInflightBodyBytes bounds the body bytes (after decompression) of
	// all requests in flight; a request past it is answered 503 with
	// Retry-After, before its body is read. It must be at least
	// MaxBodyBytes (default: a sixteenth of the memory limit, GOMEMLIMIT, or
	// 64 MiB without one).
	MaxInflightBodyBytes int64
	// BatchMaxEvents and BatchMaxWait seal a batch at N events or T after
	// its first event, whichever comes first (defaults 500 and 50ms).
	BatchMaxEvents int
	BatchMaxWait   time.Duration
	// PublishWorkers publish sealed batches concurrently (default 8).
	PublishWorkers int
	// PublishRetry is how long a batch is retried against a connected NATS
	// before it goes to the spool (default 2s); PublishTimeout bounds one
	// attempt (default 5s).
	PublishRetry   time.Duration
	PublishTimeout time.Duration
	// Gate answers /v1/check from the blocklist. Without one, /v1/check is
	// not served.
	Gate Gate
	// TenantHeader names the tenant of a checked call when no tenant API key
	// does (default X-Tenant-ID).
	TenantHeader string
	// KnownTenant reports whether a tenant has a plan; /v1/check applies
	// UnknownTenantPolicy to the others (default: every tenant is known).
	KnownTenant         func(tenant string) bool
	UnknownTenantPolicy gate.Policy
	// DontRecordChecks stops /v1/check from recording allowed calls as
	// usage events (by default each is one event of X-Meter, X-Meter-Value).
	DontRecordChecks bool
	// MaxEventAge is the late-event bound (default 35 days).
	MaxEventAge time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Logger (default slog.Default()).
	Logger *slog.Logger
	// Registerer receives the collector's metrics (default: none kept).
	Registerer prometheus.Registerer
}

// Validate checks cfg and fills in defaults.
func (c *Config) Validate() error {
	var errs []error
	if c.NATS == nil {
		errs = append(errs, errors.New("collector: NATS connection is required"))
	}
	if c.Keys == nil {
		errs = append(errs, errors.New("collector: API keys are required (auth.Open() turns auth off)"))
	}
	if c.SpoolDir == "" {
		errs = append(errs, errors.New("collector: spool directory is required"))
	}
	if c.BatchMaxEvents < 0 || c.PublishWorkers < 0 || c.Partitions < 0 || c.MaxBodyBytes < 0 || c.MaxInflightBodyBytes < 0 {
		errs = append(errs, errors.New("collector: sizes must not be negative"))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if c.Name == "" {
		c.Name, _ = os.Hostname()
	}
	setDefault(&c.SpoolMaxBytes, DefaultSpoolMaxBytes)
	setDefault(&c.Partitions, schemas.DefaultPartitions)
	setDefault(&c.MaxBodyBytes, DefaultMaxBodyBytes)
	if c.MaxInflightBodyBytes == 0 {
		c.MaxInflightBodyBytes = defaultMaxInflightBodyBytes(c.MaxBodyBytes)
	} else if c.MaxInflightBodyBytes < c.MaxBodyBytes {
		return fmt.Errorf("collector: the bound of body bytes in flight (%d) is below the largest body (%d): such a body could never be accepted",
			c.MaxInflightBodyBytes, c.MaxBodyBytes)
	}
	setDefault(&c.BatchMaxEvents, DefaultBatchMaxEvents)
	setDefault(&c.BatchMaxWait, DefaultBatchMaxWait)
	setDefault(&c.PublishWorkers, DefaultPublishWorkers)
	setDefault(&c.PublishRetry, DefaultPublishRetry)
	setDefault(&c.PublishTimeout, DefaultPublishTimeout)
	setDefault(&c.MaxEventAge, schemas.DefaultMaxAge)
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.TenantHeader == "" {
		c.TenantHeader = DefaultTenantHeader
	}
	if c.KnownTenant == nil {
		c.KnownTenant = func(string) bool { return true }
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
	return nil
}

func setDefault[T int | int64 | time.Duration](v *T, def T) {
	if *v == 0 {
		*v = def
	}
}

// Collector ingests usage events. Mount its routes with Register, run its
// publishing pipeline with Run.
type Collector struct {
	cfg     Config
	log     *slog.Logger
	js      jetstream.JetStream
	spool   *spool.Spool
	metrics *metrics
	pipe    *pipeline
	// inflight bounds the body bytes of requests in flight.
	inflight *bodyBudget

	closeOnce sync.Once
	closeErr  error
}

// New opens the spool (replaying nothing yet) and builds the collector.
func New(cfg Config) (*Collector, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger.With("component", "collector")
	// A replay stops waiting for acks after PublishTimeout; without an async
	// timeout the client keeps those publishes (and their batches) pending
	// until the connection drops, and at 4000 pending it refuses new ones.
	js, err := jetstream.New(cfg.NATS, jetstream.WithPublishAsyncTimeout(cfg.PublishTimeout))
	if err != nil {
		return nil, fmt.Errorf("collector: jetstream: %w", err)
	}
	sp, err := spool.Open(spool.Config{Dir: cfg.SpoolDir, MaxBytes: cfg.SpoolMaxBytes, Logger: cfg.Logger})
	if err != nil {
		return nil, fmt.Errorf("collector: open spool: %w", err)
	}
	inflight := &bodyBudget{limit: cfg.MaxInflightBodyBytes}
	m, err := newMetrics(cfg.Registerer, sp, cfg.SpoolMaxBytes, inflight)
	if err != nil {
		sp.Close()
		return nil, err
	}
	c := &Collector{cfg: cfg, log: log, js: js, spool: sp, metrics: m, inflight: inflight}
	c.pipe = newPipeline(c)
	if n := sp.Len(); n > 0 {
		log.Info("spool holds batches from an earlier run; replaying them", "batches", n, "bytes", sp.Bytes())
	}
	return c, nil
}

// Register adds the collector's routes to mux.
func (c *Collector) Register(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/events", c.handleEvents)
	if c.cfg.Gate != nil {
		mux.HandleFunc("/v1/check", c.handleCheck)
		mux.HandleFunc("/v1/check/", c.handleCheck)
	}
}

// Ready reports whether the collector can accept events: NATS is
// connected, or it is not and the spool has room for a request of the
// largest size (MaxBodyBytes). In the second case the collector is ready but
// degraded (serve.Degraded): its gateway stays in service (DESIGN §9) and
// /readyz says that events are being spooled.
func (c *Collector) Ready(context.Context) error {
	if c.cfg.NATS.IsConnected() {
		return nil
	}
	nats := "nats: " + strings.ToLower(c.cfg.NATS.Status().String())
	used := c.spool.Bytes()
	if c.cfg.SpoolMaxBytes-used >= c.cfg.MaxBodyBytes {
		return serve.Degraded(fmt.Sprintf("%s, spooling (%d batches, %d of %d bytes)", nats, c.spool.Len(), used, c.cfg.SpoolMaxBytes))
	}
	return fmt.Errorf("%s and the spool is full (%d of %d bytes, less room than one request may take): events are answered 429",
		nats, used, c.cfg.SpoolMaxBytes)
}

// Run publishes sealed batches and replays the spool until ctx ends. Stop
// the HTTP server before cancelling ctx: Run then seals what is open,
// publishes or spools every batch that was accepted, and returns.
func (c *Collector) Run(ctx context.Context) error {
	return c.pipe.run(ctx)
}

// Close releases the spool. Call it after Run returned; it is idempotent.
func (c *Collector) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.spool.Close() })
	return c.closeErr
}
