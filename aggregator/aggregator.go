// Package aggregator consumes sealed usage batches from JetStream and writes
// them to a Store with exactly-once effect: a message is acknowledged only
// after the store made its events durable, and the store counts each event
// (tenant, id) once however often its batch is delivered. After each commit
// the newly counted usage is published on meterd.committed.<partition> for
// the enforcer.
package aggregator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/schemas"
)

// Defaults of Config.
const (
	DefaultDurable    = "meterd-aggregator"
	DefaultFetchBatch = 20
	CatchUpFactor     = 5 // CatchUpBatch is FetchBatch times this by default
	DefaultFetchWait  = 100 * time.Millisecond
	DefaultAckWait    = 10 * time.Second
	DefaultStallAfter = time.Minute
)

// Config configures an Aggregator.
type Config struct {
	// NATS is the connection to consume from and publish increments on. Required.
	NATS *nats.Conn
	// Store receives the batches. Required.
	Store Store
	// Durable names the pull consumer on METERD_USAGE (default meterd-aggregator).
	Durable string
	// Partitions is P of meterd.committed.<partition> (default 16).
	Partitions int
	// FetchBatch messages at most are written per store flush (default 20
	// batches, 10 000 events at 500 a batch: small enough that committed
	// usage reaches the enforcer within the freshness budget, large enough
	// for ClickHouse); FetchWait bounds how long a flush waits to fill up
	// (default 100ms).
	FetchBatch int
	FetchWait  time.Duration
	// CatchUpBatch messages at most are written per flush instead while at
	// least that many wait (default CatchUpFactor × FetchBatch; FetchBatch
	// or less turns it off). Behind by that much, freshness is lost to the
	// backlog anyway, and larger flushes drain it faster: both stores spend
	// much of a flush's cost per flush, not per event.
	CatchUpBatch int
	// AckWait is JetStream's redelivery timer; long store writes are kept
	// alive with InProgress (default 10s).
	AckWait time.Duration
	// StallAfter: /readyz fails when messages are pending and nothing was
	// committed for this long (default 1m).
	StallAfter time.Duration
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Validate checks c and fills in defaults.
func (c *Config) Validate() error {
	if c.NATS == nil {
		return errors.New("aggregator: NATS connection is required")
	}
	if c.Store == nil {
		return errors.New("aggregator: store is required")
	}
	if c.Durable == "" {
		c.Durable = DefaultDurable
	}
	if c.Partitions <= 0 {
		c.Partitions = schemas.DefaultPartitions
	}
	if c.FetchBatch <= 0 {
		c.FetchBatch = DefaultFetchBatch
	}
	if c.CatchUpBatch == 0 {
		c.CatchUpBatch = CatchUpFactor * c.FetchBatch
	}
	c.CatchUpBatch = max(c.CatchUpBatch, c.FetchBatch)
	if c.FetchWait <= 0 {
		c.FetchWait = DefaultFetchWait
	}
	if c.AckWait <= 0 {
		c.AckWait = DefaultAckWait
	}
	if c.StallAfter <= 0 {
		c.StallAfter = DefaultStallAfter
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
	return nil
}

// Aggregator moves batches from JetStream into a Store.
type Aggregator struct {
	cfg     Config
	log     *slog.Logger
	js      jetstream.JetStream
	metrics *metrics

	consumer   atomic.Pointer[jetstream.Consumer]
	lastCommit atomic.Int64 // unix nanos of the last commit, or of a fetch that found nothing
	flushSince atomic.Int64 // unix nanos the running flush started, 0 when none runs
	pending    atomic.Int64 // messages not yet delivered, as of the last fetch
	oldest     atomic.Int64 // unix nanos JetStream stored the first message of the group being written, 0 between writes
	// storeFailure is set while store writes fail and are retried, nil
	// once one succeeds.
	storeFailure atomic.Pointer[storeFailure]
}

// New builds an Aggregator; Run creates its consumer.
func New(cfg Config) (*Aggregator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	js, err := jetstream.New(cfg.NATS)
	if err != nil {
		return nil, fmt.Errorf("aggregator: jetstream: %w", err)
	}
	a := &Aggregator{cfg: cfg, log: cfg.Logger.With("component", "aggregator"), js: js}
	a.metrics, err = newMetrics(cfg.Registerer, a.lagSeconds, a.storeFailingSeconds)
	if err != nil {
		return nil, err
	}
	a.lastCommit.Store(time.Now().UnixNano())
	return a, nil
}

// ConsumerConfig is the durable pull consumer the aggregator reads through.
func (a *Aggregator) ConsumerConfig() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       a.cfg.Durable,
		Description:   "meterd aggregator: usage batches into the store",
		FilterSubject: schemas.UsageSubjects,
		AckPolicy:     jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckWait:       a.cfg.AckWait,
		// Unlimited: a message is dead-lettered for what it holds (it cannot
		// be decoded or stored), never for how often it was delivered. A
		// store outage across aggregator restarts redelivers valid batches
		// many times, and a server-side bound would drop them silently.
		MaxDeliver: -1,
		// The writer's group, the one waiting for it and the one being
		// fetched, with room to spare.
		MaxAckPending: 4 * a.cfg.CatchUpBatch,
	}
}

