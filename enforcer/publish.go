package enforcer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/ctxtime"
	"github.com/meterd/meterd/schemas"
)

// publisher writes the decisions to the blocklist bucket: one per dirty
// tenant, when it changed, with versions that only grow; it keeps the
// blocked gauge, queues the billing.unpaid and access.restored
// notifications, and writes the heartbeat.
type publisher struct {
	now    func() time.Time
	log    *slog.Logger
	m      *metrics
	open   *atomic.Pointer[buckets] // the Enforcer's buckets, once open
	track  *tracker                 // decides
	dirty  *dirtySet
	notify *notifier
	writer *blockWriter  // writes the bucket, while active
	every  time.Duration // of the heartbeat

	// syncMu serialises the writes of decisions, so the bucket sees them
	// in decision order; it is held across the KV write, and taken before
	// the tracker's lock and mu.
	syncMu sync.Mutex

	// mu guards the fields below it; it is taken alone, under syncMu or
	// under the catalog watcher's locks (never with the tracker's), and
	// takes nothing.
	mu         sync.Mutex
	written    map[string]schemas.Decision
	byReason   map[schemas.Reason]int // blocks in written per reason, for the gauge
	versions   map[string]uint64      // last version per tenant, blocks and unblocks
	setVersion uint64                 // grows with every change of the blocklist

	seeded            atomic.Bool  // the first seed is done: decisions are written
	lastHeartbeat     atomic.Int64 // unix nanos of the last heartbeat written
	writeFailingSince atomic.Int64 // unix nanos since blocklist writes fail, 0 when they work
}

// load learns the decisions the bucket holds and their versions.
func (p *publisher) load(ctx context.Context, kv jetstream.KeyValue) error {
	w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return fmt.Errorf("read %s: %w", kv.Bucket(), err)
	}
	defer w.Stop()
	return p.loadFrom(ctx, w, kv.Bucket())
}

// decoded returns the decision of a put entry of the bucket; ok is false
// for the heartbeat and for deletes.
func (p *publisher) decoded(en jetstream.KeyValueEntry) (d schemas.Decision, ok bool) {
	if en.Key() == schemas.HeartbeatKey || en.Operation() != jetstream.KeyValuePut {
		return d, false
	}
	if err := json.Unmarshal(en.Value(), &d); err != nil {
		// Decided again and replaced (or deleted) once seeded.
		p.log.Warn("malformed decision in the blocklist", "tenant", en.Key(), "err", err)
		d = schemas.Decision{Tenant: en.Key(), Reason: "malformed"}
	}
	return d, true
}

// loadFrom replaces the decisions known by the current values of w.
func (p *publisher) loadFrom(ctx context.Context, w jetstream.KeyWatcher, bucket string) error {
	written := map[string]schemas.Decision{}
	err := initial(ctx, w, func(en jetstream.KeyValueEntry) {
		if d, ok := p.decoded(en); ok {
			written[en.Key()] = d
		}
	})
	if err != nil {
		return fmt.Errorf("read %s: %w", bucket, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.written, p.byReason = map[string]schemas.Decision{}, map[schemas.Reason]int{}
	p.setVersion = max(p.setVersion, uint64(p.now().UnixNano()))
	for t, d := range written {
		p.setWrittenLocked(t, &d)
	}
	p.updateBlockedLocked()
	return nil
}

// setWrittenLocked records d (nil: none) as the decision the bucket holds
// for tenant, with the counts by reason that the blocked-tenants gauge
// shows and the version the next write of tenant must exceed. The caller
// holds p.mu and updates the gauge.
func (p *publisher) setWrittenLocked(tenant string, d *schemas.Decision) {
	if cur, ok := p.written[tenant]; ok {
		p.byReason[cur.Reason]--
	}
	if d == nil {
		delete(p.written, tenant)
		return
	}
	p.written[tenant] = *d
	p.byReason[d.Reason]++
	p.versions[tenant] = max(p.versions[tenant], d.Version)
	p.setVersion = max(p.setVersion, d.Version)
}

// writeLoop writes the decisions of dirty tenants.
func (p *publisher) writeLoop(ctx context.Context) {
	var retryC <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.dirty.wake:
		case <-retryC:
		}
		retryC = nil
		if err := p.flush(ctx); err != nil && ctx.Err() == nil {
			p.log.Warn("writing decisions to the blocklist failed; retrying", "err", err)
			retryC = time.After(writeRetry)
		}
	}
}

