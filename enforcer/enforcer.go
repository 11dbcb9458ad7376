package enforcer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
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
	"github.com/meterd/meterd/internal/bucket"
	"github.com/meterd/meterd/internal/ctxtime"
	"github.com/meterd/meterd/internal/quiet"
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
	// Lease, if set, makes this enforcer one of several replicas: it writes
	// decisions and heartbeats and sends notifications only while it holds
	// the lease (key LeaseKey), and stands by, following the committed
	// increments, the catalog and the blocklist, while another replica
	// does (see the package documentation). Without a lease the enforcer
	// assumes it is the only one.
	Lease Lease
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
	quiet.Defaults(&c.Logger, &c.Registerer)
	return nil
}

// buckets are the KV buckets, open once Run has created them.
type buckets struct {
	blocklist, billing, notify jetstream.KeyValue
}

// Enforcer decides which tenants are blocked and tells the gateways. It
// wires its parts, each owning its state and one job (see the package
// documentation): the catalog watch, the usage tracker and its reconciler,
// the billing records, the publisher of decisions, the notifier and the
// HTTP API.
type Enforcer struct {
	cfg     Config
	log     *slog.Logger
	js      jetstream.JetStream
	buckets atomic.Pointer[buckets]

	watch   *catalog.Watcher // the catalog file and the admin API's changes
	dirty   *dirtySet
	billing *billing
	track   *tracker
	rec     *reconciler
	pub     *publisher
	notify  *notifier
	api     *api
	writer  *blockWriter // the blocklist's writer, fenced by the lease
	m       *metrics

	running   atomic.Bool
	closeOnce sync.Once
	closed    chan struct{}
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
	now := func() time.Time { return cfg.Now().UTC() }
	e := &Enforcer{cfg: cfg, log: log, js: js, m: m, closed: make(chan struct{})}
	e.writer = &blockWriter{js: js, fenced: cfg.Lease != nil}
	e.dirty = newDirtySet()
	e.notify = newNotifier(cfg.NATS, cfg.NotifyURLs, cfg.NotifySecret, log, m)
	e.notify.active = e.writer.isActive
	e.billing = newBilling(cfg.BlockOn, log, e.dirty)
	e.track = newTracker(cat, now, log, e.billing, e.dirty, e.notify)
	e.rec = &reconciler{store: cfg.Store, track: e.track, log: log, m: m, every: cfg.ReconcileEvery}
	e.pub = &publisher{now: now, log: log, m: m, open: &e.buckets, track: e.track, dirty: e.dirty, notify: e.notify, writer: e.writer,
		every: cfg.HeartbeatEvery, written: map[string]schemas.Decision{}, byReason: map[schemas.Reason]int{}, versions: map[string]uint64{}}
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
	e.api = &api{keys: cfg.Keys, webhookSecret: cfg.WebhookSecret, webhookTolerance: cfg.WebhookTolerance,
		now: now, log: log, m: m, open: &e.buckets,
		watch: e.watch, track: e.track, billing: e.billing, pub: e.pub, rec: e.rec}
	return e, nil
}

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
	wg.Go(func() { e.billing.follow(ctx, billing) })
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
	sub, err := e.cfg.NATS.Subscribe(schemas.CommittedSubjectPrefix+"*", e.track.onCommitted)
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

	e.track.track()
	retrySoon := false
	err = retry(ctx, func() error {
		err := e.rec.reconcile(ctx, nil)
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
	e.pub.seeded.Store(true)
	e.log.Info("enforcer seeded from the store", "tenants", e.track.track(), "blocked_before", len(e.pub.blocked()))

	wg.Go(func() { e.rec.loop(ctx, retrySoon) })
	wg.Go(func() { e.track.rolloverLoop(ctx) })
	// Every tenant is decided again once active, and every block of a
	// tenant gone from the catalog lifted.
	e.replicate(ctx, b)
	return nil
}

// retry runs op with exponential backoff until it succeeds or ctx ends.
func retry(ctx context.Context, op func() error) error {
	bo := ctxtime.Backoff()
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
		kv   *jetstream.KeyValue
		spec bucket.Spec
	}{
		{&b.blocklist, bucket.Spec{Name: schemas.BlocklistBucket, Description: "meterd decisions: key = tenant, a delete unblocks"}},
		{&b.billing, bucket.Spec{Name: BillingBucket, Description: "meterd billing records from webhooks: key = tenant"}},
		{&tenants, bucket.Spec{Name: TenantsBucket, Description: "meterd tenant changes of the admin API: key = tenant"}},
		{&b.notify, bucket.Spec{Name: NotifyBucket, Description: "meterd notifications sent: key = notification id", TTL: notifyMarkerTTL}},
	} {
		kc.spec.Replicas = e.cfg.Replicas
		kv, err := bucket.Ensure(ctx, e.js, kc.spec)
		if err != nil {
			return nil, nil, err
		}
		*kc.kv = kv
	}
	w, err := b.billing.WatchAll(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("watch %s: %w", b.billing.Bucket(), err)
	}
	if err := initial(ctx, w, e.billing.apply); err != nil {
		w.Stop()
		return nil, nil, fmt.Errorf("load %s: %w", b.billing.Bucket(), err)
	}
	if err := e.pub.load(ctx, b.blocklist); err != nil {
		w.Stop()
		return nil, nil, err
	}
	return &b, w, nil
}

// initial feeds the current values of a watch to apply, up to the marker
// that ends them.
func initial(ctx context.Context, w jetstream.KeyWatcher, apply func(jetstream.KeyValueEntry)) error {
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
			apply(en)
		}
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// Catalog returns the plans and tenants the enforcer decides with: the
// catalog file with the admin API's changes merged. The catalog is
// immutable; a later change replaces it. It never waits on a lock, so a
// gate may ask it on every call.
func (e *Enforcer) Catalog() *catalog.Catalog {
	return e.watch.Catalog()
}

// Summary returns the usage summary of tenant, or of every tenant of the
// catalog when tenant is "".
func (e *Enforcer) Summary(tenant string) Summary { return e.api.summary(tenant) }

// Register adds the enforcer's HTTP API to mux.
func (e *Enforcer) Register(mux *http.ServeMux) { e.api.register(mux) }

// Ready fails until the enforcer has seeded and written its first
// heartbeat, when the store is unreachable, and when the blocklist cannot
// be written (heartbeats or decisions).
//
// A standby replica is ready once seeded while its store and the lease
// bucket answer: it serves the read API like the active one and takes over
// from warm state. That exactly one replica is active is what the
// meterd_enforcer_active_leases metric and its alert tell.
func (e *Enforcer) Ready(ctx context.Context) error {
	if e.buckets.Load() == nil {
		return errors.New("enforcer: buckets not open yet")
	}
	if !e.pub.seeded.Load() {
		return errors.New("enforcer: usage not seeded from the store yet")
	}
	if err := e.cfg.Store.Ping(ctx); err != nil {
		return fmt.Errorf("enforcer: store: %w", err)
	}
	if l := e.cfg.Lease; l != nil && !e.writer.isActive() {
		if since := time.Since(l.Answered()); since > l.Duration() {
			return fmt.Errorf("enforcer: standby: the lease bucket has not answered for %s", since.Round(time.Second))
		}
		return nil
	}
	return e.pub.ready()
}

// Close stops a running Run; it is idempotent.
func (e *Enforcer) Close() error {
	e.closeOnce.Do(func() { close(e.closed) })
	return nil
}
