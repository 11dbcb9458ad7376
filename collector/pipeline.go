package collector

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/meterd/meterd/collector/spool"
	"github.com/meterd/meterd/schemas"
)

// Errors a request waiting for its batches may get.
var (
	// ErrSpoolFull means NATS is away and the spool reached its bound.
	ErrSpoolFull = errors.New("collector: spool full")
	// ErrClosed means the collector is shutting down.
	ErrClosed = errors.New("collector: closed")
)

// sealed is a batch on its way to durability. Requests whose events it holds
// wait on done; err is set before done is closed.
type sealed struct {
	id      string
	subject string
	data    []byte
	events  int
	done    chan struct{}
	err     error
}

// openBatch collects the events of one partition until it is sealed.
type openBatch struct {
	mu     sync.Mutex
	events []schemas.Event
	cur    *sealed
}

// batchBufs recycles the buffers batches are encoded into.
var batchBufs = sync.Pool{New: func() any { return make([]byte, 0, 64<<10) }}

const maxPooledBatch = 4 << 20

// pipeline seals events into batches per partition and delivers each batch:
// published to JetStream, or appended to the spool and replayed later.
type pipeline struct {
	c     *Collector
	open  []openBatch
	queue chan *sealed

	// closing guards the queue: adders hold it for reading while they may
	// enqueue; run takes it for writing to stop them before closing queue.
	closing sync.RWMutex
	closed  bool

	// degraded is set when a publish failed after its retries: workers then
	// spool at once instead of waiting on a sick NATS, until a replay works.
	degraded atomic.Bool
	wake     chan struct{} // the spool has something to replay
}

func newPipeline(c *Collector) *pipeline {
	return &pipeline{
		c:     c,
		open:  make([]openBatch, c.cfg.Partitions),
		queue: make(chan *sealed, 2*c.cfg.PublishWorkers),
		wake:  make(chan struct{}, 1),
	}
}

