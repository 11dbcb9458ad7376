// Package aggregator consumes sealed usage batches from JetStream and writes
// them to a Store with exactly-once effect: a message is acknowledged only
// after the store made its events durable, and the store counts each event
// (tenant, id) once however often its batch is delivered. After each commit
// the newly counted usage is published on meterd.committed.<partition> for
// the enforcer.
//
// # One writer
//
// A store counts each event once only if one process writes it (see
// aggregator/clickhouse). With Config.Lease set, the aggregator consumes and
// writes only while it holds the writer lease of its scope (internal/lease:
// a compare-and-set lease with a fencing token on a JetStream key-value
// bucket); a second aggregator for the same scope waits, ready as a standby,
// and takes over once the holder stops renewing. Every store write (Apply and
// Reconcile, through Writer) is renew-then-write: it renews the lease first,
// a compare-and-set on the revision of the holder's own last renewal that
// fails once another process took the lease over, and runs with a deadline
// before the renewed lease can be taken. A holder frozen past its lease
// (a zombie) therefore finds, when it wakes, either its write's deadline
// passed or its renewal refused: it abandons the write, stops consuming and
// waits for the lease again. Its unacknowledged messages are redelivered to
// the new holder, whose store counts each event once.
//
// # Aggregators that share the partitions
//
// N aggregators started with --share-partitions divide the usage partitions
// between them (aggregator/share) and run, for each partition p they own, an
// Aggregator of p alone: Subject meterd.usage.<p>, its own durable consumer
// (<durable>-p<p>), its own lease (key aggregator.<durable>.p<p>) and a store
// scoped to p's tenants (aggregator/clickhouse, Config.Partition). Each is
// exactly the Aggregator above, with p in place of "everything", so the
// arguments hold per partition unchanged:
//
//   - Exactly once: p's batches reach only p's consumer, acknowledged after
//     p's store made them durable; p's store is the only writer of p's
//     tenants (tenants are hashed to partitions, and the store refuses any
//     other tenant), and deduplicates as a single writer does.
//   - Fencing: p is written only under p's lease, renew-then-write with a
//     deadline before the lease can be taken over, as above. Two members
//     that both believe they own p (their views of the membership differ
//     for a moment, or one was frozen) are one holder and one standby of
//     p's lease; a zombie's renewal of p fails and it stops writing p. The
//     store's recovery when the writer changes (waiting for the previous
//     holder's inserts, repairing its open intents, catching the dedup index
//     up) runs per partition, over p's intents and tenants only: another
//     partition's open intent may be a write in progress, never p's.
//
// The membership only decides which member tries to take which lease; the
// leases decide who writes. A replica started without --share-partitions
// holds the lease of every partition (aggregator.<durable>.all): a shared
// member waits until it is free before it starts (the upgrade: stop the one
// aggregator, start N shared ones), and a single aggregator refuses to start
// while shared members are alive. A new partition consumer starts after the
// old consumer's ack floor (Config.StartAfter), so nothing it acknowledged
// is lost, and what it acknowledged past its floor is counted once.
//
// # A consumer that vanishes
//
// If the durable consumer is deleted (by an operator, or lost with a
// stream's state), the aggregator recreates it within seconds, starting at
// the last acknowledgement floor it read from the server (messages acked
// after that are delivered again and deduplicated by the store). Fetch
// errors are counted (meterd_aggregator_fetch_errors_total); while fetches
// fail, the consumer lag is estimated from the stream instead of reading 0,
// and /readyz fails once no fetch succeeded for half of StallAfter.
package aggregator

import (
	"cmp"
	"context"
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

	"github.com/meterd/meterd/internal/ctxtime"
	"github.com/meterd/meterd/internal/lease"
	"github.com/meterd/meterd/internal/quiet"
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
	// Subject is the consumer's filter: the usage partitions this
	// aggregator writes (default meterd.usage.>, all of them; one
	// partition's schemas.UsageSubject when aggregators share them).
	Subject string
	// StartAfter names a durable consumer whose acknowledgement floor a new
	// consumer starts after, if it exists: the consumer of one aggregator
	// of every partition, when aggregators start sharing them. What it
	// acknowledged past its floor is delivered again and counted once.
	StartAfter string
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
	// committed for this long, or when no fetch succeeded for half of it
	// (default 1m).
	StallAfter time.Duration
	// Lease, if set, is the writer lease of the store and partitions this
	// aggregator writes: it consumes only while holding it (see the package
	// documentation). Without a lease the aggregator assumes it is the only
	// writer.
	Lease Lease
	// Logger receives the aggregator's logs; nil discards them.
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
	c.Durable = cmp.Or(c.Durable, DefaultDurable)
	c.Subject = cmp.Or(c.Subject, schemas.UsageSubjects)
	orDefault(&c.Partitions, schemas.DefaultPartitions)
	orDefault(&c.FetchBatch, DefaultFetchBatch)
	if c.CatchUpBatch == 0 {
		c.CatchUpBatch = CatchUpFactor * c.FetchBatch
	}
	c.CatchUpBatch = max(c.CatchUpBatch, c.FetchBatch)
	orDefault(&c.FetchWait, DefaultFetchWait)
	orDefault(&c.AckWait, DefaultAckWait)
	orDefault(&c.StallAfter, DefaultStallAfter)
	quiet.Defaults(&c.Logger, &c.Registerer)
	return nil
}

