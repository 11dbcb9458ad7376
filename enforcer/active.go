package enforcer

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/ctxtime"
	"github.com/meterd/meterd/internal/lease"
	"github.com/meterd/meterd/schemas"
)

// DefaultLeaseDuration is the lease duration of a replicated enforcer: a
// standby replaces an active replica that stopped renewing within it plus
// two polls (7.2 s), inside the 10 s failover bound, and the heartbeat
// lapses for at most one heartbeat period more (12.2 s), inside the gates'
// default staleness bound of 15 s.
const DefaultLeaseDuration = 6 * time.Second

// LeaseKey is the key of the enforcers' lease in the leases bucket: one
// active enforcer per blocklist bucket.
const LeaseKey = "enforcer." + schemas.BlocklistBucket

// Lease is a single-holder lease with a fencing token (internal/lease).
type Lease = lease.Holder

// ErrNotActive is returned by the blocklist writes of an enforcer that is
// not the active replica (it stands by, or its lease ran out).
var ErrNotActive = errors.New("enforcer: not the active replica")

// errFenced: the blocklist bucket was written by another process since this
// replica's last write.
var errFenced = errors.New("enforcer: the blocklist was written by another process")

// blockWriter is the only way into the blocklist bucket. With a lease it
// writes only while active and before the lease it renewed can be taken
// over (a context deadline), and each write expects the bucket's stream to
// end at this replica's own last write (Nats-Expected-Last-Sequence): only
// the active replica writes the bucket, so a write of anyone else in between
// (a zombie before it noticed, or the new active replica after the zombie's
// lease ran out) makes the next write fail. A zombie's write is therefore
// refused as soon as the new active replica has written once (it writes
// its heartbeat first), and a zombie write that slipped in before that
// fails the new replica's first write, which then reads the bucket again.
// Without a lease the writer is always active and writes plainly.
type blockWriter struct {
	js     jetstream.JetStream
	fenced bool // a lease is configured

	// writeMu serialises the writes (held across the publish) and guards
	// lastSeq: each write expects the one before.
	writeMu sync.Mutex
	lastSeq uint64 // the stream's last sequence as of this replica's last write

	// mu guards the term's state, never held across a call, so isActive
	// answers at once while a write waits on NATS.
	mu     sync.Mutex
	kv     jetstream.KeyValue
	active bool
	until  time.Time               // the lease's safe end, with a lease
	stop   context.CancelCauseFunc // ends the term when a write is fenced
}

