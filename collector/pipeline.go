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
	"github.com/meterd/meterd/internal/ctxtime"
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
	// reserved is the spool room reserved for this batch (its events and its
	// envelope), given back once it is published or spooled.
	reserved int64
	done     chan struct{}
	err      error
}

// openBatch collects the encoded events of one partition until it is sealed.
type openBatch struct {
	mu       sync.Mutex
	buf      []byte // the events encoded, joined by commas
	n        int    // events in buf
	reserved int64
	cur      *sealed
}

// eventBufs recycles the buffers a request's events are encoded into: they
// are needed only until the events are copied into their batches.
var eventBufs = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

// batchBufs recycles the buffers batches are encoded into.
var batchBufs = sync.Pool{New: func() any { return make([]byte, 0, 64<<10) }}

const maxPooledBatch = 4 << 20

// Batch size limits.
const (
	// batchHeadroom is kept free below the server's message size limit: the
	// limit counts the NATS headers too (Content-Type, Nats-Msg-Id,
	// Nats-Expected-Stream: about 150 bytes), and a margin costs nothing.
	batchHeadroom = 16 << 10
	// fallbackMaxPayload is used when the server cannot tell its limit at
	// start (NATS away): the NATS default max_payload, which no server
	// configured for meterd goes below.
	fallbackMaxPayload = 1 << 20
)

// EventTooLargeError refuses a request holding an event whose encoding
// cannot fit in a batch by itself (docs/architecture.md#money-safety): nothing of the request is kept.
type EventTooLargeError struct {
	Tenant string // of the event
	ID     string // of the event
	Size   int    // bytes of its encoding in a batch
	Max    int    // bytes of events one batch can hold
}

func (e *EventTooLargeError) Error() string {
	return fmt.Sprintf("event %q of tenant %q takes %d bytes encoded in a batch; a batch holds at most %d bytes of events",
		e.ID, e.Tenant, e.Size, e.Max)
}

// pipeline seals events into batches per partition and delivers each batch:
// published to JetStream, or appended to the spool and replayed later.
//
// Batches are bounded by bytes (docs/architecture.md#money-safety): each event is encoded once, in
// the request's goroutine, exactly as it will stand in the batch; a batch is
// sealed before the next event would take its encoding past maxBytes, which
// is the server's message size limit minus batchHeadroom. An event that
// cannot fit alone refuses its request before any of it is placed.
//
// A request is all or nothing (docs/architecture.md#money-safety). Before any of its events is
// placed, the request reserves spool room for everything it can add to the
// spool: its events' encodings, a comma each, and the envelope and spool
// record overhead of every batch it can touch (an upper bound, see
// batchesTouched; what is left over is given back once its events are
// placed). The reservation succeeds only while the spool's bytes plus every
// live reservation fit in SpoolMaxBytes; otherwise the request is answered
// 429 and nothing of it was placed. Placed reservations travel with the
// batches and are given back when a batch is published or spooled. So every
// batch that has to be spooled finds room (its bytes were reserved by the
// requests in it, and a reservation is given back only after its batch is on
// disk), the spool never refuses a batch, and no batch fails for lack of room
// after some of a request's batches were kept. A batch shared by several
// requests thus never fails one request for another's sake: the only way a
// request fails after its events are placed is a failed disk write (503),
// where the events of that write are lost to every request in it and the
// client's retry of the same ids counts once.
type pipeline struct {
	c     *Collector
	open  []openBatch
	queue chan *sealed

	maxBytes int   // bound of a sealed batch's encoding
	headMax  int   // bound of a batch's envelope: everything but its events
	overhead int64 // spool bytes of a batch beyond its events and commas

	resMu    sync.Mutex
	reserved int64 // spool room reserved by requests and undelivered batches

	// closing guards the queue: adders hold it for reading while they may
	// enqueue; run takes it for writing to stop them before closing queue.
	closing sync.RWMutex
	closed  bool

	// degraded is set when a publish failed after its retries: workers then
	// spool at once instead of waiting on a sick NATS, until a replay works.
	degraded atomic.Bool
	wake     chan struct{} // the spool has something to replay
}