// orDefault sets *v to def unless it is positive: a zero or negative
// setting of the components' configs means the default.
func orDefault[T int | int64 | time.Duration](v *T, def T) {
	if *v <= 0 {
		*v = def
	}
}

// Lease is a single-writer lease with a fencing token (internal/lease).
type Lease = lease.Holder

// writerChange is implemented by stores that keep state about their own
// writes between calls (aggregator/clickhouse: its open intent). It is
// called each time this process becomes the writer, since another process
// may have written in between.
type writerChange interface{ WriterChanged() }

// Preparer is implemented by a store that has read-only work to do before
// a new writer's first write which may take longer than a lease (the
// ClickHouse store: loading its dedup index from the events, a rebuild of
// minutes at a billion events). The aggregator calls Prepare once it holds
// the lease and before it consumes, with no write deadline, while the lease
// is renewed; a write's deadline bounded it before, so a load longer than
// the lease could never finish and the partition never started. Prepare
// must write nothing the store's exactly-once argument depends on: what it
// does is only a head start on the work the first write does again, fenced.
type Preparer interface {
	Prepare(ctx context.Context) error
}

// Aggregator moves batches from JetStream into a Store.
type Aggregator struct {
	cfg     Config
	log     *slog.Logger
	js      jetstream.JetStream
	metrics *metrics
	// writer is cfg.Store, fenced by the lease when there is one: every
	// write goes through it.
	writer Store
	// stepDown ends the current term as lease holder (nil outside a term).
	stepDown atomic.Pointer[context.CancelCauseFunc]
	standby  atomic.Bool // waiting for the lease

	consumer   atomic.Pointer[jetstream.Consumer]
	lastFetch  atomic.Int64           // unix nanos of the last fetch that succeeded (or of the start of consuming)
	fetchErr   atomic.Pointer[string] // the error of the last fetch, nil after one succeeded
	delivered  atomic.Uint64          // stream sequence of the last message fetched
	ackFloor   atomic.Uint64          // the consumer's ack floor (stream sequence) as last read from the server
	ackFloorAt atomic.Int64           // unix nanos ackFloor was read
	lastCommit atomic.Int64           // unix nanos of the last commit, or of a fetch that found nothing
	flushSince atomic.Int64           // unix nanos the running flush started, 0 when none runs
	pending    atomic.Int64           // messages not yet delivered, as of the last fetch
	oldest     atomic.Int64           // unix nanos JetStream stored the first message of the group being written, 0 between writes
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
	a := &Aggregator{cfg: cfg, log: cfg.Logger.With("component", "aggregator"), js: js, writer: cfg.Store}
	if cfg.Lease != nil {
		a.writer = fencedStore{Store: cfg.Store, a: a}
		a.cfg.Store = a.writer
		a.standby.Store(true)
	}
	a.metrics, err = newMetrics(cfg.Registerer, a.lagSeconds, a.storeFailingSeconds)
	if err != nil {
		return nil, err
	}
	a.lastCommit.Store(time.Now().UnixNano())
	a.lastFetch.Store(time.Now().UnixNano())
	return a, nil
}

// Writer is the store every writer of the aggregator's database must use
// (the reconciler too): with a lease, its Apply and Reconcile write only
// while the lease is held and end before it can be taken over.
func (a *Aggregator) Writer() Store { return a.writer }