// begin makes the writer active for a term of the lease: it reads the
// bucket's last sequence, which every write then expects. The caller reads
// the bucket's content after begin, so a write that slipped in between is
// seen there or fails the first write.
func (w *blockWriter) begin(ctx context.Context, kv jetstream.KeyValue, until time.Time, stop context.CancelCauseFunc) error {
	// Under writeMu, as a write is: one still in flight from the last term
	// lands before the sequence is read, not after it (which would make the
	// next write expect an old end and fence this replica).
	w.writeMu.Lock()
	info, err := w.js.Stream(ctx, "KV_"+kv.Bucket())
	if err == nil {
		w.lastSeq = info.CachedInfo().State.LastSeq
	}
	w.writeMu.Unlock()
	if err != nil {
		return fmt.Errorf("stream of %s: %w", kv.Bucket(), err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.kv, w.active, w.stop = kv, true, stop
	w.later(until)
	return nil
}

// always makes a writer without lease active for good.
func (w *blockWriter) always(kv jetstream.KeyValue) {
	w.mu.Lock()
	w.kv, w.active = kv, true
	w.mu.Unlock()
}

// renewed moves the end of the writes to until.
func (w *blockWriter) renewed(until time.Time) {
	w.mu.Lock()
	w.later(until)
	w.mu.Unlock()
}

// later moves until forward to t; the caller holds mu.
func (w *blockWriter) later(t time.Time) {
	if t.After(w.until) {
		w.until = t
	}
}

// end stops the writes of the term.
func (w *blockWriter) end() {
	w.mu.Lock()
	w.active, w.stop, w.until = false, nil, time.Time{}
	w.mu.Unlock()
}

// isActive reports whether this replica writes now: it holds the lease and
// the lease is safe (always true without a lease).
func (w *blockWriter) isActive() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.active && (!w.fenced || time.Now().Before(w.until))
}

// put writes key.
func (w *blockWriter) put(ctx context.Context, key string, value []byte) error {
	if w.fenced {
		return w.publish(ctx, &nats.Msg{Subject: "$KV." + schemas.BlocklistBucket + "." + key, Data: value})
	}
	kv, err := w.plain()
	if err == nil {
		_, err = kv.Put(ctx, key, value)
	}
	return err
}

// del deletes key (a delete marker, which watchers see).
func (w *blockWriter) del(ctx context.Context, key string) error {
	if w.fenced {
		m := nats.NewMsg("$KV." + schemas.BlocklistBucket + "." + key)
		m.Header.Set("KV-Operation", "DEL") // as jetstream.KeyValue.Delete writes it
		return w.publish(ctx, m)
	}
	kv, err := w.plain()
	if err == nil {
		err = kv.Delete(ctx, key)
	}
	return err
}

func (w *blockWriter) plain() (jetstream.KeyValue, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.active {
		return nil, ErrNotActive
	}
	return w.kv, nil
}

// publish writes m as the active replica, fenced as the type explains.
func (w *blockWriter) publish(ctx context.Context, m *nats.Msg) error {
	if !validKey(m.Subject) {
		return jetstream.ErrInvalidKey
	}
	w.writeMu.Lock()
	defer w.writeMu.Unlock()
	w.mu.Lock()
	active, until, stop := w.active, w.until, w.stop
	w.mu.Unlock()
	if !active {
		return ErrNotActive
	}
	if !time.Now().Before(until) {
		return fmt.Errorf("%w: the lease was not renewed in time", ErrNotActive)
	}
	ctx, cancel := context.WithDeadline(ctx, until)
	defer cancel()
	ack, err := w.js.PublishMsg(ctx, m, jetstream.WithExpectLastSequence(w.lastSeq))
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant) {
		w.mu.Lock()
		w.active = false
		w.mu.Unlock()
		if stop != nil {
			stop(errFenced)
		}
		return fmt.Errorf("%w: %w", ErrNotActive, errFenced)
	}
	if err != nil {
		return err
	}
	w.lastSeq = ack.Sequence
	return nil
}

// validKey reports whether the key of a $KV.<bucket>.<key> subject is a
// valid key-value key, as jetstream's KeyValue checks before it writes.
func validKey(subject string) bool {
	key := subject[len("$KV."+schemas.BlocklistBucket+"."):]
	if key == "" || key[0] == '.' || key[len(key)-1] == '.' {
		return false
	}
	for i := 0; i < len(key); i++ {
		c := key[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9',
			c == '-', c == '_', c == '/', c == '=', c == '.':
		default:
			return false
		}
		if c == '.' && i > 0 && key[i-1] == '.' {
			return false
		}
	}
	return true
}

// replicate runs the enforcer's writes: without a lease at once and until
// ctx ends; with one, it stands by (following the blocklist) until it holds
// the lease, is the active replica while it holds it, and stands by again
// when it loses it.
func (e *Enforcer) replicate(ctx context.Context, b *buckets) {
	if e.cfg.Lease == nil {
		e.writer.always(b.blocklist)
		e.activate(ctx, b)
		return
	}
	for {
		fctx, stopFollow := context.WithCancel(ctx)
		followed := make(chan struct{})
		go func() {
			defer close(followed)
			e.pub.follow(fctx, b.blocklist)
		}()
		token, err := e.cfg.Lease.Acquire(ctx)
		stopFollow()
		<-followed
		if err != nil {
			return // ctx ended
		}
		e.term(ctx, b, token)
		if ctx.Err() != nil {
			return
		}
	}
}