func newPipeline(c *Collector, maxBytes int) *pipeline {
	// The longest envelope: a nuid batch_id, this collector's name, and a
	// sealed_at with all nine fraction digits.
	head, _ := schemas.AppendEncodedBatch(nil, &schemas.Batch{
		ID:        nuid.Next(),
		Collector: c.cfg.Name,
		SealedAt:  time.Date(2026, 12, 31, 23, 59, 59, 999999999, time.UTC),
	}, nil)
	subject := schemas.UsageSubject(max(c.cfg.Partitions-1, 0))
	record := len(encodeSpoolRecord(nuid.Next(), subject, nil))
	return &pipeline{
		c:        c,
		open:     make([]openBatch, c.cfg.Partitions),
		queue:    make(chan *sealed, 2*c.cfg.PublishWorkers),
		maxBytes: maxBytes,
		headMax:  len(head),
		overhead: int64(spool.RecordOverhead + record + len(head)),
		wake:     make(chan struct{}, 1),
	}
}

// encodedEvents are the events of one request, encoded as they will stand in
// a batch.
type encodedEvents struct {
	buf    []byte
	pooled *[]byte // buf's holder in eventBufs
	ends   []int   // event i is buf[ends[i-1]:ends[i]]
	byPart [][]int
	need   int64 // spool room to reserve
}

// recycle gives ee's buffer back once its events are placed or refused.
func (ee *encodedEvents) recycle() {
	if ee.buf != nil && cap(ee.buf) <= maxPooledBatch {
		// Back through the pointer it came in, so that putting it back
		// allocates nothing.
		*ee.pooled = ee.buf[:0]
		eventBufs.Put(ee.pooled)
	}
	ee.buf = nil
}

func (ee *encodedEvents) event(i int) []byte {
	start := 0
	if i > 0 {
		start = ee.ends[i-1]
	}
	return ee.buf[start:ee.ends[i]]
}

// encode encodes events, checks that each fits in a batch by itself and
// computes the spool room the request needs.
func (pl *pipeline) encode(events []schemas.Event) (*encodedEvents, error) {
	parts := pl.c.cfg.Partitions
	pooled := eventBufs.Get().(*[]byte)
	ee := &encodedEvents{buf: (*pooled)[:0], pooled: pooled, ends: make([]int, len(events)), byPart: make([][]int, parts)}
	var enc schemas.EventEncoder
	room := pl.maxBytes - pl.headMax // bytes of events a batch holds
	for i := range events {
		e := &events[i]
		start := len(ee.buf)
		var err error
		if ee.buf, err = enc.Append(ee.buf, e); err != nil {
			ee.recycle()
			// Events were validated; this is a bug, not bad input.
			return nil, fmt.Errorf("encode event %d: %w", i, err)
		}
		if size := len(ee.buf) - start; size > room {
			ee.recycle()
			return nil, &EventTooLargeError{Tenant: e.Tenant, ID: e.ID, Size: size, Max: room}
		}
		ee.ends[i] = len(ee.buf)
		p := schemas.Partition(e.Tenant, parts)
		ee.byPart[p] = append(ee.byPart[p], i)
	}
	for _, idx := range ee.byPart {
		if len(idx) == 0 {
			continue
		}
		var bytes int
		for _, i := range idx {
			bytes += len(ee.event(i)) + 1
		}
		ee.need += int64(bytes) + pl.overhead*int64(pl.batchesTouched(len(idx), bytes))
	}
	return ee, nil
}

