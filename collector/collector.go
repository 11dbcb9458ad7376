// Package collector is the sidecar API gateways report usage to: it
// validates events, seals them into batches and publishes each batch to
// JetStream with its batch_id as Nats-Msg-Id, answering 202 only once the
// batch is acknowledged by JetStream or fsync'd in the on-disk spool.
//
// The money-safety rules (docs/architecture.md#money-safety) hold here: a batch is sealed by encoded bytes under the
// server's message size limit, so JetStream never refuses one for its size;
// a request is all or nothing, because it reserves spool room for all of its
// events before any is placed (the argument is on the pipeline type); and a
// spooled batch JetStream refuses for good is set aside (spool.SetAsideDir) rather
// than blocking the spool.
package collector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/collector/spool"
	"github.com/meterd/meterd/gate"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/quiet"
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
	DefaultSpoolMaxBytes      = spool.DefaultMaxBytes
	DefaultSpoolRetryAfterSec = 5
	// OverloadedRetryAfterSec is the Retry-After of a request shed because
	// the bodies in flight hold MaxInflightBodyBytes: they finish in
	// moments.
	OverloadedRetryAfterSec = 1
	// MinBatchMaxBytes is the least Config.BatchMaxBytes: a batch's envelope
	// and an ordinary event. Below the largest valid event (16 dimensions of
	// 256 characters escaped to 6 bytes each at worst: about 26 KB), such
	// events are refused with 413.
	MinBatchMaxBytes = 4 << 10
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
	// BatchMaxBytes lowers the bound of a batch's encoding. The bound is
	// read from the server at start: METERD_USAGE's MaxMsgSize, or else the
	// server's max_payload, minus 16 KiB of headroom for headers; 0 or a
	// larger value keeps it. An event that cannot fit in a batch alone is
	// refused with 413.
	BatchMaxBytes int
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
	// GRPC bounds the Envoy ext_authz gRPC server (ServeGRPC), which
	// answers as /v1/check does.
	GRPC GRPCLimits
	// MaxEventAge is the late-event bound (default 35 days).
	MaxEventAge time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Logger receives the collector's logs; nil discards them.
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
	if c.BatchMaxEvents < 0 || c.PublishWorkers < 0 || c.Partitions < 0 || c.MaxBodyBytes < 0 || c.MaxInflightBodyBytes < 0 || c.BatchMaxBytes < 0 {
		errs = append(errs, errors.New("collector: sizes must not be negative"))
	}
	if c.BatchMaxBytes > 0 && c.BatchMaxBytes < MinBatchMaxBytes {
		errs = append(errs, fmt.Errorf("collector: BatchMaxBytes %d is below %d: a batch would hold hardly an event", c.BatchMaxBytes, MinBatchMaxBytes))
	}
	if err := c.GRPC.validate(); err != nil {
		errs = append(errs, err)
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
	quiet.Defaults(&c.Logger, &c.Registerer)
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
	c := &Collector{cfg: cfg, log: log, js: js, spool: sp, inflight: inflight}
	limit, source := c.batchLimit()
	c.pipe = newPipeline(c, limit)
	m, err := newMetrics(cfg.Registerer, sp, cfg.SpoolMaxBytes, inflight, c.pipe.Reserved)
	if err != nil {
		sp.Close()
		return nil, err
	}
	c.metrics = m
	m.batchLimit.Set(float64(limit))
	log.Info("batches are bounded by bytes", "batch_max_bytes", limit, "from", source)
	if n := sp.SetAsideCount(); n > 0 {
		log.Error("batches set aside by an earlier run wait for an operator", "batches", n,
			"dir", filepath.Join(cfg.SpoolDir, spool.SetAsideDir))
	}
	if n := sp.Len(); n > 0 {
		log.Info("spool holds batches from an earlier run; replaying them", "batches", n, "bytes", sp.Bytes())
	}
	return c, nil
}

// batchLimit is the bound of a batch's encoding (Config.BatchMaxBytes) and
// where it came from. It asks a connected server once, for up to
// PublishTimeout; a collector starting while NATS is away does not wait.
func (c *Collector) batchLimit() (int, string) {
	limit, source := int64(0), ""
	if c.cfg.NATS.IsConnected() {
		if p := c.cfg.NATS.MaxPayload(); p > 0 {
			limit, source = p, "the server's max_payload"
		}
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.PublishTimeout)
		defer cancel()
		if s, err := c.js.Stream(ctx, schemas.UsageStream); err == nil {
			if m := int64(s.CachedInfo().Config.MaxMsgSize); m > 0 && (limit == 0 || m < limit) {
				limit, source = m, "the MaxMsgSize of stream "+schemas.UsageStream
			}
		} else {
			c.log.Warn("cannot read the MaxMsgSize of the usage stream; bounding batches by max_payload",
				"stream", schemas.UsageStream, "err", err)
		}
	}
	if limit == 0 {
		c.log.Warn("NATS is away at start: bounding batches by the NATS default max_payload until a restart",
			"max_payload", fallbackMaxPayload)
		limit, source = fallbackMaxPayload, "the NATS default max_payload (NATS did not answer)"
	}
	limit -= batchHeadroom
	if b := int64(c.cfg.BatchMaxBytes); b > 0 && b < limit {
		limit, source = b, "BatchMaxBytes"
	}
	return int(max(limit, 1)), source
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
// connected, or it is not and the spool has room (beside the room requests
// in flight reserved) for a request of the largest size (MaxBodyBytes). In
// the second case the collector is ready but degraded (serve.Degraded): its
// gateway stays in service and /readyz says that events are being spooled.
// Batches set aside make it degraded too, not unready: the collector still
// accepts and delivers every other event.
func (c *Collector) Ready(context.Context) error {
	var states []string
	if !c.cfg.NATS.IsConnected() {
		nats := "nats: " + strings.ToLower(c.cfg.NATS.Status().String())
		used := c.spool.Bytes() + c.pipe.Reserved()
		if c.cfg.SpoolMaxBytes-used < c.cfg.MaxBodyBytes {
			return fmt.Errorf("%s and the spool is full (%d of %d bytes used or reserved, less room than one request may take): events are answered 429",
				nats, used, c.cfg.SpoolMaxBytes)
		}
		states = append(states, fmt.Sprintf("%s, spooling (%d batches, %d of %d bytes used or reserved)", nats, c.spool.Len(), used, c.cfg.SpoolMaxBytes))
	}
	if n := c.spool.SetAsideCount(); n > 0 {
		states = append(states, fmt.Sprintf("%d spooled batches JetStream refuses for good are set aside in %s; replay their events and remove them",
			n, filepath.Join(c.cfg.SpoolDir, spool.SetAsideDir)))
	}
	if len(states) > 0 {
		return serve.Degraded(strings.Join(states, "; "))
	}
	return nil
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