// ConsumerConfig is the durable pull consumer the aggregator reads through.
func (a *Aggregator) ConsumerConfig() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       a.cfg.Durable,
		Description:   "meterd aggregator: usage batches into the store",
		FilterSubject: a.cfg.Subject,
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
// of an unfinished flush are redelivered and counted once. With a lease it
// first waits for it, consumes while it holds it, and waits again if it
// loses it.
func (a *Aggregator) Run(ctx context.Context) error {
	if a.cfg.Lease == nil {
		a.metrics.leaseHeld.Set(1) // the writer, without a lease
		return a.consume(ctx)
	}
	for {
		a.standby.Store(true)
		token, err := a.cfg.Lease.Acquire(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("aggregator: lease: %w", err)
		}
		if err := a.term(ctx, token); err != nil || ctx.Err() != nil {
			return err
		}
	}
}

// term consumes as the lease holder with fencing token token until ctx ends
// or the lease is lost; on ctx's end it releases the lease.
func (a *Aggregator) term(ctx context.Context, token uint64) error {
	store := a.cfg.Store.(fencedStore).Store // term runs only with a lease
	if w, ok := store.(writerChange); ok {
		w.WriterChanged()
	}
	tctx, stop := context.WithCancelCause(ctx)
	a.standby.Store(false)
	a.metrics.leaseHeld.Set(1)
	a.log.Info("writer lease held; consuming", "token", token)
	var renewer sync.WaitGroup
	renewer.Go(func() {
		ctxtime.Tick(tctx, a.cfg.Lease.Duration()/3, func() {
			if _, err := a.cfg.Lease.Renew(tctx); err != nil && tctx.Err() == nil {
				stop(err)
			}
		})
	})
	if p, ok := store.(Preparer); ok {
		start := time.Now()
		if err := p.Prepare(tctx); err != nil && tctx.Err() == nil {
			// The first write does the same work again, fenced.
			a.log.Warn("preparing the store for writing failed; the first write does it", "err", err)
		} else if err == nil {
			a.log.Info("store prepared for writing", "took", time.Since(start).Round(time.Millisecond))
		}
	}
	// Writers (the reconciler's too) are let through only now: one that
	// waited for the store through a long Prepare would outlive its
	// renewed lease and end the term it waited in.
	a.stepDown.Store(&stop)
	err := a.consume(tctx)
	stop(nil)
	renewer.Wait()
	a.stepDown.Store(nil)
	a.consumer.Store(nil)
	a.metrics.leaseHeld.Set(0)
	if ctx.Err() != nil {
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if rerr := a.cfg.Lease.Release(rctx); rerr != nil {
			a.log.Warn("release the writer lease; it expires by itself", "err", rerr)
		}
		return err
	}
	a.metrics.leaseLost.Inc()
	a.log.Warn("lost the writer lease; stopped consuming and standing by", "token", token, "cause", context.Cause(tctx))
	return err
}

// fencedStore is the store written only while the lease is held: each write
// renews the lease first and must end before the renewed lease can be taken
// over. A write that could not (lease lost, or the write outlived it) ends
// the term, so the aggregator stops consuming instead of retrying it.
type fencedStore struct {
	Store
	a *Aggregator
}

// ErrNotWriter is returned by writes of an aggregator that does not hold the
// writer lease.
var ErrNotWriter = errors.New("aggregator: not the writer (the lease is held by another process)")

func (f fencedStore) fence(ctx context.Context, write func(context.Context) error) error {
	stop := f.a.stepDown.Load()
	if stop == nil {
		return ErrNotWriter
	}
	until, err := f.a.cfg.Lease.Renew(ctx)
	if err != nil {
		if ctx.Err() == nil {
			(*stop)(err)
		}
		return fmt.Errorf("%w: %w", ErrNotWriter, err)
	}
	wctx, cancel := context.WithDeadline(ctx, until)
	defer cancel()
	err = write(wctx)
	if err != nil && ctx.Err() == nil && !time.Now().Before(until) {
		// Unfinished at the end of the lease: another process may hold it
		// now, so this one must not retry.
		(*stop)(fmt.Errorf("a store write outlived the lease: %w", err))
	}
	return err
}

// Apply implements Store.
func (f fencedStore) Apply(ctx context.Context, batches []*schemas.Batch) (incs []Increment, err error) {
	err = f.fence(ctx, func(ctx context.Context) error {
		incs, err = f.Store.Apply(ctx, batches)
		return err
	})
	return incs, err
}

// Reconcile implements Store.
func (f fencedStore) Reconcile(ctx context.Context, from, to time.Time) (n int, err error) {
	err = f.fence(ctx, func(ctx context.Context) error {
		n, err = f.Store.Reconcile(ctx, from, to)
		return err
	})
	return n, err
}