// batchesTouched bounds the batches that n events of one request, of bytes
// encoded bytes with their commas, can go into in one partition. The events
// are placed under the partition's lock in one go, so they fill the open
// batch (which may be full already and take none), then fresh batches that
// only they fill, the last of which others may join. A fresh batch sealed
// before the last one is full by count (BatchMaxEvents events) or by bytes;
// of two consecutive ones full by bytes, the first plus the first event of
// the second exceed a batch's room, so each pair holds more than room − 1
// bytes. Every batch but the first holds at least one event.
func (pl *pipeline) batchesTouched(n, bytes int) int {
	room := max(pl.maxBytes-pl.headMax-1, 1)
	bound := 3 + n/pl.c.cfg.BatchMaxEvents + 2*bytes/room + 1
	return min(n+1, bound)
}

// reserve takes n bytes of spool room, or reports false when the spool's
// bytes and the live reservations leave less.
func (pl *pipeline) reserve(n int64) bool {
	pl.resMu.Lock()
	defer pl.resMu.Unlock()
	if pl.c.spool.Bytes()+pl.reserved+n > pl.c.cfg.SpoolMaxBytes {
		return false
	}
	pl.reserved += n
	return true
}

// release gives back n bytes of spool room.
func (pl *pipeline) release(n int64) {
	if n == 0 {
		return
	}
	pl.resMu.Lock()
	pl.reserved -= n
	pl.resMu.Unlock()
}

// Reserved is the spool room held by requests and undelivered batches.
func (pl *pipeline) Reserved() int64 {
	pl.resMu.Lock()
	defer pl.resMu.Unlock()
	return pl.reserved
}

