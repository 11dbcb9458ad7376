package catalog

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Watcher follows the admin API's tenant changes (the Bucket) and gives
// the catalog file with them merged by Merge, the catalog the enforcer
// decides by. The aggregator reports billing
// periods with it, so a tenant whose plan or anchor an operator changed has
// the same periods in reports as in quotas; a collector's /v1/check knows
// with it which tenants have a plan, so a tenant the admin API created is
// not "unknown" at the gates.
type Watcher struct {
	nc   *nats.Conn
	file *Catalog
	log  *slog.Logger
	// Retry is how long Run waits before following the bucket again after
	// the watch ended or the bucket was absent; NewWatcher sets 2s.
	Retry time.Duration
	cat   atomic.Pointer[Catalog]
	// loaded is set once the bucket has been read to its end, or found
	// absent: from then on the catalog holds every admin API change.
	loaded atomic.Bool
}

// NewWatcher returns a watcher whose catalog is file until Run has
// read the bucket.
func NewWatcher(nc *nats.Conn, file *Catalog, log *slog.Logger) *Watcher {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	w := &Watcher{nc: nc, file: file, log: log.With("component", "catalog-watch"), Retry: 2 * time.Second}
	w.cat.Store(file)
	return w
}

// Catalog returns the current catalog; it is immutable.
func (w *Watcher) Catalog() *Catalog { return w.cat.Load() }

// ErrNotLoaded is Ready's answer until the watcher has read the
// admin API's changes once.
var ErrNotLoaded = errors.New("catalog: the admin API's tenant changes are not read yet")

// Ready reports whether the catalog holds the admin API's changes: nil
// once the bucket has been read to its end (or found absent, when no
// enforcer ran yet and the file is the whole catalog), and from then on,
// whatever happens to NATS later. A gate that denies unknown tenants must
// not serve before that, or a tenant the admin API created would be
// refused as unknown.
func (w *Watcher) Ready(context.Context) error {
	if w.loaded.Load() {
		return nil
	}
	return ErrNotLoaded
}

// Run follows the bucket until ctx ends. The bucket is the enforcer's: while
// it does not exist (no enforcer ran yet) the file's catalog holds and Run
// looks again every few seconds.
func (w *Watcher) Run(ctx context.Context) error {
	js, err := jetstream.New(w.nc)
	if err != nil {
		return err
	}
	for ctx.Err() == nil {
		switch err := w.follow(ctx, js); {
		case ctx.Err() != nil:
		case errors.Is(err, jetstream.ErrBucketNotFound):
			w.loaded.Store(true)
			w.log.Debug("no enforcer bucket yet; the catalog file holds", "bucket", Bucket)
		default:
			w.log.Warn("following the admin API's tenant changes; the last catalog holds", "err", err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(w.Retry):
		}
	}
	return nil
}

// follow watches the bucket until the watch or ctx ends.
func (w *Watcher) follow(ctx context.Context, js jetstream.JetStream) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	kv, err := js.KeyValue(wctx, Bucket)
	if err != nil {
		return err
	}
	watch, err := kv.WatchAll(wctx)
	if err != nil {
		return err
	}
	defer watch.Stop()
	var changes Changes
	loaded := false
	for en := range watch.Updates() {
		if en == nil {
			loaded = true
			w.rebuild(&changes)
			w.loaded.Store(true)
			continue
		}
		changed, err := changes.Apply(en)
		if err != nil {
			w.log.Error("malformed tenant change in the bucket ignored", "tenant", en.Key(), "err", err)
			continue
		}
		if loaded && changed {
			w.rebuild(&changes)
		}
	}
	return errors.New("the watch of " + Bucket + " ended")
}

func (w *Watcher) rebuild(changes *Changes) {
	cat, dropped := changes.Merge(w.file)
	for tenant, fes := range dropped {
		w.log.Warn("a tenant change of the admin API no longer fits the catalog file; left out", "tenant", tenant, "err", JoinFieldErrors(fes))
	}
	w.cat.Store(cat)
}

// JoinFieldErrors joins fes into one error, for a log line.
func JoinFieldErrors(fes []*FieldError) error {
	errs := make([]error, len(fes))
	for i, fe := range fes {
		errs[i] = fe
	}
	return errors.Join(errs...)
}