// add puts events into the open batches of their partitions and waits until
// every batch holding one of them is durable. Events must be valid. When ctx
// ends first, the events are still delivered; only the wait is abandoned.
func (pl *pipeline) add(ctx context.Context, events []schemas.Event) error {
	pl.closing.RLock()
	if pl.closed {
		pl.closing.RUnlock()
		return ErrClosed
	}
	waits := pl.fill(events)
	pl.closing.RUnlock()
	for _, s := range waits {
		select {
		case <-s.done:
			if s.err != nil {
				return s.err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// fill appends events to open batches, sealing the full ones, and returns
// the batches to wait for. The caller holds closing for reading.
func (pl *pipeline) fill(events []schemas.Event) []*sealed {
	parts := pl.c.cfg.Partitions
	byPart := make([][]schemas.Event, parts)
	for _, e := range events {
		p := schemas.Partition(e.Tenant, parts)
		byPart[p] = append(byPart[p], e)
	}
	var waits []*sealed
	for p, evs := range byPart {
		waits = pl.fillPartition(p, evs, waits, true)
	}
	return waits
}

// enqueue adds one event without waiting for its batch: the forward-auth
// check records calls this way so that it never waits on NATS.
func (pl *pipeline) enqueue(e schemas.Event) error {
	pl.closing.RLock()
	defer pl.closing.RUnlock()
	if pl.closed {
		return ErrClosed
	}
	pl.fillPartition(schemas.Partition(e.Tenant, pl.c.cfg.Partitions), []schemas.Event{e}, nil, false)
	return nil
}

// fillPartition appends evs to partition p's open batch, sealing it each
// time it is full, and appends the batches holding evs to waits when wait.
func (pl *pipeline) fillPartition(p int, evs []schemas.Event, waits []*sealed, wait bool) []*sealed {
	max := pl.c.cfg.BatchMaxEvents
	for len(evs) > 0 {
		ob := &pl.open[p]
		ob.mu.Lock()
		if ob.cur == nil {
			ob.cur = &sealed{id: nuid.Next(), subject: schemas.UsageSubject(p), done: make(chan struct{})}
			ob.events = make([]schemas.Event, 0, max)
			cur := ob.cur
			time.AfterFunc(pl.c.cfg.BatchMaxWait, func() { pl.sealOnTimer(p, cur) })
		}
		n := min(max-len(ob.events), len(evs))
		ob.events = append(ob.events, evs[:n]...)
		evs = evs[n:]
		if wait && (len(waits) == 0 || waits[len(waits)-1] != ob.cur) {
			waits = append(waits, ob.cur)
		}
		var full *sealed
		var fullEvents []schemas.Event
		if len(ob.events) >= max {
			full, fullEvents = ob.detach()
		}
		ob.mu.Unlock()
		if full != nil {
			pl.seal(full, fullEvents)
		}
	}
	return waits
}

// detach takes the open batch out of ob. The caller holds ob.mu.
func (ob *openBatch) detach() (*sealed, []schemas.Event) {
	s, evs := ob.cur, ob.events
	ob.cur, ob.events = nil, nil
	return s, evs
}

// sealOnTimer seals batch cur of partition p when it is still open after
// BatchMaxWait.
func (pl *pipeline) sealOnTimer(p int, cur *sealed) {
	pl.closing.RLock()
	defer pl.closing.RUnlock()
	if pl.closed {
		return // run seals what is left
	}
	ob := &pl.open[p]
	ob.mu.Lock()
	if ob.cur != cur {
		ob.mu.Unlock()
		return
	}
	s, evs := ob.detach()
	ob.mu.Unlock()
	pl.seal(s, evs)
}

// seal encodes the batch and queues it for delivery. It blocks while the
// queue is full: that is the backpressure that bounds memory.
func (pl *pipeline) seal(s *sealed, events []schemas.Event) {
	b := schemas.Batch{ID: s.id, Collector: pl.c.cfg.Name, SealedAt: pl.c.cfg.Now().UTC(), Events: events}
	data, err := schemas.AppendBatch(batchBufs.Get().([]byte)[:0], &b)
	if err != nil { // events were validated; this is a bug, not bad input
		s.err = fmt.Errorf("encode batch %s: %w", s.id, err)
		close(s.done)
		return
	}
	s.data, s.events = data, len(events)
	pl.queue <- s
}

// run delivers batches until ctx ends, then flushes: it seals every open
// batch, delivers everything queued, and tries once more to drain the spool.
func (pl *pipeline) run(ctx context.Context) error {
	var wg sync.WaitGroup
	for range pl.c.cfg.PublishWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range pl.queue {
				s.err = pl.deliver(s)
				// Published (copied out by NATS) or spooled (written): the
				// encoding buffer can serve the next batch.
				if cap(s.data) <= maxPooledBatch {
					batchBufs.Put(s.data[:0])
				}
				s.data = nil
				close(s.done)
			}
		}()
	}
	replayCtx, stopReplay := context.WithCancel(context.Background())
	replayDone := make(chan struct{})
	go func() {
		defer close(replayDone)
		pl.replayLoop(replayCtx)
	}()
	pl.wakeReplay()

	<-ctx.Done()
	pl.closing.Lock()
	pl.closed = true
	pl.closing.Unlock()
	for p := range pl.open {
		ob := &pl.open[p]
		ob.mu.Lock()
		s, evs := ob.detach()
		ob.mu.Unlock()
		if s != nil {
			pl.seal(s, evs)
		}
	}
	close(pl.queue)
	wg.Wait()
	stopReplay()
	<-replayDone

	// A last drain so a clean shutdown leaves no backlog when NATS is fine;
	// whatever stays is on disk and replayed at the next start.
	deadline := time.Now().Add(5 * time.Second)
	for pl.c.spool.Len() > 0 && pl.c.cfg.NATS.IsConnected() && time.Now().Before(deadline) {
		if err := pl.replayOnce(context.Background()); err != nil {
			break
		}
	}
	if n := pl.c.spool.Len(); n > 0 {
		pl.c.log.Warn("stopping with batches in the spool; they are replayed at the next start", "batches", n)
	}
	return nil
}

// deliver makes s durable: published to JetStream, or else spooled.
func (pl *pipeline) deliver(s *sealed) error {
	if !pl.degraded.Load() && pl.c.cfg.NATS.IsConnected() {
		err := pl.publish(s)
		if err == nil {
			return nil
		}
		pl.degraded.Store(true)
		pl.c.log.Warn("publish failed; spooling until NATS answers again", "batch_id", s.id, "err", err)
	}
	return pl.spoolBatch(s)
}

// publish sends s with retries for up to PublishRetry, giving up early when
// the connection drops (the spool is faster than waiting).
func (pl *pipeline) publish(s *sealed) error {
	msg := batchMsg(s.subject, s.data)
	start := time.Now()
	bo := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(25*time.Millisecond),
		backoff.WithMaxInterval(500*time.Millisecond),
		backoff.WithMaxElapsedTime(pl.c.cfg.PublishRetry),
	)
	err := backoff.Retry(func() error {
		if !pl.c.cfg.NATS.IsConnected() {
			return backoff.Permanent(nats.ErrConnectionClosed)
		}
		ctx, cancel := context.WithTimeout(context.Background(), pl.c.cfg.PublishTimeout)
		defer cancel()
		ack, err := pl.c.js.PublishMsg(ctx, msg, jetstream.WithMsgID(s.id), jetstream.WithExpectStream(schemas.UsageStream))
		if err != nil {
			return err
		}
		if ack.Duplicate {
			pl.c.metrics.publishDuplicates.Inc()
		}
		return nil
	}, bo)
	if err != nil {
		return fmt.Errorf("publish batch %s: %w", s.id, err)
	}
	pl.c.metrics.publishSeconds.Observe(time.Since(start).Seconds())
	pl.c.metrics.batches.WithLabelValues("published").Inc()
	return nil
}

func batchMsg(subject string, data []byte) *nats.Msg {
	return &nats.Msg{
		Subject: subject,
		Data:    data,
		Header:  nats.Header{schemas.HeaderContentType: []string{schemas.BatchContentType}},
	}
}

// spoolBatch appends s to the spool (fsync'd on return).
func (pl *pipeline) spoolBatch(s *sealed) error {
	if err := pl.c.spool.Append(encodeSpoolRecord(s.id, s.subject, s.data)); err != nil {
		if errors.Is(err, spool.ErrFull) {
			return ErrSpoolFull
		}
		return fmt.Errorf("spool batch %s: %w", s.id, err)
	}
	pl.c.metrics.batches.WithLabelValues("spooled").Inc()
	pl.wakeReplay()
	return nil
}

func (pl *pipeline) wakeReplay() {
	select {
	case pl.wake <- struct{}{}:
	default:
	}
}

// replayLoop publishes spooled batches, oldest first, whenever NATS is
// connected, until ctx ends.
func (pl *pipeline) replayLoop(ctx context.Context) {
	bo := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second),
		backoff.WithMaxElapsedTime(0),
	)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	backlog := false // the spool held batches when last looked at
	for {
		var wait <-chan time.Time
		var wake <-chan struct{} // only an empty spool waits for news; a failing one backs off
		n := pl.c.spool.Len()
		if n == 0 && backlog {
			pl.c.log.Info("spool replayed; publishing to JetStream directly again")
		}
		backlog = n > 0
		switch {
		case n == 0:
			pl.degraded.Store(false)
			wait, wake = tick.C, pl.wake
		case !pl.c.cfg.NATS.IsConnected():
			wait = time.After(250 * time.Millisecond)
		default:
			if err := pl.replayOnce(ctx); err != nil {
				if ctx.Err() == nil {
					pl.c.log.Warn("spool replay failed; retrying", "err", err, "batches", pl.c.spool.Len())
				}
				wait = time.After(bo.NextBackOff())
			} else {
				bo.Reset()
				pl.degraded.Store(false)
				continue
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-wait:
		}
	}
}

