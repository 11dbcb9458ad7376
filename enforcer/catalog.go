package enforcer

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meterd/meterd/catalog"
)

// tenantSpec is a tenant as the admin API sets it: each field given replaces
// the catalog file's value for the tenant; a field left out (or null) keeps
// it. It is the body of PUT /v1/tenants/{tenant} and the value of the
// tenant's key in the meterd-tenants bucket.
type tenantSpec struct {
	Plan          *string        `json:"plan,omitempty"`
	BillingAnchor *string        `json:"billing_anchor,omitempty"`
	BillingURL    *string        `json:"billing_url,omitempty"`
	CustomerID    *string        `json:"customer_id,omitempty"`
	Status        *string        `json:"status,omitempty"`
	Overrides     *specOverrides `json:"overrides,omitempty"`
}

type specOverrides struct {
	Limits map[string]int64 `json:"limits"`
}

// fieldError is what is wrong with one field of a tenant: the field path
// as in the catalog file (plan, overrides.limits.api_calls), empty for the
// tenant itself.
type fieldError struct{ Field, Message string }

func (e *fieldError) Error() string {
	if e.Field == "" {
		return e.Message
	}
	return e.Field + ": " + e.Message
}

// applyTo returns base with the fields of s applied.
func (s tenantSpec) applyTo(base catalog.Tenant) (catalog.Tenant, *fieldError) {
	t := base
	if s.Plan != nil {
		t.Plan = *s.Plan
	}
	if s.BillingAnchor != nil {
		a, err := catalog.ParseAnchor(*s.BillingAnchor)
		if err != nil {
			return t, &fieldError{Field: "billing_anchor", Message: err.Error()}
		}
		t.BillingAnchor = a
	}
	if s.BillingURL != nil {
		t.BillingURL = *s.BillingURL
	}
	if s.CustomerID != nil {
		t.CustomerID = *s.CustomerID
	}
	if s.Status != nil {
		t.Status = *s.Status
	}
	if s.Overrides != nil {
		t.Overrides.Limits = s.Overrides.Limits
	}
	return t, nil
}

// mergeCatalog builds the catalog the enforcer decides by: the file's
// tenants with the admin API's specs applied, and the tenants only the API
// defines. A spec that no longer fits the file (its plan was removed, its
// customer id now belongs to a file tenant) is left out and returned in
// dropped with the reasons, so that one stale spec cannot stop a reload.
// The spec of tenant last, if any, is applied last: of two specs in conflict
// (the same customer id), that one is dropped.
func mergeCatalog(file *catalog.Catalog, specs map[string]tenantSpec, last string) (cat *catalog.Catalog, dropped map[string][]*fieldError) {
	dropped = map[string][]*fieldError{}
	for {
		cat, errs := buildCatalog(file, specs, dropped, last)
		if len(errs) == 0 {
			return cat, dropped
		}
		progress := false
		for name, fes := range errs {
			if _, isSpec := specs[name]; isSpec && dropped[name] == nil {
				dropped[name] = fes
				progress = true
			}
		}
		if !progress {
			// The file catalog itself is valid, so this cannot happen;
			// fall back to it rather than to nothing.
			return file, dropped
		}
	}
}

// buildCatalog merges file and the specs not in skip; errs maps a tenant to
// what is wrong with it.
func buildCatalog(file *catalog.Catalog, specs map[string]tenantSpec, skip map[string][]*fieldError, last string) (*catalog.Catalog, map[string][]*fieldError) {
	errs := map[string][]*fieldError{}
	// The tenants with a spec go last: NewCatalog blames the later of two
	// tenants sharing a customer id, and that must be the spec, never a
	// tenant of the file.
	var tenants []catalog.Tenant
	for _, name := range file.TenantNames() {
		if _, ok := specs[name]; !ok || skip[name] != nil {
			t, _, _ := file.Tenant(name)
			tenants = append(tenants, t)
		}
	}
	names := slices.Sorted(maps.Keys(specs))
	if i := slices.Index(names, last); i >= 0 {
		names = append(slices.Delete(names, i, i+1), last)
	}
	for _, name := range names {
		if skip[name] != nil {
			continue
		}
		base, _, ok := file.Tenant(name)
		if !ok {
			base = catalog.Tenant{Name: name}
		}
		t, fe := specs[name].applyTo(base)
		if fe != nil {
			errs[name] = append(errs[name], fe)
			continue
		}
		tenants = append(tenants, t)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	// Only the plans tenants name: the catalog offers no list of plans, and
	// a plan no tenant is on decides nothing. A plan the file lacks is
	// left out, so NewCatalog reports the tenant naming it.
	var plans []catalog.Plan
	named := map[string]bool{}
	for _, t := range tenants {
		if t.Plan == "" || named[t.Plan] {
			continue
		}
		named[t.Plan] = true
		if p, ok := file.Plan(t.Plan); ok {
			plans = append(plans, p)
		}
	}
	cat, err := catalog.NewCatalog(plans, tenants)
	if err != nil {
		for _, ce := range catalogErrors(err) {
			name, field := splitTenantPath(ce.Path)
			errs[name] = append(errs[name], &fieldError{Field: field, Message: ce.Message})
		}
		return nil, errs
	}
	return cat, nil
}

// catalogErrors lists the *catalog.CatalogError joined in err.
func catalogErrors(err error) []*catalog.CatalogError {
	var out []*catalog.CatalogError
	var walk func(error)
	walk = func(err error) {
		if ce, ok := err.(*catalog.CatalogError); ok {
			out = append(out, ce)
			return
		}
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		if e := errors.Unwrap(err); e != nil {
			walk(e)
		}
	}
	walk(err)
	return out
}

// splitTenantPath splits a CatalogError path tenants.<name>.<field…> into
// the tenant's name and the field path (empty for the tenant itself). A name
// with characters other than letters, digits, '_' and '-' is quoted.
func splitTenantPath(path string) (tenant, field string) {
	rest, ok := strings.CutPrefix(path, "tenants.")
	if !ok {
		return "", path
	}
	if strings.HasPrefix(rest, `"`) {
		q, err := strconv.QuotedPrefix(rest)
		if err != nil {
			return "", path
		}
		tenant, _ = strconv.Unquote(q)
		rest = rest[len(q):]
	} else {
		i := strings.IndexByte(rest, '.')
		if i < 0 {
			return rest, ""
		}
		tenant, rest = rest[:i], rest[i:]
	}
	return tenant, strings.TrimPrefix(rest, ".")
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