// add puts events into the open batches of their partitions and waits until
// every batch holding one of them is durable. Events must be valid. When ctx
// ends first, the events are still delivered; only the wait is abandoned.
// It returns an *EventTooLargeError or ErrSpoolFull before placing any
// event, and an error after placing them only when a batch could not be
// written (see pipeline).
func (pl *pipeline) add(ctx context.Context, events []schemas.Event) error {
	ee, err := pl.encode(events)
	if err != nil {
		return err
	}
	defer ee.recycle()
	pl.closing.RLock()
	if pl.closed {
		pl.closing.RUnlock()
		return ErrClosed
	}
	if !pl.reserve(ee.need) {
		pl.closing.RUnlock()
		return ErrSpoolFull
	}
	waits := pl.fill(ee, true)
	pl.closing.RUnlock()
	ee.recycle() // copied into the batches
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

// fill places the reserved events ee into open batches, sealing the full
// ones, gives back the reservation the batches did not take and returns the
// batches to wait for when wait. The caller holds closing for reading.
func (pl *pipeline) fill(ee *encodedEvents, wait bool) []*sealed {
	var waits []*sealed
	var placed int64
	for p, idx := range ee.byPart {
		if len(idx) > 0 {
			var n int64
			waits, n = pl.fillPartition(p, ee, idx, waits, wait)
			placed += n
		}
	}
	// Negative only if batchesTouched were wrong: the batches then hold
	// more than was checked, and giving back a negative amount keeps the
	// books right.
	pl.release(ee.need - placed)
	return waits
}

// enqueue adds one event without waiting for its batch: the forward-auth
// check records calls this way so that it never waits on NATS. It returns
// ErrSpoolFull, having placed nothing, when the spool has no room for it.
func (pl *pipeline) enqueue(e schemas.Event) error {
	ee, err := pl.encode([]schemas.Event{e})
	if err != nil {
		return err
	}
	defer ee.recycle()
	pl.closing.RLock()
	defer pl.closing.RUnlock()
	if pl.closed {
		return ErrClosed
	}
	if !pl.reserve(ee.need) {
		return ErrSpoolFull
	}
	pl.fill(ee, false)
	return nil
}

// fillPartition places the events idx of ee into partition p's open batches
// under the partition's lock, sealing each batch when it is full by count or
// when the next event would take it past maxBytes, and returns the batches
// holding them (appended to waits when wait) and the reservation they took.
func (pl *pipeline) fillPartition(p int, ee *encodedEvents, idx []int, waits []*sealed, wait bool) ([]*sealed, int64) {
	maxEvents := pl.c.cfg.BatchMaxEvents
	var full []*sealed
	var fullBufs [][]byte
	var placed int64
	ob := &pl.open[p]
	ob.mu.Lock()
	for len(idx) > 0 {
		if ob.cur == nil {
			ob.cur = &sealed{id: nuid.Next(), subject: schemas.UsageSubject(p), done: make(chan struct{})}
			ob.buf, ob.n, ob.reserved = batchBufs.Get().([]byte)[:0], 0, 0
			cur := ob.cur
			time.AfterFunc(pl.c.cfg.BatchMaxWait, func() { pl.sealOnTimer(p, cur) })
		}
		// Each batch touched carries one overhead for this request.
		ob.reserved += pl.overhead
		placed += pl.overhead
		took := 0
		for took < len(idx) && ob.n < maxEvents {
			ev := ee.event(idx[took])
			comma := 0
			if ob.n > 0 {
				comma = 1
			}
			if pl.headMax+len(ob.buf)+comma+len(ev) > pl.maxBytes {
				break
			}
			if comma == 1 {
				ob.buf = append(ob.buf, ',')
			}
			ob.buf = append(ob.buf, ev...)
			ob.n++
			ob.reserved += int64(len(ev) + 1)
			placed += int64(len(ev) + 1)
			took++
		}
		if wait && took > 0 {
			waits = append(waits, ob.cur)
		}
		idx = idx[took:]
		if ob.n >= maxEvents || len(idx) > 0 {
			s, buf := ob.detach()
			full, fullBufs = append(full, s), append(fullBufs, buf)
		}
	}
	ob.mu.Unlock()
	for i, s := range full {
		pl.seal(s, fullBufs[i])
	}
	return waits, placed
}

// detach takes the open batch out of ob, its reservation moved to the
// sealed batch. The caller holds ob.mu.
func (ob *openBatch) detach() (*sealed, []byte) {
	s, buf := ob.cur, ob.buf
	if s != nil {
		s.events, s.reserved = ob.n, ob.reserved
	}
	ob.cur, ob.buf, ob.n, ob.reserved = nil, nil, 0, 0
	return s, buf
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
	s, buf := ob.detach()
	ob.mu.Unlock()
	pl.seal(s, buf)
}

// seal wraps the encoded events in the batch envelope and queues the batch
// for delivery. It blocks while the queue is full: that is the backpressure
// that bounds memory.
func (pl *pipeline) seal(s *sealed, events []byte) {
	b := schemas.Batch{ID: s.id, Collector: pl.c.cfg.Name, SealedAt: pl.c.cfg.Now().UTC()}
	data, err := schemas.AppendEncodedBatch(batchBufs.Get().([]byte)[:0], &b, events)
	if cap(events) <= maxPooledBatch {
		batchBufs.Put(events[:0])
	}
	if err != nil { // a clock outside the years 0000 to 9999: a bug, not bad input
		pl.release(s.reserved)
		s.err = fmt.Errorf("encode batch %s: %w", s.id, err)
		close(s.done)
		return
	}
	s.data = data
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
				pl.release(s.reserved)
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
		s, buf := ob.detach()
		ob.mu.Unlock()
		if s != nil {
			pl.seal(s, buf)
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
		if reason := setAsideReason(err); reason != "" {
			// NATS is fine; this batch is not. Spooled, it is durable
			// (its requests get their 202) and the replay sets it aside.
			pl.c.log.Error("JetStream refuses a batch for good; spooling it to be set aside", "batch_id", s.id, "reason", reason, "err", err)
		} else {
			pl.degraded.Store(true)
			pl.c.log.Warn("publish failed; spooling until NATS answers again", "batch_id", s.id, "err", err)
		}
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
			if setAsideReason(err) != "" {
				return backoff.Permanent(err)
			}
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
	bo := ctxtime.Backoff()
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

// replayBatch is how many spooled batches one replay round has in flight,
// and replayBytes how many bytes of them (one batch more when the oldest
// alone is larger): batches of up to the server's message size (8 MiB) must
// not make a round hold a gigabyte.
const (
	replayBatch = 128
	replayBytes = 32 << 20
)

// replayOnce publishes the oldest spooled batches asynchronously with their
// original batch_id and acknowledges the prefix JetStream acknowledged. A
// batch JetStream refuses for good, or a record that cannot be read, is set
// aside (see SetAsideDir) and acknowledged with the prefix: no batch can
// block the ones behind it.
func (pl *pipeline) replayOnce(ctx context.Context) error {
	recs, err := pl.c.spool.FrontBytes(replayBatch, replayBytes)
	if err != nil {
		return fmt.Errorf("read spool: %w", err)
	}
	if len(recs) == 0 {
		return nil
	}
	type replayed struct {
		id, subject string
		data        []byte
		ack         jetstream.PubAckFuture // nil: refused or unreadable, see err
		err         error
	}
	futures := make([]replayed, 0, len(recs))
	var firstErr error
	for _, r := range recs {
		id, subject, data, err := decodeSpoolRecord(r.Data)
		if err != nil {
			futures = append(futures, replayed{err: err})
			continue
		}
		f, err := pl.c.js.PublishMsgAsync(batchMsg(subject, data), jetstream.WithMsgID(id), jetstream.WithExpectStream(schemas.UsageStream))
		if err != nil && setAsideReason(err) == "" {
			firstErr = fmt.Errorf("replay batch %s: %w", id, err)
			break
		}
		futures = append(futures, replayed{id: id, subject: subject, data: data, ack: f, err: err})
	}
	timeout := time.NewTimer(pl.c.cfg.PublishTimeout)
	defer timeout.Stop()
	var acked uint64
	for i, f := range futures {
		refused := f.err
		if f.ack != nil {
			select {
			case ack := <-f.ack.Ok():
				if ack.Duplicate {
					pl.c.metrics.publishDuplicates.Inc()
				}
			case err := <-f.ack.Err():
				if setAsideReason(err) != "" {
					refused = err
				} else {
					firstErr = fmt.Errorf("replay batch %s: %w", f.id, err)
				}
			case <-timeout.C:
				firstErr = fmt.Errorf("replay batch %s: timed out waiting for JetStream acks", f.id)
			case <-ctx.Done():
				firstErr = ctx.Err()
			}
			if firstErr != nil {
				break
			}
		}
		if refused != nil {
			if err := pl.setAside(recs[i], f.id, f.subject, f.data, refused); err != nil {
				firstErr = err
				break
			}
		} else {
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

// setAside moves spool record rec, which JetStream refused for good (id is
// its batch) or which cannot be read (id is ""), to the spool's set-aside
// directory (see setaside.go); the caller then acknowledges it.
func (pl *pipeline) setAside(rec spool.Record, id, subject string, data []byte, cause error) error {
	reason := setAsideReason(cause)
	if id == "" {
		reason, data = setAsideUnreadable, rec.Data
	}
	path, err := pl.c.spool.SetAside(setAsideName(rec.Seq, id), data,
		setAsideNote(id, subject, reason, cause, pl.c.cfg.Now()))
	if err != nil {
		return fmt.Errorf("set aside spooled batch %s (seq %d): %w", id, rec.Seq, err)
	}
	pl.c.metrics.setAside.WithLabelValues(reason).Inc()
	pl.c.log.Error("spooled batch set aside: JetStream refuses it for good, so it no longer blocks the spool; "+
		"its events are not counted until the file is replayed (POST its events to /v1/events) and removed",
		"batch_id", id, "reason", reason, "err", cause, "bytes", len(data), "file", path, "spool_seq", rec.Seq)
	return nil
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
