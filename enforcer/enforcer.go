// Package enforcer owns plans, quotas and billing status, decides which
// tenants are blocked, and broadcasts the decisions to every gateway through
// the JetStream KV bucket meterd-blocklist (docs/architecture.md: NATS names, Decision, Freshness).
//
// # Usage
//
// The enforcer keeps, per tenant and meter, the usage of the tenant's current
// billing period in memory. It learns usage from the increments the
// aggregator publishes on meterd.committed.<partition> after each durable
// commit, seeds from the store's totals at start, and reconciles with the
// store every Config.ReconcileEvery; it never scans raw events per decision.
//
// Seeding and reconciling race with increments in flight: a total read from
// the store at instant S already holds the increments committed before S, and
// some of those may reach the enforcer only after it asked. The enforcer
// subscribes before it seeds, and while a totals query runs it journals the
// increments arriving for the tenants queried. When the query returns, a
// tenant's usage becomes the store's total plus the journaled increments:
// every increment that arrived before the query started is replaced by the
// store's count, every one committed after the store's snapshot is added
// once. The only increments counted twice are those committed before the
// snapshot but delivered after the query started: the publish latency of a
// core NATS message, well under a millisecond on a healthy link. The next
// reconcile replaces the total again, so an error never outlives one
// ReconcileEvery. Increments are published at most once (core NATS); a lost
// one is likewise restored by the next reconcile.
//
// One tenant's data never holds the others back: when the totals query of a
// period fails while the store answers a ping, the tenants are read one by
// one (UsageSource.TenantTotals); a tenant whose own query fails keeps its
// decision and is retried every second, the others are seeded and decided.
// Usage sums saturate at math.MaxInt64 (internal/saturating), which is above
// every limit.
//
// An increment counts toward a tenant's current period when its hour lies in
// it; billing periods are whole UTC days, so an hour never straddles two.
// Increments for hours after the period (event times may lie up to five
// minutes ahead) are kept as the start of the next period's usage. When the
// clock passes a period's end, the tenant rolls over: its usage restarts from
// those, and a quota block of the old period is lifted.
//
// # Decisions
//
// A tenant is blocked for billing when its billing status is one of
// Config.BlockOn (reason payment_overdue for past_due and unpaid,
// payment_method_required for incomplete, suspended for canceled and
// suspended), else for quota when its plan's on_exceed is block and its
// usage of a limited meter reached the limit (quota_exceeded). A decision is
// written only when it changes (reason, meter, limit, period or billing URL);
// Used is the usage when the block was decided. Versions only grow per
// tenant: max(previous + 1, the clock in Unix nanoseconds). An unblock
// deletes the tenant's key. Every Config.HeartbeatEvery the enforcer writes
// schemas.HeartbeatKey so gates can tell a quiet enforcer from a dead one.
//
// # Billing
//
// Billing status comes from the catalog (status), and from Stripe-compatible
// webhooks, kept per tenant in the KV bucket meterd-billing and derived from
// event content and timestamps, never from arrival order (see billingRecord).
// The admin API's tenant changes are kept in the KV bucket meterd-tenants and
// merged over the catalog file; both buckets are watched, so restarts and
// replicas see the same state.
package enforcer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/billing"
	"github.com/meterd/meterd/schemas"
)

// UsageSource is where the enforcer seeds and reconciles usage totals from:
// the aggregator's store (every aggregator.Store satisfies it; the enforcer
// needs these three methods only, so it does not import the aggregator).
type UsageSource interface {
	// Totals returns the usage per (tenant, meter) with from <= time < to.
	Totals(ctx context.Context, from, to time.Time) ([]schemas.Increment, error)
	// TenantTotals returns the usage per meter of tenant alone: read tenant
	// by tenant when Totals fails while the store answers.
	TenantTotals(ctx context.Context, tenant string, from, to time.Time) ([]schemas.Increment, error)
	// Ping reports whether the store is reachable.
	Ping(ctx context.Context) error
}