// replayBatch is how many spooled batches one replay round has in flight.
const replayBatch = 128

// replayOnce publishes the oldest spooled batches asynchronously with their
// original batch_id and acknowledges the prefix JetStream acknowledged.
func (pl *pipeline) replayOnce(ctx context.Context) error {
	recs, err := pl.c.spool.Front(replayBatch)
	if err != nil {
		return fmt.Errorf("read spool: %w", err)
	}
	if len(recs) == 0 {
		return nil
	}
	type replayed struct {
		id  string
		ack jetstream.PubAckFuture // nil: the record was dropped
	}
	futures := make([]replayed, 0, len(recs))
	var firstErr error
	for _, r := range recs {
		id, subject, data, err := decodeSpoolRecord(r.Data)
		if err != nil {
			// Spool records are CRC-checked; one we cannot parse was written
			// by an incompatible version. Keeping it would block the spool.
			pl.c.log.Error("dropping unreadable spool record", "seq", r.Seq, "err", err)
			futures = append(futures, replayed{})
			continue
		}
		f, err := pl.c.js.PublishMsgAsync(batchMsg(subject, data), jetstream.WithMsgID(id), jetstream.WithExpectStream(schemas.UsageStream))
		if err != nil {
			firstErr = fmt.Errorf("replay batch %s: %w", id, err)
			break
		}
		futures = append(futures, replayed{id, f})
	}
	timeout := time.NewTimer(pl.c.cfg.PublishTimeout)
	defer timeout.Stop()
	var acked uint64
	for i, f := range futures {
		if f.ack != nil {
			select {
			case ack := <-f.ack.Ok():
				if ack.Duplicate {
					pl.c.metrics.publishDuplicates.Inc()
				}
			case err := <-f.ack.Err():
				firstErr = fmt.Errorf("replay batch %s: %w", f.id, err)
			case <-timeout.C:
				firstErr = fmt.Errorf("replay batch %s: timed out waiting for JetStream acks", f.id)
			case <-ctx.Done():
				firstErr = ctx.Err()
			}
			if firstErr != nil {
				break
			}
			pl.c.metrics.batches.WithLabelValues("replayed").Inc()
		}
		acked = recs[i].Seq
	}
	if acked > 0 {
		if err := pl.c.spool.Ack(acked); err != nil {
			return fmt.Errorf("ack spool: %w", err)
		}
	}
	return firstErr
}

// A spool record is: version 1, id length (1 byte), id, subject length
// (2 bytes, big endian), subject, batch data.
const spoolRecordV1 = 1

func encodeSpoolRecord(id, subject string, data []byte) []byte {
	rec := make([]byte, 0, 4+len(id)+len(subject)+len(data))
	rec = append(rec, spoolRecordV1, byte(len(id)))
	rec = append(rec, id...)
	rec = binary.BigEndian.AppendUint16(rec, uint16(len(subject)))
	rec = append(rec, subject...)
	return append(rec, data...)
}

func decodeSpoolRecord(rec []byte) (id, subject string, data []byte, err error) {
	bad := errors.New("malformed spool record")
	if len(rec) < 2 || rec[0] != spoolRecordV1 {
		return "", "", nil, bad
	}
	n := int(rec[1])
	rec = rec[2:]
	if len(rec) < n+2 {
		return "", "", nil, bad
	}
	id, rec = string(rec[:n]), rec[n:]
	m := int(binary.BigEndian.Uint16(rec))
	rec = rec[2:]
	if len(rec) < m {
		return "", "", nil, bad
	}
	return id, string(rec[:m]), rec[m:], nil
}