// flush decides every dirty tenant and writes what changed; a tenant whose
// write failed stays dirty.
func (p *publisher) flush(ctx context.Context) error {
	var firstErr error
	for t, cause := range p.dirty.take() {
		err := p.sync(ctx, t, cause)
		if err == nil {
			continue
		}
		if firstErr == nil {
			firstErr = err
		}
		p.dirty.putBack(t, cause)
	}
	if firstErr == nil {
		p.writeFailingSince.Store(0)
	} else {
		p.writeFailingSince.CompareAndSwap(0, time.Now().UnixNano())
	}
	return firstErr
}

// sync makes the blocklist hold tenant's current decision: it writes a
// changed block, deletes the key of a lifted one, and leaves the key alone
// otherwise. Writes are serialised, so the bucket sees them in decision
// order.
func (p *publisher) sync(ctx context.Context, tenant string, cause time.Time) error {
	if p.open.Load() == nil || !p.seeded.Load() || !p.writer.isActive() {
		return nil // a standby: the active replica decides
	}
	p.syncMu.Lock()
	defer p.syncMu.Unlock()
	// Only sync changes written, and syncMu is held: cur stays the
	// tenant's decision in the bucket until the write below.
	p.mu.Lock()
	cur, has := p.written[tenant]
	p.mu.Unlock()
	var prev *schemas.Decision
	if has {
		prev = &cur
	}
	want, known := p.track.decide(tenant, prev)
	if !known || (want == nil && !has) || (want != nil && has && sameBlock(*want, cur)) {
		return nil
	}
	now := p.now()
	p.mu.Lock()
	version := max(p.versions[tenant]+1, uint64(now.UnixNano()))
	p.mu.Unlock()

	var err error
	if want == nil {
		err = p.writer.del(ctx, tenant)
	} else {
		want.Version, want.DecidedAt = version, now
		if want.Reason == schemas.ReasonQuotaExceeded {
			want.CrossedAt = cause.UTC()
		}
		data, _ := json.Marshal(want)
		err = p.writer.put(ctx, tenant, data)
	}
	if errors.Is(err, jetstream.ErrInvalidKey) {
		// Not retried: no write can succeed. A tenant name that starts or
		// ends with '.' or holds "..": valid for schemas, not as a KV key.
		p.log.Error("the tenant name cannot be a blocklist key; its decision is not published", "tenant", tenant)
		return nil
	}
	if err != nil {
		p.m.writeFailures.Inc()
		return fmt.Errorf("blocklist %s: %w", tenant, err)
	}

	p.mu.Lock()
	p.versions[tenant] = version
	p.setVersion = max(p.setVersion+1, version)
	p.setWrittenLocked(tenant, want)
	p.updateBlockedLocked()
	p.mu.Unlock()
	billingBlock := func(d *schemas.Decision) bool { return d != nil && d.Reason != schemas.ReasonQuotaExceeded }
	switch {
	case want == nil:
		p.notify.enqueue(Notification{Type: NotifyAccessRestored, ID: eventID("restored", tenant, cur.Version),
			Tenant: tenant, Reason: cur.Reason, At: now})
	case billingBlock(want) && !billingBlock(prev):
		p.notify.enqueue(Notification{Type: NotifyBillingUnpaid, ID: eventID("unpaid", tenant, version),
			Tenant: tenant, Reason: want.Reason, At: now})
	}

	if want == nil {
		p.m.decisions.WithLabelValues(reasonUnblocked).Inc()
		p.log.Info("tenant unblocked", "tenant", tenant, "was", cur.Reason, "version", version)
		return nil
	}
	p.m.decisions.WithLabelValues(string(want.Reason)).Inc()
	if want.Reason == schemas.ReasonQuotaExceeded && !cause.IsZero() {
		p.m.freshness.Observe(max(time.Since(cause).Seconds(), 0)) // clocks of two hosts
	}
	attrs := []any{"tenant", tenant, "reason", want.Reason, "version", version}
	if want.Reason == schemas.ReasonQuotaExceeded {
		attrs = append(attrs, "meter", want.Meter, "limit", want.Limit, "used", want.Used)
	}
	p.log.Info("tenant blocked", attrs...)
	return nil
}