// Run consumes until ctx ends. It returns nil on cancellation; the messages
// of an unfinished flush are redelivered and counted once.
func (a *Aggregator) Run(ctx context.Context) error {
	var cons jetstream.Consumer
	err := backoff.Retry(func() error {
		c, err := a.js.CreateOrUpdateConsumer(ctx, schemas.UsageStream, a.ConsumerConfig())
		if err != nil {
			if ctx.Err() != nil {
				return backoff.Permanent(ctx.Err())
			}
			a.log.Warn("create consumer; retrying", "err", err)
			return err
		}
		cons = c
		return nil
	}, backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithMaxElapsedTime(0)), ctx))
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("aggregator: consumer: %w", err)
	}
	a.consumer.Store(&cons)
	// The next group of messages is fetched and decoded while the store
	// writes the current one; groups are written, and their increments
	// published, in the order they were fetched.
	groups := make(chan group, 1)
	var reader sync.WaitGroup
	reader.Go(func() {
		defer close(groups)
		a.read(ctx, cons, groups)
	})
	for g := range groups {
		if ctx.Err() == nil {
			// The group being written holds the oldest uncommitted batch;
			// the reader may already have fetched past it.
			a.oldest.Store(g.stored)
			if err := a.flush(ctx, g); err != nil && ctx.Err() == nil {
				a.log.Error("flush failed", "err", err)
			}
			a.oldest.Store(0)
		}
		g.stopKeepAlive()
	}
	reader.Wait()
	return nil
}

// group is the messages of one store write and their decoded batches, kept
// alive with InProgress from the fetch until stopKeepAlive.
type group struct {
	msgs          []jetstream.Msg
	batches       []*schemas.Batch
	stopKeepAlive func()
	// stored is when JetStream stored the group's first message (unix
	// nanos), 0 if unknown: the consumer lag while the group is written.
	stored int64
}

// read fetches and decodes groups into out until ctx ends. Undecodable
// messages are dead-lettered here and never reach out.
func (a *Aggregator) read(ctx context.Context, cons jetstream.Consumer, out chan<- group) {
	for ctx.Err() == nil {
		msgs, err := a.fetch(ctx, cons)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			a.log.Warn("fetch failed", "err", err)
			sleep(ctx, 250*time.Millisecond)
			continue
		}
		if len(msgs) == 0 {
			a.lastCommit.Store(time.Now().UnixNano())
			continue
		}
		g := a.decode(msgs)
		if len(g.msgs) == 0 {
			continue
		}
		if md, err := g.msgs[0].Metadata(); err == nil {
			g.stored = md.Timestamp.UnixNano()
		}
		g.stopKeepAlive = a.keepAlive(g.msgs)
		select {
		case out <- g:
		case <-ctx.Done():
			g.stopKeepAlive()
			return
		}
	}
}

func (a *Aggregator) fetch(ctx context.Context, cons jetstream.Consumer) ([]jetstream.Msg, error) {
	n := a.cfg.FetchBatch
	if a.pending.Load() >= int64(a.cfg.CatchUpBatch) {
		n = a.cfg.CatchUpBatch
	}
	batch, err := cons.Fetch(n, jetstream.FetchMaxWait(a.cfg.FetchWait))
	if err != nil {
		return nil, err
	}
	var msgs []jetstream.Msg
	for m := range batch.Messages() {
		msgs = append(msgs, m)
	}
	if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) && len(msgs) == 0 {
		return nil, err
	}
	if n := len(msgs); n > 0 {
		if md, err := msgs[n-1].Metadata(); err == nil {
			a.pending.Store(int64(md.NumPending))
			a.metrics.lag.Set(float64(md.NumPending))
		}
	} else {
		a.pending.Store(0)
		a.metrics.lag.Set(0)
	}
	return msgs, ctx.Err()
}

