package catalog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/ctxtime"
)

// Watcher follows the admin API's tenant changes (the Bucket) and gives
// the catalog file with them merged by Merge: the catalog every component
// reads. The enforcer decides by it, and serves the admin API through it
// (Check, Put, Delete); the aggregator reports billing periods with it, so
// a tenant whose plan or anchor an operator changed has the same periods in
// reports as in quotas; a collector's /v1/check knows with it which tenants
// have a plan, so a tenant the admin API created is not "unknown" at the
// gates.
//
// Locks: reloadMu (reloads of Path), then mu (the file and the changes),
// then whatever OnChange takes. The catalog itself is read without a lock.
type Watcher struct {
	nc  *nats.Conn
	log *slog.Logger
	// Retry is how long Run waits before following the bucket again after
	// the watch ended or the bucket was absent; NewWatcher sets 2s.
	Retry time.Duration
	// Path, when set before Run, is the config file the file's catalog was
	// read from: Run reads it again whenever its size or modification time
	// changes (checked every PollEvery), and so does Reload. A file that
	// does not parse is logged and the previous catalog stays.
	Path string
	// PollEvery is how often Run checks Path; NewWatcher sets 2s.
	PollEvery time.Duration
	// OnChange, when set before Run, is called with every new catalog, in
	// the order they are made, with the watcher's lock held: it must not
	// call the watcher's methods but Catalog. The enforcer recomputes its
	// decisions with it.
	OnChange func(*Catalog)
	// OnReload, when set before Run, is told the outcome of every reload
	// of Path (nil: the file was read and its catalog is in use).
	OnReload func(error)

	reloadMu sync.Mutex // serialises reloads; guards stamp
	stamp    fileStamp  // of Path when last read

	mu      sync.Mutex
	file    *Catalog
	changes Changes

	kv  atomic.Pointer[jetstream.KeyValue] // the Bucket, once Run opened it
	cat atomic.Pointer[Catalog]
	// loaded is set once the bucket has been read to its end, or found
	// absent: from then on the catalog holds every admin API change.
	loaded     atomic.Bool
	loadedC    chan struct{}
	loadedOnce sync.Once
}

// NewWatcher returns a watcher whose catalog is file until Run has
// read the bucket.
func NewWatcher(nc *nats.Conn, file *Catalog, log *slog.Logger) *Watcher {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	w := &Watcher{nc: nc, file: file, log: log.With("component", "catalog-watch"),
		Retry: 2 * time.Second, PollEvery: 2 * time.Second, loadedC: make(chan struct{})}
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

// Loaded is closed when Ready starts to return nil.
func (w *Watcher) Loaded() <-chan struct{} { return w.loadedC }

func (w *Watcher) setLoaded() {
	w.loaded.Store(true)
	w.loadedOnce.Do(func() { close(w.loadedC) })
}

// Run follows the bucket, and Path when set, until ctx ends; it returns nil
// then, once every goroutine it started has returned. The bucket is the
// enforcer's: while it does not exist (no enforcer ran yet) the file's
// catalog holds and Run looks again every Retry.
func (w *Watcher) Run(ctx context.Context) error {
	js, err := jetstream.New(w.nc)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	if w.Path != "" {
		wg.Go(func() { w.pollFile(ctx) })
	}
	for ctx.Err() == nil {
		switch err := w.follow(ctx, js); {
		case ctx.Err() != nil:
		case errors.Is(err, jetstream.ErrBucketNotFound):
			w.setLoaded()
			w.log.Debug("no enforcer bucket yet; the catalog file holds", "bucket", Bucket)
		default:
			w.log.Warn("following the admin API's tenant changes; the last catalog holds", "err", err)
		}
		ctxtime.Sleep(ctx, w.Retry)
	}
	return nil
}

// follow watches the bucket until the watch or ctx ends. Entries apply to
// the changes held (Changes.Apply ignores what is not newer), so an own
// write of Put is never undone by an older entry read again.
func (w *Watcher) follow(ctx context.Context, js jetstream.JetStream) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	kv, err := js.KeyValue(wctx, Bucket)
	if err != nil {
		return err
	}
	w.kv.Store(&kv)
	watch, err := kv.WatchAll(wctx)
	if err != nil {
		return err
	}
	defer watch.Stop()
	loaded := false
	for en := range watch.Updates() {
		if en == nil {
			loaded = true
			w.mu.Lock()
			w.rebuildLocked()
			w.mu.Unlock()
			w.setLoaded()
			continue
		}
		w.mu.Lock()
		changed, err := w.changes.Apply(en)
		if err != nil {
			w.log.Error("malformed tenant change in the bucket ignored", "tenant", en.Key(), "err", err)
		}
		if loaded && changed {
			w.rebuildLocked()
		}
		w.mu.Unlock()
	}
	return errors.New("the watch of " + Bucket + " ended")
}