// KV buckets the enforcer keeps its state in, besides schemas.BlocklistBucket.
const (
	// BillingBucket holds each tenant's billing record (key = tenant).
	BillingBucket = "meterd-billing"
	// TenantsBucket holds the admin API's tenant changes (key = tenant).
	TenantsBucket = "meterd-tenants"
	// NotifyBucket holds a marker per notification sent (key = its id).
	NotifyBucket = "meterd-notify"
)

// Defaults of Config.
const (
	DefaultHeartbeatEvery = 5 * time.Second
	DefaultReconcileEvery = time.Minute
)

const (
	// catalogPollEvery is how often the catalog file's mtime is checked.
	catalogPollEvery = 2 * time.Second
	// notifyMarkerTTL outlives the longest billing period (a leap year).
	notifyMarkerTTL = 400 * 24 * time.Hour
	// writeRetry is how soon a failed blocklist write is tried again.
	writeRetry = time.Second
	// failingUnready: /readyz fails once blocklist writes fail this long.
	failingUnready = 30 * time.Second
)

// Config configures an Enforcer.
type Config struct {
	// NATS is the connection of the buckets, increments and notifications.
	// Required.
	NATS *nats.Conn
	// Store is where usage is seeded and reconciled from. Required.
	Store UsageSource
	// Catalog holds the plans and tenants. When nil, it is loaded from
	// CatalogPath, or empty when that is empty too.
	Catalog *billing.Catalog
	// CatalogPath, when set, is the config file the catalog is reloaded
	// from: when its mtime changes (checked every 2s) and on Reload. A file
	// that does not parse is logged and the previous catalog stays.
	CatalogPath string
	// Keys authenticates the admin API; only admin keys may use it. Nil
	// rejects every request.
	Keys *auth.Keys
	// WebhookSecret is the signing secret (Stripe's whsec_…) of billing
	// webhooks; empty disables POST /v1/billing/webhook (404).
	WebhookSecret string
	// WebhookTolerance bounds the age of a webhook's signed timestamp
	// (default 5m).
	WebhookTolerance time.Duration
	// BlockOn lists the billing statuses that block a tenant: past_due,
	// unpaid, canceled, suspended and incomplete (a payment method or
	// action is needed); default all of them.
	BlockOn []string
	// NotifyURLs receive every notification as a signed POST.
	NotifyURLs []string
	// NotifySecret signs the notifications POSTed (Meterd-Signature);
	// empty sends them unsigned.
	NotifySecret string
	// HeartbeatEvery is the period of the heartbeat key (default 5s).
	HeartbeatEvery time.Duration
	// ReconcileEvery is the period of recomputing usage from the store
	// (default 1m).
	ReconcileEvery time.Duration
	// Replicas of the KV buckets the enforcer creates (default 1; 3 on a
	// production cluster).
	Replicas int
	// Now is the clock of periods and decisions (default time.Now).
	Now        func() time.Time
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Validate checks c and fills in defaults.
func (c *Config) Validate() error {
	if c.NATS == nil {
		return errors.New("enforcer: NATS connection is required")
	}
	if c.Store == nil {
		return errors.New("enforcer: store is required")
	}
	if c.WebhookTolerance < 0 {
		return errors.New("enforcer: webhook tolerance must not be negative")
	}
	if c.WebhookTolerance == 0 {
		c.WebhookTolerance = DefaultWebhookTolerance
	}
	if len(c.BlockOn) == 0 {
		c.BlockOn = slices.Clone(DefaultBlockOn)
	}
	for _, s := range c.BlockOn {
		if _, ok := statusReason[s]; !ok {
			return fmt.Errorf("enforcer: block-on status %q is not one of past_due, unpaid, canceled, suspended, incomplete", s)
		}
	}
	for i, raw := range c.NotifyURLs {
		u, err := url.Parse(raw)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			// Not quoted: a notification URL may hold a token.
			return fmt.Errorf("enforcer: notify URL %d of %d must be an absolute http or https URL", i+1, len(c.NotifyURLs))
		}
	}
	if c.HeartbeatEvery <= 0 {
		c.HeartbeatEvery = DefaultHeartbeatEvery
	}
	if c.ReconcileEvery <= 0 {
		c.ReconcileEvery = DefaultReconcileEvery
	}
	if c.Replicas <= 0 {
		c.Replicas = 1
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
	return nil
}

// buckets are the KV buckets, open once Run has created them.
type buckets struct {
	blocklist, billing, tenants, notify jetstream.KeyValue
}

// Enforcer decides which tenants are blocked and tells the gateways.
type Enforcer struct {
	cfg     Config
	log     *slog.Logger
	js      jetstream.JetStream
	m       *metrics
	blockOn map[string]bool
	notify  *notifier
	buckets atomic.Pointer[buckets]

	running   atomic.Bool
	closeOnce sync.Once
	closed    chan struct{}

	reloadMu     sync.Mutex
	catalogStamp fileStamp // of the catalog file last read

	// syncMu serialises the writes of decisions; it is taken before mu.
	syncMu sync.Mutex

	// catalog is cat for readers that must not wait on mu: the gate of
	// `meterd dev` asks it on every /v1/check.
	catalog atomic.Pointer[billing.Catalog]

	mu         sync.Mutex
	fileCat    *billing.Catalog
	specs      map[string]tenantSpec // the admin API's tenant changes
	specRevs   map[string]uint64
	cat        *billing.Catalog // fileCat with specs merged
	tracking   bool             // usage is tracked: Run has started seeding
	seeded     bool             // the first seed is done: decisions are written
	usage      map[string]*tenantUsage
	records    map[string]billingRecord
	recordRevs map[string]uint64
	journals   map[*journal]struct{}
	reseed     map[string]bool      // tenants whose usage must be read from the store again
	dirty      map[string]time.Time // tenants to decide again → arrival of the increment that crossed a limit
	written    map[string]schemas.Decision
	versions   map[string]uint64 // last version per tenant, blocks and unblocks
	setVersion uint64            // grows with every change of the blocklist
	notified   map[string]map[string]bool

	wake       chan struct{} // dirty tenants wait
	reseedWake chan struct{}

	lastHeartbeat     atomic.Int64 // unix nanos of the last heartbeat written
	writeFailingSince atomic.Int64 // unix nanos since blocklist writes fail, 0 when they work
}

// New builds an Enforcer; Run opens its buckets and starts deciding.
func New(cfg Config) (*Enforcer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cat := cfg.Catalog
	if cat == nil && cfg.CatalogPath != "" {
		c, err := billing.LoadCatalogFile(cfg.CatalogPath)
		if err != nil {
			return nil, fmt.Errorf("enforcer: %w", err)
		}
		cat = c
	}
	if cat == nil {
		cat = &billing.Catalog{}
	}
	js, err := jetstream.New(cfg.NATS)
	if err != nil {
		return nil, fmt.Errorf("enforcer: jetstream: %w", err)
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	log := cfg.Logger.With("component", "enforcer")
	e := &Enforcer{
		cfg: cfg, log: log, js: js, m: m,
		blockOn:    map[string]bool{},
		closed:     make(chan struct{}),
		fileCat:    cat,
		cat:        cat,
		specs:      map[string]tenantSpec{},
		specRevs:   map[string]uint64{},
		usage:      map[string]*tenantUsage{},
		records:    map[string]billingRecord{},
		recordRevs: map[string]uint64{},
		journals:   map[*journal]struct{}{},
		reseed:     map[string]bool{},
		dirty:      map[string]time.Time{},
		written:    map[string]schemas.Decision{},
		versions:   map[string]uint64{},
		notified:   map[string]map[string]bool{},
		wake:       make(chan struct{}, 1),
		reseedWake: make(chan struct{}, 1),
	}
	e.catalog.Store(cat)
	for _, s := range cfg.BlockOn {
		e.blockOn[s] = true
	}
	e.notify = newNotifier(cfg.NATS, cfg.NotifyURLs, cfg.NotifySecret, log, m)
	if cfg.CatalogPath != "" {
		e.catalogStamp = stampOf(cfg.CatalogPath)
	}
	return e, nil
}

func (e *Enforcer) now() time.Time { return e.cfg.Now().UTC() }

// Run opens the buckets, loads the persisted state, seeds usage from the
// store and then decides until ctx ends or Close is called. It returns nil
// on cancellation, after every goroutine it started has returned.
func (e *Enforcer) Run(ctx context.Context) error {
	if !e.running.CompareAndSwap(false, true) {
		return errors.New("enforcer: Run called twice")
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Go(func() {
		select {
		case <-e.closed:
			cancel()
		case <-ctx.Done():
		}
	})

	var b *buckets
	var watchers []jetstream.KeyWatcher
	err := retry(ctx, func() error {
		var err error
		b, watchers, err = e.prepare(ctx)
		if err != nil && ctx.Err() == nil {
			e.log.Warn("opening the enforcer's buckets failed; retrying", "err", err)
		}
		return err
	})
	if err != nil {
		return nil // ctx ended: retry only gives up then
	}
	for _, w := range watchers {
		wg.Go(func() { e.follow(ctx, w) })
	}
	e.buckets.Store(b)
	wg.Go(func() { e.notify.run(ctx, b.notify) })

	// Subscribe before seeding: see the package documentation.
	sub, err := e.cfg.NATS.Subscribe(schemas.CommittedSubjectPrefix+"*", e.onCommitted)
	if err != nil {
		return fmt.Errorf("enforcer: subscribe to committed increments: %w", err)
	}
	defer sub.Unsubscribe()

	e.mu.Lock()
	e.tracking = true
	e.setCatalogLocked(e.cat)
	e.mu.Unlock()
	retrySoon := false
	err = retry(ctx, func() error {
		err := e.reconcile(ctx, nil)
		if errors.Is(err, errUnseeded) {
			// One tenant's data must not hold every other tenant's
			// decisions back: those are seeded, these retried.
			e.log.Warn("seeding some tenants from the store failed; they keep their decisions and are retried", "err", err)
			retrySoon = true
			return nil
		}
		if err != nil && ctx.Err() == nil {
			e.log.Warn("seeding usage from the store failed; retrying", "err", err)
		}
		return err
	})
	if err != nil {
		return nil
	}
	e.mu.Lock()
	e.seeded = true
	for t := range e.usage {
		e.markDirtyLocked(t, time.Time{})
	}
	for t := range e.written { // stale blocks of tenants gone from the catalog
		e.markDirtyLocked(t, time.Time{})
	}
	tenants, blocked := len(e.usage), len(e.written)
	e.mu.Unlock()
	e.log.Info("enforcer seeded from the store; deciding", "tenants", tenants, "blocked_before", blocked)

	wg.Go(func() { e.writeLoop(ctx) })
	wg.Go(func() { e.heartbeatLoop(ctx, b.blocklist) })
	wg.Go(func() { e.reconcileLoop(ctx, retrySoon) })
	wg.Go(func() { e.rolloverLoop(ctx) })
	if e.cfg.CatalogPath != "" {
		wg.Go(func() { e.pollCatalog(ctx) })
	}
	<-ctx.Done()
	return nil
}

// retry runs op with exponential backoff until it succeeds or ctx ends.
func retry(ctx context.Context, op func() error) error {
	bo := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second),
		backoff.WithMaxElapsedTime(0),
	)
	return backoff.Retry(func() error {
		if err := op(); err != nil {
			if ctx.Err() != nil {
				return backoff.Permanent(ctx.Err())
			}
			return err
		}
		return nil
	}, backoff.WithContext(bo, ctx))
}

// prepare creates the buckets, loads the tenant changes and billing records
// (returning their watchers, to follow) and reads the blocklist.
func (e *Enforcer) prepare(ctx context.Context) (*buckets, []jetstream.KeyWatcher, error) {
	var b buckets
	for _, kc := range []struct {
		kv  *jetstream.KeyValue
		cfg jetstream.KeyValueConfig
	}{
		{&b.blocklist, jetstream.KeyValueConfig{Bucket: schemas.BlocklistBucket, Description: "meterd decisions: key = tenant, a delete unblocks", History: 1, Storage: jetstream.FileStorage}},
		{&b.billing, jetstream.KeyValueConfig{Bucket: BillingBucket, Description: "meterd billing records from webhooks: key = tenant", History: 1, Storage: jetstream.FileStorage}},
		{&b.tenants, jetstream.KeyValueConfig{Bucket: TenantsBucket, Description: "meterd tenant changes of the admin API: key = tenant", History: 1, Storage: jetstream.FileStorage}},
		{&b.notify, jetstream.KeyValueConfig{Bucket: NotifyBucket, Description: "meterd notifications sent: key = notification id", History: 1, Storage: jetstream.FileStorage, TTL: notifyMarkerTTL}},
	} {
		kc.cfg.Replicas = e.cfg.Replicas
		kv, err := e.js.CreateOrUpdateKeyValue(ctx, kc.cfg)
		if err != nil {
			return nil, nil, fmt.Errorf("bucket %s: %w", kc.cfg.Bucket, err)
		}
		*kc.kv = kv
	}
	var watchers []jetstream.KeyWatcher
	stopAll := func() {
		for _, w := range watchers {
			w.Stop()
		}
	}
	for _, kv := range []jetstream.KeyValue{b.tenants, b.billing} {
		w, err := kv.WatchAll(ctx)
		if err != nil {
			stopAll()
			return nil, nil, fmt.Errorf("watch %s: %w", kv.Bucket(), err)
		}
		watchers = append(watchers, w)
		if err := initial(ctx, w, e.applyEntry); err != nil {
			stopAll()
			return nil, nil, fmt.Errorf("load %s: %w", kv.Bucket(), err)
		}
	}
	e.mu.Lock()
	e.rebuildCatalogLocked()
	e.mu.Unlock()
	if err := e.loadBlocklist(ctx, b.blocklist); err != nil {
		stopAll()
		return nil, nil, err
	}
	return &b, watchers, nil
}

// initial feeds the current values of a watch to apply, up to the marker
// that ends them.
func initial(ctx context.Context, w jetstream.KeyWatcher, apply func(jetstream.KeyValueEntry, bool)) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case en, ok := <-w.Updates():
			if !ok {
				return errors.New("watch closed")
			}
			if en == nil {
				return nil
			}
			apply(en, true)
		}
	}
}

