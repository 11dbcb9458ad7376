package enforcer

import (
	"time"

	"github.com/meterd/meterd/catalog"
)

// setCatalog switches the tracker to cat, a catalog of the
// catalog.Watcher; nil applies the current catalog again and has every
// tenant decided again. While tracking, tenants new to the catalog, and
// tenants whose period changed other than by rolling over, are read from
// the store again; the tenants cat configures differently from the
// previous catalog (catalog.Catalog.Same), and those it dropped, are
// decided again. One admin change to a catalog of a million tenants thus
// decides one tenant again, not a million. It returns how many tenants are
// tracked.
func (t *tracker) setCatalog(cat *catalog.Catalog) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	all := cat == nil
	if cat == nil {
		cat = t.cat
	}
	prev := t.cat
	t.cat = cat
	if !t.tracking {
		return 0
	}
	now := t.now()
	names := cat.TenantNames()
	for _, name := range names {
		p := cat.PeriodOf(name, now)
		u := t.usage[name]
		changed := all || !prev.Same(cat, name)
		switch {
		case u == nil:
			u = newTenantUsage(p)
			t.usage[name] = u
			t.reseed[name] = true
			changed = true
		case !samePeriod(u.period, p):
			if u.roll(p) {
				t.reseed[name] = true
			}
			t.thresholds.forget(name)
			changed = true
		}
		if changed {
			t.dirty.mark(name, time.Time{})
			t.thresholds.checkAll(cat, name, u)
		}
	}
	if len(t.usage) > len(names) { // tenants left the catalog
		for name := range t.usage {
			if !cat.Has(name) {
				delete(t.usage, name)
				delete(t.reseed, name)
				t.thresholds.forget(name)
				t.dirty.mark(name, time.Time{})
			}
		}
	}
	if len(t.reseed) > 0 {
		signal(t.reseedWake)
	}
	return len(t.usage)
}

// onCatalog is the catalog.Watcher's OnChange: the tracker switches to cat,
// and a tenant the blocklist holds that left the catalog is decided again
// (unblocked).
func (e *Enforcer) onCatalog(cat *catalog.Catalog) {
	e.track.setCatalog(cat)
	for _, name := range e.pub.blocked() {
		if _, _, ok := cat.Tenant(name); !ok {
			e.dirty.mark(name, time.Time{})
		}
	}
}

// Reload reads the catalog file again. When it does not parse, the error is
// logged and returned and the previous catalog stays. Tenants whose period
// changed are read from the store again in the background.
func (e *Enforcer) Reload() error {
	return e.watch.Reload()
}