// term is one term as the active replica, with fencing token token: it
// ends when ctx ends (releasing the lease) or the lease is lost.
func (e *Enforcer) term(ctx context.Context, b *buckets, token uint64) {
	tctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	release := func() {
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.cfg.Lease.Release(rctx); err != nil {
			e.log.Warn("release the enforcer lease; it expires by itself", "err", err)
		}
	}
	// Renew from the start: reading the bucket may take a while, and a
	// lease that stood still for its duration is taken over.
	var wg sync.WaitGroup
	renewed := make(chan time.Time, 1)
	wg.Go(func() {
		t := time.NewTicker(e.cfg.Lease.Duration() / 3)
		defer t.Stop()
		for first := true; ; first = false {
			if !first {
				select {
				case <-tctx.Done():
					return
				case <-t.C:
				}
			}
			until, err := e.cfg.Lease.Renew(tctx)
			if err != nil {
				if tctx.Err() == nil {
					stop(err)
				}
				return
			}
			if first {
				renewed <- until
			}
			e.writer.renewed(until)
		}
	})
	var err error
	select {
	case until := <-renewed:
		err = e.writer.begin(tctx, b.blocklist, until, stop)
	case <-tctx.Done():
		err = context.Cause(tctx)
	}
	if err == nil {
		// What the previous replica wrote, up to its last write: bounded
		// by the lease's duration, for the lease is renewed meanwhile and
		// no heartbeat is written until it is read.
		lctx, cancel := context.WithTimeout(tctx, e.cfg.Lease.Duration())
		err = e.pub.load(lctx, b.blocklist)
		cancel()
	}
	if err != nil {
		stop(err)
		wg.Wait()
		e.writer.end()
		if ctx.Err() == nil {
			e.log.Warn("taking over as the active enforcer failed; standing by", "token", token, "err", err)
		}
		release()
		// Not at once again: a failure that lasts would otherwise take and
		// release the lease in a tight loop; another replica may take it.
		ctxtime.Sleep(ctx, e.cfg.Lease.Duration()/3)
		return
	}
	e.log.Info("enforcer lease held; active", "token", token)
	wg.Go(func() { e.activate(tctx, b) })
	<-tctx.Done()
	e.writer.end()
	wg.Wait()
	if ctx.Err() != nil {
		release()
		return
	}
	e.m.leaseLost.Inc()
	e.log.Warn("lost the enforcer lease; standing by", "token", token, "cause", context.Cause(tctx))
	if errors.Is(context.Cause(tctx), errFenced) {
		// The lease may still be ours (a zombie wrote after this replica
		// took over): give it up, so a replica takes it at once and reads
		// the bucket again.
		release()
	}
}

// takeoverReconcileWait bounds the reconcile a replica runs when it takes
// over before it decides.
const takeoverReconcileWait = 10 * time.Second

// activate writes decisions, heartbeats and notifications until ctx ends:
// every tenant is decided again (a decision that did not change is not
// written, so a takeover does not flap the blocklist), and the thresholds
// reached are queued again (their markers keep them from being sent twice).
// A replica that takes over first reads usage from the store again: it may
// have missed a committed increment the previous replica counted (they are
// published at most once), and deciding without it could lift a block
// only to set it again at the next reconcile. The heartbeat starts at once.
func (e *Enforcer) activate(ctx context.Context, b *buckets) {
	e.m.active.Set(1)
	defer e.m.active.Set(0)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { e.pub.heartbeatLoop(ctx) })
	if e.cfg.Lease != nil {
		rctx, cancel := context.WithTimeout(ctx, takeoverReconcileWait)
		err := e.rec.reconcile(rctx, nil)
		cancel()
		if err != nil && ctx.Err() == nil {
			e.log.Warn("reading usage from the store on takeover failed; deciding from the usage followed", "err", err)
		}
	}
	e.track.setNotifying(true)
	defer func() {
		e.track.setNotifying(false)
		e.notify.drop()
	}()
	e.track.track()
	for _, t := range e.pub.blocked() {
		e.dirty.mark(t, time.Time{})
	}
	wg.Go(func() { e.pub.writeLoop(ctx) })
	<-ctx.Done()
}