// rebuildLocked merges the changes over the file and switches to the
// result; w.mu is held.
func (w *Watcher) rebuildLocked() {
	cat, dropped := w.changes.Merge(w.file)
	for tenant, fes := range dropped {
		w.log.Warn("a tenant change of the admin API no longer fits the catalog file; left out", "tenant", tenant, "err", JoinFieldErrors(fes))
	}
	w.cat.Store(cat)
	if w.OnChange != nil {
		w.OnChange(cat)
	}
}

// ErrNotFollowing is the error of Put and Delete before Run opened the
// bucket.
var ErrNotFollowing = errors.New("catalog: the bucket of the admin API's changes is not open yet")

// Check returns what would be wrong with tenant's change ch merged over the
// file with the other changes held (nil when it fits): the admin API's
// validation of a PUT.
func (w *Watcher) Check(tenant string, ch Change) []*FieldError {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.changes.Check(w.file, tenant, ch)
}

// Put stores ch as tenant's change in the bucket and applies it at once, so
// the catalog shows it when Put returns (its entry, coming back through the
// watch, changes nothing then).
func (w *Watcher) Put(ctx context.Context, tenant string, ch Change) error {
	kv := w.kv.Load()
	if kv == nil {
		return ErrNotFollowing
	}
	data, err := json.Marshal(ch)
	if err != nil {
		return err
	}
	rev, err := (*kv).Put(ctx, tenant, data)
	if err != nil {
		return fmt.Errorf("catalog: put the change of %s: %w", tenant, err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.changes.Set(tenant, ch, rev) {
		w.rebuildLocked()
	}
	return nil
}

// Delete removes tenant's change from the bucket and from the catalog at
// once; found is false, and nothing is done, when tenant has no change.
func (w *Watcher) Delete(ctx context.Context, tenant string) (found bool, err error) {
	kv := w.kv.Load()
	if kv == nil {
		return false, ErrNotFollowing
	}
	w.mu.Lock()
	found, rev := w.changes.Has(tenant), w.changes.Rev(tenant)
	w.mu.Unlock()
	if !found {
		return false, nil
	}
	if err := (*kv).Delete(ctx, tenant); err != nil {
		return true, fmt.Errorf("catalog: delete the change of %s: %w", tenant, err)
	}
	// The delete's revision comes back through the watch; drop the change
	// now so the caller sees its effect, unless a newer put was applied
	// meanwhile.
	w.mu.Lock()
	defer w.mu.Unlock()
	w.changes.Forget(tenant, rev)
	w.rebuildLocked()
	return true, nil
}

// Reload reads Path again. When it does not parse, the error is logged and
// returned and the previous catalog stays.
func (w *Watcher) Reload() error {
	if w.Path == "" {
		return errors.New("catalog: no catalog file to reload")
	}
	w.reloadMu.Lock()
	defer w.reloadMu.Unlock()
	w.stamp = stampOf(w.Path)
	file, err := LoadCatalogFile(w.Path)
	if err == nil {
		w.mu.Lock()
		w.file = file
		w.rebuildLocked()
		w.mu.Unlock()
		w.log.Info("catalog reloaded", "path", w.Path, "tenants", len(w.Catalog().TenantNames()))
	} else {
		w.log.Error("catalog reload failed; keeping the previous catalog", "path", w.Path, "err", err)
	}
	if w.OnReload != nil {
		w.OnReload(err)
	}
	return err
}

// pollFile reloads Path when its size or mtime changes. A change made
// between the reading of the file given to NewWatcher and Run is seen at
// the next change or Reload.
func (w *Watcher) pollFile(ctx context.Context) {
	w.reloadMu.Lock()
	if w.stamp == (fileStamp{}) {
		w.stamp = stampOf(w.Path)
	}
	w.reloadMu.Unlock()
	for ctxtime.Sleep(ctx, w.PollEvery) {
		w.reloadMu.Lock()
		changed := stampOf(w.Path) != w.stamp
		w.reloadMu.Unlock()
		if changed {
			w.Reload() // logs its own failure
		}
	}
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

// JoinFieldErrors joins fes into one error, for a log line.
func JoinFieldErrors(fes []*FieldError) error {
	errs := make([]error, len(fes))
	for i, fe := range fes {
		errs[i] = fe
	}
	return errors.Join(errs...)
}
