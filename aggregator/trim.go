package aggregator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/ctxtime"
	"github.com/meterd/meterd/internal/promreg"
	"github.com/meterd/meterd/internal/quiet"
	"github.com/meterd/meterd/schemas"
)

// DefaultTrimEvery is how often a Trimmer runs by default.
const DefaultTrimEvery = 30 * time.Second

// TrimmerConfig configures a Trimmer.
type TrimmerConfig struct {
	// NATS is the connection to JetStream. Required.
	NATS *nats.Conn
	// Durables are the aggregators' consumers whose acknowledged batches
	// are trimmed, each on its own subjects (default DefaultDurable alone;
	// one per partition when aggregators share them).
	Durables []string
	// Every is how often the stream is trimmed and measured (default 30s).
	Every      time.Duration
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Trimmer removes from METERD_USAGE the batches the aggregator has
// acknowledged, and reports how full METERD_USAGE and METERD_DLQ are.
//
// METERD_USAGE has no MaxAge (unconsumed usage never ages out) and is
// bounded by bytes with DiscardNew: when full, publishes fail and collectors
// spool, then answer 429. Committed batches must therefore leave the stream,
// or it would fill with them and refuse new usage. They are purged below the
// consumer's ack floor, which only moves past a message once it was
// committed (or dead-lettered), so nothing unconsumed is ever removed.
type Trimmer struct {
	cfg TrimmerConfig
	log *slog.Logger
	js  jetstream.JetStream

	// The fill of each stream: bytes held and the byte bound.
	usageBytes, usageLimit      prometheus.Gauge
	dlqBytes, dlqLimit, dlqMsgs prometheus.Gauge
}

// NewTrimmer builds a Trimmer.
func NewTrimmer(cfg TrimmerConfig) (*Trimmer, error) {
	if cfg.NATS == nil {
		return nil, errors.New("aggregator: trimmer needs a NATS connection")
	}
	if len(cfg.Durables) == 0 {
		cfg.Durables = []string{DefaultDurable}
	}
	orDefault(&cfg.Every, DefaultTrimEvery)
	quiet.Defaults(&cfg.Logger, &cfg.Registerer)
	js, err := jetstream.New(cfg.NATS)
	if err != nil {
		return nil, fmt.Errorf("aggregator: jetstream: %w", err)
	}
	s := promreg.On(cfg.Registerer)
	t := &Trimmer{
		cfg: cfg, log: cfg.Logger.With("component", "trimmer"), js: js,
		usageBytes: s.Gauge("meterd_aggregator_usage_stream_bytes", "Bytes held by METERD_USAGE: batches not yet committed (committed ones are trimmed)."),
		usageLimit: s.Gauge("meterd_aggregator_usage_stream_limit_bytes", "The byte bound of METERD_USAGE: past it, publishes fail and collectors spool, then answer 429."),
		dlqBytes:   s.Gauge("meterd_aggregator_dlq_bytes", "Bytes held by METERD_DLQ."),
		dlqLimit:   s.Gauge("meterd_aggregator_dlq_limit_bytes", "The byte bound of METERD_DLQ: past it, dead letters stay in METERD_USAGE."),
		dlqMsgs:    s.Gauge("meterd_aggregator_dlq_messages", "Batches in METERD_DLQ: usage not counted until replayed (meterd dlq)."),
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	return t, nil
}

// Run trims and measures every Every until ctx ends; it returns nil then.
// Failures are logged and retried at the next round.
func (t *Trimmer) Run(ctx context.Context) error {
	ctxtime.Every(ctx, t.cfg.Every, func() {
		rctx, cancel := context.WithTimeout(ctx, t.cfg.Every)
		defer cancel()
		if err := t.Trim(rctx); err != nil && ctx.Err() == nil {
			t.log.Warn("trim the usage stream", "err", err)
		}
	})
	return nil
}

// Trim purges the committed batches of METERD_USAGE once and updates the
// stream gauges.
func (t *Trimmer) Trim(ctx context.Context) error {
	var errs []error
	if err := t.purge(ctx); err != nil {
		errs = append(errs, err)
	}
	for _, st := range []struct {
		name         string
		bytes, limit prometheus.Gauge
		msgs         prometheus.Gauge
	}{{schemas.UsageStream, t.usageBytes, t.usageLimit, nil}, {schemas.DLQStream, t.dlqBytes, t.dlqLimit, t.dlqMsgs}} {
		s, err := t.js.Stream(ctx, st.name)
		if err != nil {
			errs = append(errs, fmt.Errorf("stream %s: %w", st.name, err))
			continue
		}
		info := s.CachedInfo()
		st.bytes.Set(float64(info.State.Bytes))
		st.limit.Set(float64(info.Config.MaxBytes))
		if st.msgs != nil {
			st.msgs.Set(float64(info.State.Msgs))
		}
	}
	return errors.Join(errs...)
}

func (t *Trimmer) purge(ctx context.Context) error {
	s, err := t.js.Stream(ctx, schemas.UsageStream)
	if err != nil {
		return fmt.Errorf("stream %s: %w", schemas.UsageStream, err)
	}
	var errs []error
	for _, d := range t.cfg.Durables {
		errs = append(errs, t.purgeBelow(ctx, s, d))
	}
	return errors.Join(errs...)
}

// purgeBelow purges the subjects of durable's consumer below its ack floor.
func (t *Trimmer) purgeBelow(ctx context.Context, s jetstream.Stream, durable string) error {
	cons, err := s.Consumer(ctx, durable)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		return nil // not created yet: nothing is committed through it
	}
	if err != nil {
		return fmt.Errorf("consumer %s: %w", durable, err)
	}
	info := cons.CachedInfo()
	floor := info.AckFloor.Stream
	if floor == 0 {
		return nil
	}
	subjects := info.Config.FilterSubjects
	if info.Config.FilterSubject != "" {
		subjects = append(subjects, info.Config.FilterSubject)
	}
	for _, subj := range subjects {
		// Every message of subj up to the floor was acknowledged (committed
		// or dead-lettered); the floor itself goes too.
		if err := s.Purge(ctx, jetstream.WithPurgeSubject(subj), jetstream.WithPurgeSequence(floor+1)); err != nil {
			return fmt.Errorf("purge %s below %d: %w", subj, floor+1, err)
		}
	}
	return nil
}
