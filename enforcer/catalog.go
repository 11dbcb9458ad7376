package enforcer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/meterd/meterd/catalog"
)

// rebuildCatalogLocked merges the file catalog and the tenant changes, as
// every catalog.Watcher does.
func (e *Enforcer) rebuildCatalogLocked() {
	cat, dropped := e.changes.Merge(e.fileCat)
	for name, errs := range dropped {
		e.log.Error("a tenant change of the admin API no longer fits the catalog file; ignoring it",
			"tenant", name, "err", catalog.JoinFieldErrors(errs))
	}
	e.setCatalogLocked(cat)
}

// setCatalogLocked switches to cat. Tenants new to the catalog, and tenants
// whose period changed other than by rolling over, are read from the store
// again; every tenant is decided again.
func (e *Enforcer) setCatalogLocked(cat *catalog.Catalog) {
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
	cat, err := catalog.LoadCatalogFile(e.cfg.CatalogPath)
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
