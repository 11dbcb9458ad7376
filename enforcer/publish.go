package enforcer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/schemas"
)

// loadBlocklist learns the decisions the bucket holds and their versions.
func (e *Enforcer) loadBlocklist(ctx context.Context, kv jetstream.KeyValue) error {
	w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return fmt.Errorf("read %s: %w", kv.Bucket(), err)
	}
	defer w.Stop()
	written := map[string]schemas.Decision{}
	err = initial(ctx, w, func(en jetstream.KeyValueEntry, _ bool) {
		if en.Key() == schemas.HeartbeatKey {
			return
		}
		var d schemas.Decision
		if err := json.Unmarshal(en.Value(), &d); err != nil {
			// Decided again and replaced (or deleted) once seeded.
			e.log.Warn("malformed decision in the blocklist", "tenant", en.Key(), "err", err)
			d = schemas.Decision{Tenant: en.Key(), Reason: "malformed"}
		}
		written[en.Key()] = d
	})
	if err != nil {
		return fmt.Errorf("read %s: %w", kv.Bucket(), err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.written = written
	e.setVersion = max(e.setVersion, uint64(e.now().UnixNano()))
	for t, d := range written {
		e.versions[t] = max(e.versions[t], d.Version)
		e.setVersion = max(e.setVersion, d.Version)
	}
	e.updateBlockedLocked()
	return nil
}

// writeLoop writes the decisions of dirty tenants.
func (e *Enforcer) writeLoop(ctx context.Context) {
	var retryC <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-e.wake:
		case <-retryC:
		}
		retryC = nil
		if err := e.flushDirty(ctx); err != nil && ctx.Err() == nil {
			e.log.Warn("writing decisions to the blocklist failed; retrying", "err", err)
			retryC = time.After(writeRetry)
		}
	}
}

// flushDirty decides every dirty tenant and writes what changed; a tenant
// whose write failed stays dirty.
func (e *Enforcer) flushDirty(ctx context.Context) error {
	e.mu.Lock()
	dirty := e.dirty
	e.dirty = map[string]time.Time{}
	e.mu.Unlock()
	var firstErr error
	for t, cause := range dirty {
		err := e.syncTenant(ctx, t, cause)
		if err == nil {
			continue
		}
		if firstErr == nil {
			firstErr = err
		}
		e.mu.Lock()
		if _, again := e.dirty[t]; !again {
			e.dirty[t] = cause
		}
		e.mu.Unlock()
	}
	if firstErr == nil {
		e.writeFailingSince.Store(0)
	} else {
		e.writeFailingSince.CompareAndSwap(0, time.Now().UnixNano())
	}
	return firstErr
}

// syncTenant makes the blocklist hold tenant's current decision: it writes
// a changed block, deletes the key of a lifted one, and leaves the key alone
// otherwise. Writes are serialised, so the bucket sees them in decision
// order.
func (e *Enforcer) syncTenant(ctx context.Context, tenant string, cause time.Time) error {
	b := e.buckets.Load()
	if b == nil {
		return nil
	}
	e.syncMu.Lock()
	defer e.syncMu.Unlock()
	e.mu.Lock()
	if !e.seeded {
		e.mu.Unlock()
		return nil
	}
	cur, has := e.written[tenant]
	var prev *schemas.Decision
	if has {
		prev = &cur
	}
	want, known := e.decideLocked(tenant, prev)
	if !known || (want == nil && !has) || (want != nil && has && sameBlock(*want, cur)) {
		e.mu.Unlock()
		return nil
	}
	now := e.now()
	version := max(e.versions[tenant]+1, uint64(now.UnixNano()))
	e.mu.Unlock()

	var err error
	if want == nil {
		err = b.blocklist.Delete(ctx, tenant)
	} else {
		want.Version, want.DecidedAt = version, now
		if want.Reason == schemas.ReasonQuotaExceeded {
			want.CrossedAt = cause.UTC()
		}
		data, _ := json.Marshal(want)
		_, err = b.blocklist.Put(ctx, tenant, data)
	}
	if errors.Is(err, jetstream.ErrInvalidKey) {
		// Not retried: no write can succeed. A tenant name that starts or
		// ends with '.' or holds "..": valid for schemas, not as a KV key.
		e.log.Error("the tenant name cannot be a blocklist key; its decision is not published", "tenant", tenant)
		return nil
	}
	if err != nil {
		e.m.writeFailures.Inc()
		return fmt.Errorf("blocklist %s: %w", tenant, err)
	}

	e.mu.Lock()
	e.versions[tenant] = version
	e.setVersion = max(e.setVersion+1, version)
	if want == nil {
		delete(e.written, tenant)
	} else {
		e.written[tenant] = *want
	}
	e.updateBlockedLocked()
	billingBlock := func(d *schemas.Decision) bool { return d != nil && d.Reason != schemas.ReasonQuotaExceeded }
	switch {
	case want == nil:
		e.notify.enqueue(Notification{Type: NotifyAccessRestored, ID: eventID("restored", tenant, cur.Version),
			Tenant: tenant, Reason: cur.Reason, At: now})
	case billingBlock(want) && !billingBlock(prev):
		e.notify.enqueue(Notification{Type: NotifyBillingUnpaid, ID: eventID("unpaid", tenant, version),
			Tenant: tenant, Reason: want.Reason, At: now})
	}
	e.mu.Unlock()

	if want == nil {
		e.m.decisions.WithLabelValues(reasonUnblocked).Inc()
		e.log.Info("tenant unblocked", "tenant", tenant, "was", cur.Reason, "version", version)
		return nil
	}
	e.m.decisions.WithLabelValues(string(want.Reason)).Inc()
	if want.Reason == schemas.ReasonQuotaExceeded && !cause.IsZero() {
		e.m.freshness.Observe(max(time.Since(cause).Seconds(), 0)) // clocks of two hosts
	}
	attrs := []any{"tenant", tenant, "reason", want.Reason, "version", version}
	if want.Reason == schemas.ReasonQuotaExceeded {
		attrs = append(attrs, "meter", want.Meter, "limit", want.Limit, "used", want.Used)
	}
	e.log.Info("tenant blocked", attrs...)
	return nil
}

// updateBlockedLocked sets the blocked-tenants gauge from the blocklist.
func (e *Enforcer) updateBlockedLocked() {
	counts := map[schemas.Reason]int{}
	for _, d := range e.written {
		counts[d.Reason]++
	}
	for _, r := range []schemas.Reason{schemas.ReasonQuotaExceeded, schemas.ReasonPaymentOverdue, schemas.ReasonPaymentMethodRequired, schemas.ReasonSuspended} {
		e.m.blocked.WithLabelValues(string(r)).Set(float64(counts[r]))
	}
}

// heartbeatLoop writes the heartbeat key every HeartbeatEvery.
func (e *Enforcer) heartbeatLoop(ctx context.Context, kv jetstream.KeyValue) {
	tick := time.NewTicker(e.cfg.HeartbeatEvery)
	defer tick.Stop()
	failing := false
	for {
		data, _ := json.Marshal(struct {
			At string `json:"at"`
		}{e.now().Format(time.RFC3339Nano)})
		if _, err := kv.Put(ctx, schemas.HeartbeatKey, data); err != nil {
			if !failing && ctx.Err() == nil {
				e.log.Warn("heartbeat write failed", "err", err)
			}
			failing = true
		} else {
			failing = false
			e.lastHeartbeat.Store(time.Now().UnixNano())
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