// follow applies the updates of a watch until ctx ends.
func (e *Enforcer) follow(ctx context.Context, w jetstream.KeyWatcher) {
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case en, ok := <-w.Updates():
			if !ok {
				if ctx.Err() == nil {
					e.log.Error("a bucket watch ended; changes by other enforcers are no longer seen")
				}
				return
			}
			if en != nil {
				e.applyEntry(en, false)
			}
		}
	}
}

// applyEntry applies an entry of the tenants or billing bucket unless the
// enforcer already holds that revision or a newer one (its own writes are
// applied when made). During the initial load the catalog is rebuilt once,
// after all entries.
func (e *Enforcer) applyEntry(en jetstream.KeyValueEntry, loading bool) {
	deleted := en.Operation() == jetstream.KeyValueDelete || en.Operation() == jetstream.KeyValuePurge
	key := en.Key()
	e.mu.Lock()
	defer e.mu.Unlock()
	switch en.Bucket() {
	case TenantsBucket:
		if en.Revision() <= e.specRevs[key] {
			return
		}
		e.specRevs[key] = en.Revision()
		if deleted {
			delete(e.specs, key)
		} else {
			var spec tenantSpec
			if err := json.Unmarshal(en.Value(), &spec); err != nil {
				e.log.Error("malformed tenant change in the bucket ignored", "tenant", key, "err", err)
				return
			}
			e.specs[key] = spec
		}
		if !loading {
			e.rebuildCatalogLocked()
		}
	case BillingBucket:
		var rec billingRecord
		if !deleted {
			if err := json.Unmarshal(en.Value(), &rec); err != nil {
				e.log.Error("malformed billing record in the bucket ignored", "tenant", key, "err", err)
				return
			}
		}
		e.putRecordLocked(key, rec, en.Revision())
	}
}