// consume creates the consumer and consumes until ctx ends.
func (a *Aggregator) consume(ctx context.Context) error {
	if _, err := a.ensureConsumer(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("aggregator: consumer: %w", err)
	}
	a.lastFetch.Store(time.Now().UnixNano())
	a.fetchErr.Store(nil)
	// The next group of messages is fetched and decoded while the store
	// writes the current one; groups are written, and their increments
	// published, in the order they were fetched.
	groups := make(chan group, 1)
	var reader sync.WaitGroup
	reader.Go(func() {
		defer close(groups)
		a.read(ctx, groups)
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

// ensureConsumer creates the durable consumer, retrying until ctx ends. An
// existing consumer keeps its start (JetStream cannot change it); a missing
// one starts after the ack floor last read from the server, or at the
// beginning of the stream if this process never read one.
func (a *Aggregator) ensureConsumer(ctx context.Context) (jetstream.Consumer, error) {
	var cons jetstream.Consumer
	err := backoff.Retry(func() error {
		cc := a.ConsumerConfig()
		recreated := false
		// A consumer's start cannot be changed once it exists: it is
		// chosen only when the lookup says for sure that there is none.
		old, err := a.js.Consumer(ctx, schemas.UsageStream, cc.Durable)
		if err == nil {
			oc := old.CachedInfo().Config
			cc.DeliverPolicy, cc.OptStartSeq, cc.OptStartTime = oc.DeliverPolicy, oc.OptStartSeq, oc.OptStartTime
		} else if !errors.Is(err, jetstream.ErrConsumerNotFound) {
			if ctx.Err() != nil {
				return backoff.Permanent(ctx.Err())
			}
			a.log.Warn("look up consumer; retrying", "durable", cc.Durable, "err", err)
			return err
		} else if floor := a.ackFloor.Load(); floor > 0 {
			cc.DeliverPolicy, cc.OptStartSeq = jetstream.DeliverByStartSequencePolicy, floor+1
			recreated = true
		} else if floor, err := a.startAfter(ctx); err != nil {
			if ctx.Err() != nil {
				return backoff.Permanent(ctx.Err())
			}
			a.log.Warn("look up the consumer to start after; retrying", "after", a.cfg.StartAfter, "err", err)
			return err
		} else if floor > 0 {
			cc.DeliverPolicy, cc.OptStartSeq = jetstream.DeliverByStartSequencePolicy, floor+1
			a.log.Info("new consumer starts after the ack floor of the aggregator of every partition",
				"durable", cc.Durable, "after", a.cfg.StartAfter, "start_seq", cc.OptStartSeq)
		}
		c, err := a.js.CreateOrUpdateConsumer(ctx, schemas.UsageStream, cc)
		if err != nil {
			if ctx.Err() != nil {
				return backoff.Permanent(ctx.Err())
			}
			a.log.Warn("create consumer; retrying", "err", err)
			return err
		}
		if recreated {
			a.log.Warn("consumer recreated after the last known ack floor", "durable", cc.Durable, "start_seq", cc.OptStartSeq)
		}
		cons = c
		return nil
	}, backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithMaxElapsedTime(0), backoff.WithMaxInterval(5*time.Second)), ctx))
	if err != nil {
		return nil, err
	}
	a.consumer.Store(&cons)
	a.noteAckFloor(cons.CachedInfo())
	return cons, nil
}

// startAfter returns the ack floor of the StartAfter consumer, 0 if there
// is none (then the new consumer delivers all the stream holds: the trimmer
// keeps it to what was not acknowledged, and the store counts the rest
// once), and an error if the lookup failed otherwise: a new consumer's
// start is for good, so a timeout must not make it the stream's beginning.
func (a *Aggregator) startAfter(ctx context.Context) (uint64, error) {
	if a.cfg.StartAfter == "" {
		return 0, nil
	}
	c, err := a.js.Consumer(ctx, schemas.UsageStream, a.cfg.StartAfter)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return c.CachedInfo().AckFloor.Stream, nil
}

// noteAckFloor records the consumer's ack floor from info.
func (a *Aggregator) noteAckFloor(info *jetstream.ConsumerInfo) {
	if info == nil {
		return
	}
	// A new consumer reports 0 or its start minus one: never move back.
	if f := info.AckFloor.Stream; f > a.ackFloor.Load() {
		a.ackFloor.Store(f)
	}
	a.ackFloorAt.Store(time.Now().UnixNano())
}

// ackFloorEvery is how often the consumer's ack floor is read while
// consuming: a recreated consumer redelivers at most what was acked since.
const ackFloorEvery = time.Second

// read fetches and decodes groups into out until ctx ends. Undecodable
// messages are dead-lettered here and never reach out.
func (a *Aggregator) read(ctx context.Context, out chan<- group) {
	for ctx.Err() == nil {
		cons := *a.consumer.Load()
		if time.Since(time.Unix(0, a.ackFloorAt.Load())) > ackFloorEvery {
			ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
			if info, err := cons.Info(ictx); err == nil {
				a.noteAckFloor(info)
			}
			cancel()
		}
		msgs, err := a.fetch(ctx, cons)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			a.fetchFailed(ctx, cons, err)
			ctxtime.Sleep(ctx, 250*time.Millisecond)
			continue
		}
		a.fetchErr.Store(nil)
		a.lastFetch.Store(time.Now().UnixNano())
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
			a.delivered.Store(max(a.delivered.Load(), md.Sequence.Stream))
		}
	} else {
		a.pending.Store(0)
		a.metrics.lag.Set(0)
	}
	return msgs, ctx.Err()
}

