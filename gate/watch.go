package gate

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/ctxtime"
	"github.com/meterd/meterd/schemas"
)

// Tuning of the watch.
const (
	// setupTimeout bounds opening the bucket and starting a watch.
	setupTimeout = 10 * time.Second
	// stopTimeout bounds waiting for an abandoned watch to close.
	stopTimeout = 5 * time.Second
	// maxBurst bounds the entries applied in one snapshot, so a flood of
	// updates still shows up in Check while it lasts.
	maxBurst = 4096
)

// Why a watch ended without failing.
var (
	errReconnected = errors.New("gate: NATS reconnected")
	errSilent      = errors.New("gate: watch silent")
	errWatchClosed = errors.New("gate: watch closed by the NATS client")
)

// watchLoop watches the bucket again and again until ctx ends or the
// connection is closed for good.
func (g *Gate) watchLoop(ctx context.Context) error {
	nc := g.cfg.NATS
	status := nc.StatusChanged(nats.CONNECTED, nats.CLOSED)
	defer nc.RemoveStatusListener(status)
	bo := ctxtime.Backoff()
	lastLogged := ""
	for {
		loaded, err := g.watch(ctx, status)
		if ctx.Err() != nil {
			return nil
		}
		if nc.IsClosed() {
			return fmt.Errorf("gate: watch bucket %s: %w", g.cfg.Bucket, nats.ErrConnectionClosed)
		}
		if loaded {
			bo.Reset()
			lastLogged = ""
		}
		switch {
		case errors.Is(err, errReconnected):
			g.log.Info("NATS reconnected; reloading the blocklist")
		case errors.Is(err, errSilent):
			g.log.Warn("the blocklist watch delivered nothing, not even a heartbeat; reloading it", "silent_for", g.silentAfter())
		default:
			g.lastErr.Store(&err)
			// Log a failure once per streak, not at every retry.
			if msg := err.Error(); msg != lastLogged {
				g.log.Warn("blocklist watch failed; retrying with backoff", "err", err)
				lastLogged = msg
			}
		}
		if !ctxtime.Sleep(ctx, bo.NextBackOff()) {
			return nil
		}
	}
}

// silentAfter is how long a watch may deliver nothing before it is
// replaced. A live enforcer heartbeats far more often; a watch that the
// client library failed to recover (nats.go#1094 was one) looks the same as
// a dead enforcer from here, and reloading costs one replay of the bucket.
func (g *Gate) silentAfter() time.Duration { return 2 * g.cfg.StaleAfter }

// watch runs one KV watch until it fails, NATS reconnects, the watch stays
// silent, or ctx ends. loaded reports whether it delivered every initial
// value.
func (g *Gate) watch(ctx context.Context, status <-chan nats.Status) (loaded bool, err error) {
	// Status changes from before this watch are moot: it starts afresh.
	for drained := false; !drained; {
		select {
		case s := <-status:
			if s == nats.CLOSED {
				return false, nats.ErrConnectionClosed
			}
		default:
			drained = true
		}
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w, err := g.startWatch(wctx, cancel)
	if err != nil {
		return false, err
	}
	defer g.stopWatch(w, cancel)

	a := &applier{g: g, replaying: true, overlay: map[string]*Block{}}
	silent := time.NewTimer(g.silentAfter())
	defer silent.Stop()
	burst := make([]jetstream.KeyValueEntry, 0, 64)
	for {
		select {
		case <-ctx.Done():
			return !a.replaying, nil
		case s := <-status:
			if s == nats.CLOSED {
				return !a.replaying, nats.ErrConnectionClosed
			}
			return !a.replaying, errReconnected
		case <-silent.C:
			if !g.cfg.NATS.IsConnected() { // the reconnect will reload
				silent.Reset(g.silentAfter())
				continue
			}
			return !a.replaying, errSilent
		case e, open := <-w.Updates():
			if !open {
				return !a.replaying, errWatchClosed
			}
			// Take what else is waiting, so a burst costs one copy of the
			// snapshot instead of one per entry.
			burst = append(burst[:0], e)
		drain:
			for open && len(burst) < maxBurst {
				select {
				case e, open = <-w.Updates():
					if open {
						burst = append(burst, e)
					}
				default:
					break drain
				}
			}
			a.apply(burst)
			if !open {
				return !a.replaying, errWatchClosed
			}
			silent.Reset(g.silentAfter())
		}
	}
}

// startWatch opens the bucket and watches every key of it. The watch lives
// as long as ctx, so its setup is bounded by a timer cancelling ctx rather
// than by a deadline.
func (g *Gate) startWatch(ctx context.Context, cancel context.CancelFunc) (jetstream.KeyWatcher, error) {
	timer := time.AfterFunc(setupTimeout, cancel)
	defer timer.Stop()
	kv, err := g.js.KeyValue(ctx, g.cfg.Bucket)
	if err != nil {
		return nil, fmt.Errorf("gate: open bucket %s: %w", g.cfg.Bucket, err)
	}
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return nil, fmt.Errorf("gate: watch bucket %s: %w", g.cfg.Bucket, err)
	}
	if !timer.Stop() {
		g.stopWatch(w, cancel)
		return nil, fmt.Errorf("gate: watch bucket %s: no answer within %s", g.cfg.Bucket, setupTimeout)
	}
	return w, nil
}