// setBilling makes rec, of revision rev, tenant's billing record.
func (e *Enforcer) setBilling(tenant string, rec billingRecord, rev uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.putRecordLocked(tenant, rec, rev)
}

func (e *Enforcer) putRecordLocked(tenant string, rec billingRecord, rev uint64) {
	if rev <= e.recordRevs[tenant] {
		return
	}
	e.recordRevs[tenant] = rev
	e.records[tenant] = rec
	e.markDirtyLocked(tenant, time.Time{})
}

// rebuildCatalogLocked merges the file catalog and the tenant changes.
func (e *Enforcer) rebuildCatalogLocked() {
	cat, dropped := mergeCatalog(e.fileCat, e.specs, "")
	for name, errs := range dropped {
		e.log.Error("a tenant change of the admin API no longer fits the catalog file; ignoring it",
			"tenant", name, "err", errors.Join(asErrors(errs)...))
	}
	e.setCatalogLocked(cat)
}

func asErrors(fes []*fieldError) []error {
	out := make([]error, len(fes))
	for i, fe := range fes {
		out[i] = fe
	}
	return out
}

// setCatalogLocked switches to cat. Tenants new to the catalog, and tenants
// whose period changed other than by rolling over, are read from the store
// again; every tenant is decided again.
func (e *Enforcer) setCatalogLocked(cat *billing.Catalog) {
	e.cat = cat
	e.catalog.Store(cat)
	if !e.tracking {
		return
	}
	now := e.now()
	in := map[string]bool{}
	for _, t := range cat.TenantNames() {
		in[t] = true
		p := cat.PeriodOf(t, now)
		u := e.usage[t]
		switch {
		case u == nil:
			u = newTenantUsage(p)
			e.usage[t] = u
			e.reseed[t] = true
		case !u.period.Start.Equal(p.Start) || !u.period.End.Equal(p.End):
			if u.roll(p) {
				e.reseed[t] = true
			}
			delete(e.notified, t)
		}
		e.markDirtyLocked(t, time.Time{})
		e.checkThresholdsLocked(t, u)
	}
	for t := range e.usage {
		if !in[t] {
			delete(e.usage, t)
			delete(e.notified, t)
			delete(e.reseed, t)
			e.markDirtyLocked(t, time.Time{})
		}
	}
	for t := range e.written {
		if !in[t] {
			e.markDirtyLocked(t, time.Time{})
		}
	}
	if len(e.reseed) > 0 {
		signal(e.reseedWake)
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// markDirtyLocked has tenant decided again. cause, when set, is when the
// usage that crossed a limit was sealed (the increment's arrival when it
// does not say): the start of the freshness the write of the block is
// measured by.
func (e *Enforcer) markDirtyLocked(tenant string, cause time.Time) {
	if prev, ok := e.dirty[tenant]; !ok || prev.IsZero() || (!cause.IsZero() && cause.Before(prev)) {
		e.dirty[tenant] = cause
	}
	signal(e.wake)
}

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

// decideLocked returns tenant's decision (nil: not blocked); known is false
// when it depends on usage not read from the store yet.
func (e *Enforcer) decideLocked(tenant string, prev *schemas.Decision) (d *schemas.Decision, known bool) {
	t, plan, ok := e.cat.Tenant(tenant)
	if !ok {
		return nil, true
	}
	if st := e.worstStatusLocked(tenant, t.Status, true); st != billing.StatusActive {
		return &schemas.Decision{Tenant: tenant, Reason: statusReason[st], BillingURL: t.BillingURL}, true
	}
	u := e.usage[tenant]
	if u == nil || !u.seeded {
		return nil, false
	}
	return decideQuota(tenant, plan, e.cat.Limits(tenant), u, t.BillingURL, prev), true
}

// worstStatusLocked is the worst of tenant's configured status and the
// statuses of its billing record, among those that block when blocking.
func (e *Enforcer) worstStatusLocked(tenant, configured string, blocking bool) string {
	worst := billing.StatusActive
	rec := e.records[tenant]
	for _, st := range append([]string{configured}, rec.statuses()...) {
		if (!blocking || e.blockOn[st]) && worse(st, worst) {
			worst = st
		}
	}
	return worst
}

// billingStatusLocked is tenant's billing status, blocking or not.
func (e *Enforcer) billingStatusLocked(tenant string) string {
	t, _, _ := e.cat.Tenant(tenant)
	return e.worstStatusLocked(tenant, t.Status, false)
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

// Ready fails until the enforcer has seeded and written its first
// heartbeat, when the store is unreachable, and when the blocklist cannot
// be written (heartbeats or decisions).
func (e *Enforcer) Ready(ctx context.Context) error {
	e.mu.Lock()
	seeded := e.seeded
	e.mu.Unlock()
	if e.buckets.Load() == nil {
		return errors.New("enforcer: buckets not open yet")
	}
	if !seeded {
		return errors.New("enforcer: usage not seeded from the store yet")
	}
	if err := e.cfg.Store.Ping(ctx); err != nil {
		return fmt.Errorf("enforcer: store: %w", err)
	}
	last := e.lastHeartbeat.Load()
	if last == 0 {
		return errors.New("enforcer: no heartbeat written yet")
	}
	if since := time.Since(time.Unix(0, last)); since > 3*e.cfg.HeartbeatEvery {
		return fmt.Errorf("enforcer: no heartbeat written for %s", since.Round(time.Second))
	}
	if f := e.writeFailingSince.Load(); f != 0 && time.Since(time.Unix(0, f)) > failingUnready {
		return fmt.Errorf("enforcer: blocklist writes failing for %s", time.Since(time.Unix(0, f)).Round(time.Second))
	}
	return nil
}

// Register adds the enforcer's HTTP API to mux.
func (e *Enforcer) Register(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/billing/webhook", e.handleWebhook)
	mux.HandleFunc("GET /v1/tenants/{tenant}", e.handleGetTenant)
	mux.HandleFunc("PUT /v1/tenants/{tenant}", e.handlePutTenant)
	mux.HandleFunc("DELETE /v1/tenants/{tenant}", e.handleDeleteTenant)
	mux.HandleFunc("GET /v1/blocklist", e.handleBlocklist)
	mux.HandleFunc("GET /v1/usage/summary", e.handleSummary)
}

// Close stops a running Run; it is idempotent.
func (e *Enforcer) Close() error {
	e.closeOnce.Do(func() { close(e.closed) })
	return nil
}

// fileStamp identifies a version of a file by size and mtime.
type fileStamp struct {
	size, modTime int64
	missing       bool
}

func stampOf(path string) fileStamp {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{missing: true}
	}
	return fileStamp{size: fi.Size(), modTime: fi.ModTime().UnixNano()}
}

// Reload reads the catalog file again. When it does not parse, the error is
// logged and returned and the previous catalog stays. Tenants whose period
// changed are read from the store again in the background.
func (e *Enforcer) Reload() error {
	if e.cfg.CatalogPath == "" {
		return errors.New("enforcer: no catalog file to reload")
	}
	e.reloadMu.Lock()
	defer e.reloadMu.Unlock()
	e.catalogStamp = stampOf(e.cfg.CatalogPath)
	cat, err := billing.LoadCatalogFile(e.cfg.CatalogPath)
	if err != nil {
		e.m.reloads.WithLabelValues("error").Inc()
		e.log.Error("catalog reload failed; keeping the previous catalog", "path", e.cfg.CatalogPath, "err", err)
		return fmt.Errorf("enforcer: reload: %w", err)
	}
	e.mu.Lock()
	e.fileCat = cat
	e.rebuildCatalogLocked()
	n := len(e.cat.TenantNames())
	e.mu.Unlock()
	e.m.reloads.WithLabelValues("ok").Inc()
	e.log.Info("catalog reloaded", "path", e.cfg.CatalogPath, "tenants", n)
	return nil
}

// pollCatalog reloads the catalog file when its size or mtime changes.
func (e *Enforcer) pollCatalog(ctx context.Context) {
	tick := time.NewTicker(catalogPollEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		e.reloadMu.Lock()
		changed := stampOf(e.cfg.CatalogPath) != e.catalogStamp
		e.reloadMu.Unlock()
		if changed {
			e.Reload() // logs its own failure
		}
	}
}
