package enforcer

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/catalog"
)

// CatalogWatcher gives another process the catalog the enforcer decides
// by: the catalog file with the admin API's tenant changes (the
// TenantsBucket) merged the same way. The aggregator reports billing
// periods with it, so a tenant whose plan or anchor an operator changed has
// the same periods in reports as in quotas; a collector's /v1/check knows
// with it which tenants have a plan, so a tenant the admin API created is
// not "unknown" at the gates.
type CatalogWatcher struct {
	nc    *nats.Conn
	file  *catalog.Catalog
	log   *slog.Logger
	retry time.Duration
	cat   atomic.Pointer[catalog.Catalog]
	// loaded is set once the bucket has been read to its end, or found
	// absent: from then on the catalog holds every admin API change.
	loaded atomic.Bool
}

// NewCatalogWatcher returns a watcher whose catalog is file until Run has
// read the bucket.
func NewCatalogWatcher(nc *nats.Conn, file *catalog.Catalog, log *slog.Logger) *CatalogWatcher {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	w := &CatalogWatcher{nc: nc, file: file, log: log.With("component", "catalog-watch"), retry: 2 * time.Second}
	w.cat.Store(file)
	return w
}

// Catalog returns the current catalog; it is immutable.
func (w *CatalogWatcher) Catalog() *catalog.Catalog { return w.cat.Load() }

// ErrCatalogNotLoaded is Ready's answer until the watcher has read the
// admin API's changes once.
var ErrCatalogNotLoaded = errors.New("enforcer: the admin API's tenant changes are not read yet")

// Ready reports whether the catalog holds the admin API's changes: nil
// once the bucket has been read to its end (or found absent, when no
// enforcer ran yet and the file is the whole catalog), and from then on,
// whatever happens to NATS later. A gate that denies unknown tenants must
// not serve before that, or a tenant the admin API created would be
// refused as unknown.
func (w *CatalogWatcher) Ready(context.Context) error {
	if w.loaded.Load() {
		return nil
	}
	return ErrCatalogNotLoaded
}

// Run follows the bucket until ctx ends. The bucket is the enforcer's: while
// it does not exist (no enforcer ran yet) the file's catalog holds and Run
// looks again every few seconds.
func (w *CatalogWatcher) Run(ctx context.Context) error {
	js, err := jetstream.New(w.nc)
	if err != nil {
		return err
	}
	for ctx.Err() == nil {
		switch err := w.follow(ctx, js); {
		case ctx.Err() != nil:
		case errors.Is(err, jetstream.ErrBucketNotFound):
			w.loaded.Store(true)
			w.log.Debug("no enforcer bucket yet; the catalog file holds", "bucket", TenantsBucket)
		default:
			w.log.Warn("following the admin API's tenant changes; the last catalog holds", "err", err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(w.retry):
		}
	}
	return nil
}

// follow watches the bucket until the watch or ctx ends.
func (w *CatalogWatcher) follow(ctx context.Context, js jetstream.JetStream) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	kv, err := js.KeyValue(wctx, TenantsBucket)
	if err != nil {
		return err
	}
	watch, err := kv.WatchAll(wctx)
	if err != nil {
		return err
	}
	defer watch.Stop()
	specs := map[string]tenantSpec{}
	loaded := false
	for en := range watch.Updates() {
		if en == nil {
			loaded = true
			w.rebuild(specs)
			w.loaded.Store(true)
			continue
		}
		if op := en.Operation(); op == jetstream.KeyValueDelete || op == jetstream.KeyValuePurge {
			delete(specs, en.Key())
		} else {
			var spec tenantSpec
			if err := json.Unmarshal(en.Value(), &spec); err != nil {
				w.log.Error("malformed tenant change in the bucket ignored", "tenant", en.Key(), "err", err)
				continue
			}
			specs[en.Key()] = spec
		}
		if loaded {
			w.rebuild(specs)
		}
	}
	return errors.New("the watch of " + TenantsBucket + " ended")
}

func (w *CatalogWatcher) rebuild(specs map[string]tenantSpec) {
	cat, dropped := mergeCatalog(w.file, specs, "")
	for tenant, fes := range dropped {
		w.log.Warn("a tenant change of the admin API no longer fits the catalog file; left out", "tenant", tenant, "err", asErrors(fes))
	}
	w.cat.Store(cat)
}