// fetchFailed counts and logs a failed fetch, estimates the lag from the
// stream (the consumer's own count is out of reach), and recreates the
// consumer if it no longer exists.
func (a *Aggregator) fetchFailed(ctx context.Context, cons jetstream.Consumer, err error) {
	a.metrics.fetchErrors.Inc()
	msg := err.Error()
	a.fetchErr.Store(&msg)
	a.log.Warn("fetch failed", "err", err)
	ictx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if st, serr := a.js.Stream(ictx, schemas.UsageStream); serr == nil {
		// Messages stored after the last one this process fetched: the
		// consumer's pending count as far as it can be known.
		behind := int64(0)
		if last := st.CachedInfo().State.LastSeq; last > a.delivered.Load() {
			behind = int64(last - max(a.delivered.Load(), a.ackFloor.Load()))
		}
		a.pending.Store(behind)
		a.metrics.lag.Set(float64(behind))
	}
	if _, ierr := cons.Info(ictx); errors.Is(ierr, jetstream.ErrConsumerNotFound) {
		a.log.Error("the durable consumer is gone; recreating it", "durable", a.cfg.Durable, "ack_floor", a.ackFloor.Load())
		if _, err := a.ensureConsumer(ctx); err != nil && ctx.Err() == nil {
			a.log.Error("recreate consumer", "err", err)
		}
	}
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
	bo := ctxtime.Backoff()
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
		if !ctxtime.Sleep(ctx, wait) {
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
	var (
		events int64
		data   []byte // Publish copies it out before it returns
	)
	for _, inc := range incs {
		events += inc.Events
		var err error
		data, err = schemas.AppendCommitted(data[:0], &schemas.Committed{Tenant: inc.Tenant, Meter: inc.Meter, Hour: inc.Hour,
			Value: inc.Value, Events: inc.Events, SealedAt: sealed})
		if err != nil {
			a.log.Warn("encode committed increment", "err", err, "tenant", inc.Tenant)
			continue
		}
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
	// The increments may carry usage a store repaired from an earlier,
	// interrupted write (positive, or negative where that write's rollups
	// landed without its events), so they need not be the count of these
	// batches' new events: the counters take what can be told apart and
	// never go down (Add of a negative value panics).
	a.metrics.events.Add(float64(max(events, 0)))
	a.metrics.duplicates.Add(float64(max(received-events, 0)))
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
//
// A standby (waiting for the writer lease) is ready while its store and the
// lease bucket answer: it serves usage reports like the holder, and a
// StatefulSet rolls out only through ready pods. That no process consumes is
// what the meterd_aggregator_writer_leases metric and its alert tell.
func (a *Aggregator) Ready(ctx context.Context) error {
	if err := a.cfg.Store.Ping(ctx); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if f := a.storeFailure.Load(); f != nil {
		return fmt.Errorf("store: writes failing for %s, retrying: %w", time.Since(f.since).Round(time.Second), f.err)
	}
	if a.cfg.Lease != nil && a.standby.Load() {
		if since := time.Since(a.cfg.Lease.Answered()); since > a.cfg.Lease.Duration() {
			return fmt.Errorf("standby: the lease bucket has not answered for %s", since.Round(time.Second))
		}
		return nil
	}
	if a.consumer.Load() == nil {
		return errors.New("consumer not created yet")
	}
	// A reader waiting for a long flush does not fetch either; the flush
	// check above covers that.
	if e, since := a.fetchErr.Load(), time.Since(time.Unix(0, a.lastFetch.Load())); e != nil && since > a.cfg.StallAfter/2 {
		return fmt.Errorf("stalled: fetch failing for %s: %s", since.Round(time.Second), *e)
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