// updateBlockedLocked sets the blocked-tenants gauge from the counts kept
// with the blocklist: counting the blocklist at every write would cost
// O(blocked) per decision, O(blocked²) for a seed that blocks many tenants.
func (p *publisher) updateBlockedLocked() {
	for _, r := range []schemas.Reason{schemas.ReasonQuotaExceeded, schemas.ReasonPaymentOverdue, schemas.ReasonPaymentMethodRequired, schemas.ReasonSuspended} {
		p.m.blocked.WithLabelValues(string(r)).Set(float64(p.byReason[r]))
	}
}

// decision returns tenant's decision in the blocklist, if any.
func (p *publisher) decision(tenant string) (schemas.Decision, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	d, ok := p.written[tenant]
	return d, ok
}

// blocked lists the tenants the blocklist holds a decision for.
func (p *publisher) blocked() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Collect(maps.Keys(p.written))
}

// blocklist returns the decisions of the blocklist, by tenant, and the
// version of the set.
func (p *publisher) blocklist() BlocklistView {
	p.mu.Lock()
	defer p.mu.Unlock()
	v := BlocklistView{Version: p.setVersion, Decisions: make([]schemas.Decision, 0, len(p.written))}
	for _, t := range slices.Sorted(maps.Keys(p.written)) {
		v.Decisions = append(v.Decisions, p.written[t])
	}
	return v
}

// follow keeps the decisions known equal to the bucket's while this
// replica stands by, until ctx ends: the read API answers like the active
// replica's, and a takeover starts from them.
func (p *publisher) follow(ctx context.Context, kv jetstream.KeyValue) {
	for {
		w, err := kv.WatchAll(ctx)
		if err == nil {
			err = p.loadFrom(ctx, w, kv.Bucket())
		}
		if err == nil {
			err = p.followUpdates(ctx, w)
		}
		if w != nil {
			w.Stop()
		}
		if ctx.Err() != nil {
			return
		}
		p.log.Warn("following the blocklist failed; retrying", "err", err)
		if !ctxtime.Sleep(ctx, writeRetry) {
			return
		}
	}
}

// followUpdates applies the changes w delivers until ctx ends or w closes.
func (p *publisher) followUpdates(ctx context.Context, w jetstream.KeyWatcher) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case en, ok := <-w.Updates():
			if !ok {
				return errors.New("watch closed")
			}
			if en == nil || en.Key() == schemas.HeartbeatKey {
				continue
			}
			d, put := p.decoded(en)
			p.mu.Lock()
			if put {
				p.setWrittenLocked(en.Key(), &d)
			} else {
				p.setWrittenLocked(en.Key(), nil)
			}
			p.setVersion = max(p.setVersion+1, d.Version)
			p.updateBlockedLocked()
			p.mu.Unlock()
		}
	}
}

// heartbeatLoop writes the heartbeat key every p.every, while active.
func (p *publisher) heartbeatLoop(ctx context.Context) {
	tick := time.NewTicker(p.every)
	defer tick.Stop()
	failing := false
	for {
		data, _ := json.Marshal(struct {
			At string `json:"at"`
		}{p.now().Format(time.RFC3339Nano)})
		if err := p.writer.put(ctx, schemas.HeartbeatKey, data); err != nil {
			if !failing && ctx.Err() == nil {
				p.log.Warn("heartbeat write failed", "err", err)
			}
			failing = true
		} else {
			failing = false
			p.lastHeartbeat.Store(time.Now().UnixNano())
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// ready fails until the first heartbeat is written, and when heartbeats or
// decisions cannot be written.
func (p *publisher) ready() error {
	last := p.lastHeartbeat.Load()
	if last == 0 {
		return errors.New("enforcer: no heartbeat written yet")
	}
	if since := time.Since(time.Unix(0, last)); since > 3*p.every {
		return fmt.Errorf("enforcer: no heartbeat written for %s", since.Round(time.Second))
	}
	if f := p.writeFailingSince.Load(); f != 0 && time.Since(time.Unix(0, f)) > failingUnready {
		return fmt.Errorf("enforcer: blocklist writes failing for %s", time.Since(time.Unix(0, f)).Round(time.Second))
	}
	return nil
}
