package enforcer

import (
	"time"

	"github.com/meterd/meterd/catalog"
)

// onCatalog is the catalog.Watcher's OnChange: it switches to cat.
func (e *Enforcer) onCatalog(cat *catalog.Catalog) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.setCatalogLocked(cat)
}

// setCatalogLocked switches to cat. Tenants new to the catalog, and tenants
// whose period changed other than by rolling over, are read from the store
// again; every tenant is decided again.
func (e *Enforcer) setCatalogLocked(cat *catalog.Catalog) {
	e.cat = cat
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

// Reload reads the catalog file again. When it does not parse, the error is
// logged and returned and the previous catalog stays. Tenants whose period
// changed are read from the store again in the background.
func (e *Enforcer) Reload() error {
	return e.watch.Reload()
}