// stopWatch ends w and reads its channel until the client library closes
// it: the library's delivery goroutine blocks on a full channel nobody reads.
func (g *Gate) stopWatch(w jetstream.KeyWatcher, cancel context.CancelFunc) {
	cancel()
	_ = w.Stop() // fails when cancel already unsubscribed; nothing else to do
	t := time.NewTimer(stopTimeout)
	defer t.Stop()
	for {
		select {
		case _, open := <-w.Updates():
			if !open {
				return
			}
		case <-t.C:
			g.log.Warn("an abandoned blocklist watch did not close", "waited", stopTimeout)
			return
		}
	}
}

// applier turns the entries of one watch into snapshots. While the watch
// replays the bucket (until its nil marker) entries collect in overlay and
// the previous snapshot keeps answering; at the marker the bucket's state
// replaces it at once. After that, each burst of entries is applied to one
// new snapshot, which copies only the pages the burst touches.
type applier struct {
	g         *Gate
	replaying bool
	overlay   map[string]*Block // tenant → block to hold; nil = none
	changes   uint64            // changes in overlay not yet in a snapshot
}

// apply applies a burst of entries; a nil entry is the end of the replay.
func (a *applier) apply(burst []jetstream.KeyValueEntry) {
	g := a.g
	now := g.cfg.Now()
	g.clock.Store(g.since(now))
	old := g.snap.Load()
	for _, e := range burst {
		if e == nil {
			a.commit(old)
			old = g.snap.Load()
			a.replaying = false
			g.ready.Store(true)
			continue
		}
		g.received(e, now, a.replaying)
		key := e.Key()
		if key == schemas.HeartbeatKey {
			continue
		}
		held, ok := a.overlay[key]
		if !ok {
			held = old.get(key)
		}
		b := g.resolve(e, held)
		if b != held {
			a.changes++
		}
		a.overlay[key] = b
	}
	if !a.replaying {
		a.commit(old)
	}
}

// commit publishes overlay as a new snapshot if anything changed. At the end
// of a replay the snapshot becomes exactly what the bucket holds: tenants
// missing from it (their delete markers gone) are unblocked too.
func (a *applier) commit(old *snapshot) {
	g := a.g
	if a.replaying {
		old.each(func(tenant string, _ *Block) {
			if _, ok := a.overlay[tenant]; !ok {
				a.changes++
				g.log.Info("tenant no longer in the bucket on reload; unblocked", "tenant", tenant)
			}
		})
	}
	if a.changes > 0 {
		var next *snapshot
		if a.replaying {
			next = built(old.seed, a.overlay, old.version+a.changes)
		} else {
			next = old.with(a.overlay, old.version+a.changes)
		}
		g.snap.Store(next)
		g.obs.SnapshotPublished(a.changes, next.blocked)
		a.observeFreshness(old)
	}
	a.changes = 0
	a.overlay = map[string]*Block{}
}

// observeFreshness records, for every block the new snapshot holds for a
// limit crossed since the gate started, the time since the crossing usage
// was sealed: the freshness (docs/architecture.md#freshness-and-the-gate) as this gate sees it. A block first
// seen in a replay counts too (a reconnecting gate is late), one loaded at
// start for an older crossing does not.
func (a *applier) observeFreshness(old *snapshot) {
	g := a.g
	var now time.Time
	for tenant, b := range a.overlay {
		if b == nil || b.Decision.CrossedAt.IsZero() || !b.Decision.CrossedAt.After(g.born) {
			continue
		}
		if held := old.get(tenant); held != nil && held.Decision.CrossedAt.Equal(b.Decision.CrossedAt) {
			continue
		}
		if now.IsZero() {
			now = g.cfg.Now()
		}
		g.obs.Freshness(max(now.Sub(b.Decision.CrossedAt), 0))
	}
}

// received records that the bucket delivered e. A replayed entry counts
// from when the server stored it (capped at now), so reloading an old
// heartbeat does not make the gate look current; a live entry counts from
// now.
func (g *Gate) received(e jetstream.KeyValueEntry, now time.Time, replaying bool) {
	t := now
	if created := e.Created(); replaying && created.Before(now) {
		t = created
	}
	if seen := g.since(t); seen > g.lastSeen.Load() {
		g.lastSeen.Store(seen)
	}
}

// resolve returns the block to hold for e's key after e, given the block
// held before (nil = none): nil for a delete or purge, held again for an
// older version or a malformed value, else e's block.
func (g *Gate) resolve(e jetstream.KeyValueEntry, held *Block) *Block {
	if op := e.Operation(); op == jetstream.KeyValueDelete || op == jetstream.KeyValuePurge {
		return nil
	}
	d, err := decodeDecision(e.Key(), e.Value())
	if err == nil && held != nil {
		if d.Version < held.Decision.Version {
			g.obs.DecisionIgnored()
			g.log.Debug("ignored an older decision", "tenant", d.Tenant, "version", d.Version,
				"held_version", held.Decision.Version, "revision", e.Revision())
			return held
		}
		if d == held.Decision {
			return held
		}
	}
	var b *Block
	if err == nil {
		b, err = newBlock(d)
	}
	if err != nil {
		g.obs.ValueMalformed()
		g.log.Warn("ignored a malformed blocklist value", "key", e.Key(), "revision", e.Revision(), "err", err)
		return held
	}
	return b
}
