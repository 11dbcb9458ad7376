package enforcer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/schemas"
)

// KV buckets the enforcer keeps its state in, besides schemas.BlocklistBucket.
const (
	// BillingBucket holds each tenant's billing record (key = tenant).
	BillingBucket = "meterd-billing"
	// TenantsBucket holds the admin API's tenant changes (key = tenant):
	// catalog.Bucket, which every catalog.Watcher follows.
	TenantsBucket = catalog.Bucket
	// NotifyBucket holds a marker per notification sent (key = its id).
	NotifyBucket = "meterd-notify"
)

// Defaults of Config.
const (
	DefaultHeartbeatEvery = 5 * time.Second
	DefaultReconcileEvery = time.Minute
)

const (
	// notifyMarkerTTL outlives the longest billing period (a leap year).
	notifyMarkerTTL = 400 * 24 * time.Hour
	// writeRetry is how soon a failed blocklist write is tried again.
	writeRetry = time.Second
	// failingUnready: /readyz fails once blocklist writes fail this long.
	failingUnready = 30 * time.Second
	// subCloseWait bounds how long Run waits for the increments' callback
	// to return when it stops.
	subCloseWait = 5 * time.Second
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
	Catalog *catalog.Catalog
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
	Now func() time.Time
	// Logger receives the enforcer's logs; nil discards them.
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
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Registerer == nil {
		c.Registerer = prometheus.NewRegistry()
	}
	return nil
}

// buckets are the KV buckets, open once Run has created them.
type buckets struct {
	blocklist, billing, notify jetstream.KeyValue
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

	// watch follows the catalog file and the admin API's changes; the
	// catalog it gives is the one the enforcer decides by.
	watch *catalog.Watcher

	// syncMu serialises the writes of decisions; it is taken before mu.
	syncMu sync.Mutex

	mu         sync.Mutex
	cat        *catalog.Catalog // the watch's catalog the state was made for
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
		c, err := catalog.LoadCatalogFile(cfg.CatalogPath)
		if err != nil {
			return nil, fmt.Errorf("enforcer: %w", err)
		}
		cat = c
	}
	if cat == nil {
		cat = &catalog.Catalog{}
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
		cat:        cat,
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
	e.watch = catalog.NewWatcher(cfg.NATS, cat, cfg.Logger)
	e.watch.Path = cfg.CatalogPath
	e.watch.OnChange = e.onCatalog
	e.watch.OnReload = func(err error) {
		result := "ok"
		if err != nil {
			result = "error"
		}
		m.reloads.WithLabelValues(result).Inc()
	}
	for _, s := range cfg.BlockOn {
		e.blockOn[s] = true
	}
	e.notify = newNotifier(cfg.NATS, cfg.NotifyURLs, cfg.NotifySecret, log, m)
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
	var billing jetstream.KeyWatcher
	err := retry(ctx, func() error {
		var err error
		b, billing, err = e.prepare(ctx)
		if err != nil && ctx.Err() == nil {
			e.log.Warn("opening the enforcer's buckets failed; retrying", "err", err)
		}
		return err
	})
	if err != nil {
		return nil // ctx ended: retry only gives up then
	}
	wg.Go(func() { e.follow(ctx, billing) })
	// The tenants bucket exists now: the watch reads it to its end.
	wg.Go(func() { e.watch.Run(ctx) })
	select {
	case <-e.watch.Loaded():
	case <-ctx.Done():
		return nil
	}
	e.buckets.Store(b)
	wg.Go(func() { e.notify.run(ctx, b.notify) })

	// Subscribe before seeding: see the package documentation.
	sub, err := e.cfg.NATS.Subscribe(schemas.CommittedSubjectPrefix+"*", e.onCommitted)
	if err != nil {
		return fmt.Errorf("enforcer: subscribe to committed increments: %w", err)
	}
	// Unsubscribe does not wait for a callback already under way: Run
	// returns only once the subscription's delivery goroutine has ended,
	// so no onCommitted runs after it.
	subDone := make(chan struct{})
	sub.SetClosedHandler(func(string) { close(subDone) })
	defer func() {
		sub.Unsubscribe()
		select {
		case <-subDone:
		case <-time.After(subCloseWait):
			e.log.Warn("the committed-increments subscription did not end in time", "wait", subCloseWait)
		}
	}()

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

// prepare creates the buckets (the tenants bucket too, which the catalog
// watch follows), loads the billing records (returning their watch, to
// follow) and reads the blocklist.
func (e *Enforcer) prepare(ctx context.Context) (*buckets, jetstream.KeyWatcher, error) {
	var b buckets
	var tenants jetstream.KeyValue
	for _, kc := range []struct {
		kv  *jetstream.KeyValue
		cfg jetstream.KeyValueConfig
	}{
		{&b.blocklist, jetstream.KeyValueConfig{Bucket: schemas.BlocklistBucket, Description: "meterd decisions: key = tenant, a delete unblocks", History: 1, Storage: jetstream.FileStorage}},
		{&b.billing, jetstream.KeyValueConfig{Bucket: BillingBucket, Description: "meterd billing records from webhooks: key = tenant", History: 1, Storage: jetstream.FileStorage}},
		{&tenants, jetstream.KeyValueConfig{Bucket: TenantsBucket, Description: "meterd tenant changes of the admin API: key = tenant", History: 1, Storage: jetstream.FileStorage}},
		{&b.notify, jetstream.KeyValueConfig{Bucket: NotifyBucket, Description: "meterd notifications sent: key = notification id", History: 1, Storage: jetstream.FileStorage, TTL: notifyMarkerTTL}},
	} {
		kc.cfg.Replicas = e.cfg.Replicas
		kv, err := e.js.CreateOrUpdateKeyValue(ctx, kc.cfg)
		if err != nil {
			return nil, nil, fmt.Errorf("bucket %s: %w", kc.cfg.Bucket, err)
		}
		*kc.kv = kv
	}
	w, err := b.billing.WatchAll(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("watch %s: %w", b.billing.Bucket(), err)
	}
	if err := initial(ctx, w, e.applyEntry); err != nil {
		w.Stop()
		return nil, nil, fmt.Errorf("load %s: %w", b.billing.Bucket(), err)
	}
	if err := e.loadBlocklist(ctx, b.blocklist); err != nil {
		w.Stop()
		return nil, nil, err
	}
	return &b, w, nil
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

// applyEntry applies an entry of the billing bucket unless the enforcer
// already holds that revision or a newer one (its own writes are applied
// when made).
func (e *Enforcer) applyEntry(en jetstream.KeyValueEntry, _ bool) {
	deleted := en.Operation() == jetstream.KeyValueDelete || en.Operation() == jetstream.KeyValuePurge
	key := en.Key()
	var rec billingRecord
	if !deleted {
		if err := json.Unmarshal(en.Value(), &rec); err != nil {
			e.log.Error("malformed billing record in the bucket ignored", "tenant", key, "err", err)
			return
		}
	}
	e.setBilling(key, rec, en.Revision())
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
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

// Close stops a running Run; it is idempotent.
func (e *Enforcer) Close() error {
	e.closeOnce.Do(func() { close(e.closed) })
	return nil
}