// decode decodes msgs and dead-letters the undecodable ones.
func (a *Aggregator) decode(msgs []jetstream.Msg) group {
	g := group{msgs: make([]jetstream.Msg, 0, len(msgs)), batches: make([]*schemas.Batch, 0, len(msgs))}
	for _, m := range msgs {
		b, err := schemas.DecodeBatch(m.Headers().Get(schemas.HeaderContentType), m.Data())
		if err != nil {
			a.deadLetter(m, err.Error())
			continue
		}
		g.msgs = append(g.msgs, m)
		g.batches = append(g.batches, b)
	}
	return g
}

// flush writes g in one Apply and acknowledges its messages after it
// returned. A store failure is retried until it succeeds; an invalid batch
// is isolated and dead-lettered, so it never holds up the ones behind it.
func (a *Aggregator) flush(ctx context.Context, g group) error {
	start := time.Now()
	a.flushSince.Store(start.UnixNano())
	err := a.apply(ctx, g.msgs, g.batches)
	a.flushSince.Store(0)
	a.metrics.flushSeconds.Observe(time.Since(start).Seconds())
	return err
}

// apply writes batches (of msgs) and acks them. A store error of any kind
// (down, read-only, a lock, too many parts, a timeout, a missing table) is
// retried with backoff for as long as it lasts, and readiness fails
// meanwhile: the batches are valid, only the store is not writing, and
// dead-lettering them would leave accepted usage unbilled. Only
// ErrInvalidEvent, which fails the same way on every try, isolates the
// group: each message is applied on its own and the invalid ones are
// dead-lettered. The caller keeps msgs alive.
func (a *Aggregator) apply(ctx context.Context, msgs []jetstream.Msg, batches []*schemas.Batch) error {
	bo := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second),
		backoff.WithMaxElapsedTime(0),
	)
	for {
		start := time.Now()
		incs, err := a.cfg.Store.Apply(ctx, batches)
		a.metrics.storeSeconds.Observe(time.Since(start).Seconds())
		if err == nil {
			a.storeFailure.Store(nil)
			a.committed(incs, batches)
			a.ack(msgs)
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		a.metrics.storeErrors.Inc()
		if errors.Is(err, ErrInvalidEvent) {
			// Apply wrote nothing; the store is fine.
			if len(msgs) == 1 {
				a.deadLetter(msgs[0], "invalid batch: "+err.Error())
				return nil
			}
			a.log.Warn("a batch of the flush is invalid; applying its batches one by one", "err", err, "batches", len(batches))
			for i := range msgs {
				if err := a.apply(ctx, msgs[i:i+1], batches[i:i+1]); err != nil {
					return err
				}
			}
			return nil
		}
		since := start
		if f := a.storeFailure.Load(); f != nil {
			since = f.since
		}
		a.storeFailure.Store(&storeFailure{since: since, err: err})
		wait := bo.NextBackOff()
		a.log.Warn("store write failed; retrying until it succeeds", "err", err, "batches", len(batches),
			"failing_for", time.Since(since).Round(time.Millisecond), "retry_in", wait)
		if !sleep(ctx, wait) {
			return ctx.Err()
		}
	}
}

// storeFailure is the state of a store that keeps failing writes: since when
// (the start of the first failed Apply) and the last error.
type storeFailure struct {
	since time.Time
	err   error
}

// storeFailingSeconds is how long store writes have been failing, 0 while
// they succeed.
func (a *Aggregator) storeFailingSeconds() float64 {
	f := a.storeFailure.Load()
	if f == nil {
		return 0
	}
	return time.Since(f.since).Seconds()
}

// keepAlive tells JetStream the messages are in progress every AckWait/3
// until the returned stop is called (idempotent).
func (a *Aggregator) keepAlive(msgs []jetstream.Msg) (stop func()) {
	done := make(chan struct{})
	var once sync.Once
	go func() {
		t := time.NewTicker(a.cfg.AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				for _, m := range msgs {
					m.InProgress()
				}
			}
		}
	}()
	return func() { once.Do(func() { close(done) }) }
}

func (a *Aggregator) ack(msgs []jetstream.Msg) {
	for _, m := range msgs {
		// A lost ack means a redelivery, which the store counts once.
		if err := m.Ack(); err != nil {
			a.log.Warn("ack failed; the batch will be redelivered and deduplicated", "err", err,
				"batch_id", m.Headers().Get(jetstream.MsgIDHeader))
		}
	}
	a.lastCommit.Store(time.Now().UnixNano())
}

