package catalog

import (
	"errors"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// Bucket is the NATS KV bucket of the admin API's tenant changes: key =
// tenant, value = a Change as JSON. The enforcer creates and writes it;
// every component follows it with a Watcher.
const Bucket = "meterd-tenants"

// Change is a tenant as the admin API sets it: each field given replaces
// the catalog file's value for the tenant; a field left out (or null) keeps
// it. It is the body of PUT /v1/tenants/{tenant} and the value of the
// tenant's key in the meterd-tenants bucket.
type Change struct {
	Plan          *string          `json:"plan,omitempty"`
	BillingAnchor *string          `json:"billing_anchor,omitempty"`
	BillingURL    *string          `json:"billing_url,omitempty"`
	CustomerID    *string          `json:"customer_id,omitempty"`
	Status        *string          `json:"status,omitempty"`
	Overrides     *ChangeOverrides `json:"overrides,omitempty"`
}

// ChangeOverrides are the overrides of a Change: given, they replace the
// tenant's overrides whole.
type ChangeOverrides struct {
	Limits map[string]int64 `json:"limits"`
}

// FieldError is what is wrong with one field of a tenant: the field path
// as in the catalog file (plan, overrides.limits.api_calls), empty for the
// tenant itself.
type FieldError struct{ Field, Message string }

// Error implements error.
func (e *FieldError) Error() string {
	if e.Field == "" {
		return e.Message
	}
	return e.Field + ": " + e.Message
}

// ApplyTo returns base with the fields of s applied; the error names the
// field that does not parse.
func (s Change) ApplyTo(base Tenant) (Tenant, *FieldError) {
	t := base
	if s.Plan != nil {
		t.Plan = *s.Plan
	}
	if s.BillingAnchor != nil {
		a, err := ParseAnchor(*s.BillingAnchor)
		if err != nil {
			return t, &FieldError{Field: "billing_anchor", Message: err.Error()}
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

// Merge builds the catalog every component decides and reports by: the file's
// tenants with the admin API's specs applied, and the tenants only the API
// defines. A spec that no longer fits the file (its plan was removed, its
// customer id now belongs to a file tenant) is left out and returned in
// dropped with the reasons, so that one stale spec cannot stop a reload.
// The spec of tenant last, if any, is applied last: of two specs in conflict
// (the same customer id), that one is dropped.
func Merge(file *Catalog, specs map[string]Change, last string) (cat *Catalog, dropped map[string][]*FieldError) {
	dropped = map[string][]*FieldError{}
	for {
		cat, errs := build(file, specs, dropped, last)
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

// build merges file and the specs not in skip; errs maps a tenant to
// what is wrong with it. It copies the file's indexes and validates only the
// tenants with a spec (the file's were validated when it loaded), so an
// admin change costs a copy of the maps, not a validation and sort of every
// tenant ("Many tenants" in the root BENCHMARKS.md).
func build(file *Catalog, specs map[string]Change, skip map[string][]*FieldError, last string) (*Catalog, map[string][]*FieldError) {
	errs := map[string][]*FieldError{}
	names := slices.Sorted(maps.Keys(specs))
	if i := slices.Index(names, last); i >= 0 {
		names = append(slices.Delete(names, i, i+1), last)
	}
	var tenants []Tenant
	for _, name := range names {
		if skip[name] != nil {
			continue
		}
		base, _, ok := file.Tenant(name)
		if !ok {
			base = Tenant{Name: name}
		}
		t, fe := specs[name].ApplyTo(base)
		if fe != nil {
			errs[name] = append(errs[name], fe)
			continue
		}
		tenants = append(tenants, t)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	if len(tenants) == 0 {
		return file, nil // immutable: shared
	}
	// The file's tenants without a spec stay as they are. Those with one
	// are taken out and added again with it, after every other, so that of
	// two tenants sharing a customer id the spec is blamed, never a tenant
	// of the file. The plans are the file's: a spec naming another plan is
	// reported by addTenant.
	c := &Catalog{
		plans:     file.plans,
		tenants:   maps.Clone(file.tenants),
		limits:    maps.Clone(file.limits),
		customers: maps.Clone(file.customers),
	}
	if c.tenants == nil {
		c.tenants, c.limits, c.customers = map[string]Tenant{}, map[string]map[string]int64{}, map[string]string{}
	}
	for _, t := range tenants {
		if old, ok := c.tenants[t.Name]; ok {
			delete(c.tenants, t.Name)
			delete(c.limits, t.Name)
			if old.CustomerID != "" && c.customers[old.CustomerID] == t.Name {
				delete(c.customers, old.CustomerID)
			}
		}
	}
	var cerrs []error
	bad := func(path, msg string) { cerrs = append(cerrs, &CatalogError{Path: path, Message: msg}) }
	var added []string // names the file does not list
	for _, t := range tenants {
		if c.addTenant(t, bad) && !file.Has(t.Name) {
			added = append(added, t.Name)
		}
	}
	for _, ce := range catalogErrors(errors.Join(cerrs...)) {
		name, field := splitTenantPath(ce.Path)
		errs[name] = append(errs[name], &FieldError{Field: field, Message: ce.Message})
	}
	if len(errs) > 0 {
		return nil, errs
	}
	c.names = file.names // immutable: shared
	if len(added) > 0 {
		c.names = make([]string, 0, len(file.names)+len(added))
		c.names = append(append(c.names, file.names...), added...)
		sortNames(c.names)
	}
	return c, nil
}

// catalogErrors lists the *CatalogError joined in err.
func catalogErrors(err error) []*CatalogError {
	var out []*CatalogError
	var walk func(error)
	walk = func(err error) {
		if ce, ok := err.(*CatalogError); ok {
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