func (a *Aggregator) committed(incs []Increment, batches []*schemas.Batch) {
	var sealed time.Time
	for _, b := range batches {
		if sealed.IsZero() || b.SealedAt.Before(sealed) {
			sealed = b.SealedAt
		}
	}
	var events int64
	for _, inc := range incs {
		events += inc.Events
		data, _ := json.Marshal(schemas.Committed{Tenant: inc.Tenant, Meter: inc.Meter, Hour: inc.Hour, Value: inc.Value, Events: inc.Events, SealedAt: sealed})
		subject := schemas.CommittedSubject(schemas.Partition(inc.Tenant, a.cfg.Partitions))
		// Core NATS, at most once: the enforcer reconciles from the store.
		if err := a.cfg.NATS.Publish(subject, data); err != nil {
			a.log.Warn("publish committed increment", "err", err, "tenant", inc.Tenant)
		}
	}
	var received int64
	for _, b := range batches {
		received += int64(len(b.Events))
	}
	a.metrics.batches.Add(float64(len(batches)))
	a.metrics.events.Add(float64(events))
	a.metrics.duplicates.Add(float64(received - events))
}

// maxReason bounds the reason header of a dead letter, so that the copy of a
// batch near the maximum message size still fits.
const maxReason = 1024

// deadLetter copies m to meterd.dlq.<subject> with the reason in a header and
// terminates it on the usage stream. If the DLQ publish fails, m is left
// unacknowledged and comes back: nothing is dropped silently.
func (a *Aggregator) deadLetter(m jetstream.Msg, reason string) {
	dlq := &nats.Msg{Subject: schemas.DLQSubjectPrefix + m.Subject(), Data: m.Data(), Header: nats.Header{}}
	for k, v := range m.Headers() {
		dlq.Header[k] = v
	}
	if len(reason) > maxReason {
		reason = strings.ToValidUTF8(reason[:maxReason], "") + "…"
	}
	dlq.Header.Set(schemas.HeaderDLQReason, reason)
	if id := m.Headers().Get(jetstream.MsgIDHeader); id != "" {
		dlq.Header.Set(schemas.HeaderDLQBatchID, id)
	}
	// The batch_id and the stream sequence find the batch again: in the
	// DLQ, in the collector's logs, in METERD_USAGE.
	log := a.log.With("batch_id", m.Headers().Get(jetstream.MsgIDHeader), "subject", m.Subject())
	if md, err := m.Metadata(); err == nil {
		dlq.Header.Set(schemas.HeaderDLQStreamSeq, strconv.FormatUint(md.Sequence.Stream, 10))
		log = log.With("stream_seq", md.Sequence.Stream, "deliveries", md.NumDelivered)
	}
	dlq.Header.Del(jetstream.MsgIDHeader) // the DLQ keeps every copy
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := a.js.PublishMsg(ctx, dlq, jetstream.WithExpectStream(schemas.DLQStream)); err != nil {
		log.Error("dead-letter publish failed; the message will be redelivered", "err", err, "reason", reason)
		m.NakWithDelay(time.Second)
		return
	}
	a.metrics.deadLettered.Inc()
	log.Error("message dead-lettered", "reason", reason)
	m.TermWithReason(reason)
}

// lagSeconds is the time since JetStream stored the oldest batch not yet
// committed (the first of the group being written), 0 between writes.
func (a *Aggregator) lagSeconds() float64 {
	oldest := a.oldest.Load()
	if oldest == 0 {
		return 0
	}
	return max(time.Since(time.Unix(0, oldest)).Seconds(), 0)
}

// Ready fails when the store is unreachable or its writes are failing (a
// store that answers a ping may still refuse writes: a detached table, a
// lock, a read-only disk), or when messages are waiting and nothing was
// committed for StallAfter (a consumer that stopped making progress must not
// look healthy).
func (a *Aggregator) Ready(ctx context.Context) error {
	if err := a.cfg.Store.Ping(ctx); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if f := a.storeFailure.Load(); f != nil {
		return fmt.Errorf("store: writes failing for %s, retrying: %w", time.Since(f.since).Round(time.Second), f.err)
	}
	if a.consumer.Load() == nil {
		return errors.New("consumer not created yet")
	}
	if since := a.flushSince.Load(); since != 0 && time.Since(time.Unix(0, since)) > a.cfg.StallAfter {
		return fmt.Errorf("stalled: one flush has run for %s", time.Since(time.Unix(0, since)).Round(time.Second))
	}
	idle := time.Since(time.Unix(0, a.lastCommit.Load()))
	if a.pending.Load() > 0 && idle > a.cfg.StallAfter {
		return fmt.Errorf("stalled: %d messages pending, nothing committed for %s", a.pending.Load(), idle.Round(time.Second))
	}
	return nil
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
