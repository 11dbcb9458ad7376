package enforcer

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/schemas"
)

// maxTenantBody bounds the body of PUT /v1/tenants/{tenant}.
const maxTenantBody = 64 << 10

// TenantView is the answer of GET and PUT /v1/tenants/{tenant}: the tenant
// as the enforcer decides it (catalog file and admin changes merged), its
// usage in the current period and its block, if any.
type TenantView struct {
	Tenant        string           `json:"tenant"`
	Plan          string           `json:"plan"`
	OnExceed      string           `json:"on_exceed,omitempty"`
	Limits        map[string]int64 `json:"limits"`
	BillingAnchor string           `json:"billing_anchor,omitempty"`
	BillingURL    string           `json:"billing_url,omitempty"`
	CustomerID    string           `json:"customer_id,omitempty"`
	PeriodStart   time.Time        `json:"period_start"`
	PeriodEnd     time.Time        `json:"period_end"`
	Usage         map[string]int64 `json:"usage"`
	// UsageSeeded is false while the usage is being read from the store.
	UsageSeeded bool `json:"usage_seeded"`
	// Status is the configured status; BillingStatus the worst of it and
	// the webhooks' (see billingRecord).
	Status        string            `json:"status"`
	BillingStatus string            `json:"billing_status"`
	Blocked       *schemas.Decision `json:"blocked"`
}

// BlocklistView is the answer of GET /v1/blocklist.
type BlocklistView struct {
	// Version grows with every change of the set.
	Version   uint64             `json:"version"`
	Decisions []schemas.Decision `json:"decisions"`
}

// admin authenticates r and reports whether it may use the admin API; if
// not, it has answered 401 or 403.
func (e *Enforcer) admin(w http.ResponseWriter, r *http.Request) bool {
	p, err := e.cfg.Keys.Authenticate(r)
	if err != nil {
		auth.Unauthorized(w, err)
		return false
	}
	if !p.Admin {
		schemas.NewProblem(schemas.ProblemForbidden, "this endpoint needs an admin API key").Write(w)
		return false
	}
	return true
}

// tenantName returns the {tenant} of the path, or answers 400.
func tenantName(w http.ResponseWriter, r *http.Request) (string, bool) {
	name := r.PathValue("tenant")
	if !schemas.ValidTenant(name) {
		schemas.NewProblem(schemas.ProblemInvalidTenant, "the tenant name must be "+schemas.TenantGrammar).Write(w)
		return "", false
	}
	return name, true
}

func (e *Enforcer) handleGetTenant(w http.ResponseWriter, r *http.Request) {
	if !e.admin(w, r) {
		return
	}
	name, ok := tenantName(w, r)
	if !ok {
		return
	}
	v, ok := e.view(name)
	if !ok {
		schemas.NewProblem(schemas.ProblemTenantNotFound, "no tenant "+name+" in the catalog").Write(w)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// view returns the view of tenant; ok is false for a tenant the catalog
// does not know.
func (e *Enforcer) view(tenant string) (TenantView, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	t, plan, ok := e.cat.Tenant(tenant)
	if !ok {
		return TenantView{}, false
	}
	v := TenantView{
		Tenant: tenant, Plan: t.Plan, OnExceed: plan.OnExceed,
		Limits: e.cat.Limits(tenant), BillingURL: t.BillingURL, CustomerID: t.CustomerID,
		Status: t.Status, BillingStatus: e.billingStatusLocked(tenant), Usage: map[string]int64{},
	}
	if !t.BillingAnchor.IsZero() {
		v.BillingAnchor = t.BillingAnchor.Format(time.DateOnly)
	}
	if v.Limits == nil {
		v.Limits = map[string]int64{}
	}
	p, seeded, used := e.currentUsageLocked(tenant, e.now())
	v.UsageSeeded, v.PeriodStart, v.PeriodEnd = seeded, p.Start, p.End
	if seeded {
		v.Usage = maps.Clone(used)
	}
	if d, ok := e.written[tenant]; ok {
		v.Blocked = &d
	}
	return v, true
}

func (e *Enforcer) handlePutTenant(w http.ResponseWriter, r *http.Request) {
	if !e.admin(w, r) {
		return
	}
	name, ok := tenantName(w, r)
	if !ok {
		return
	}
	spec, ok := decodeSpec(w, r)
	if !ok {
		return
	}
	b := e.buckets.Load()
	if b == nil {
		unavailable(w, "the enforcer is starting")
		return
	}
	if fes := e.watch.Check(name, spec); fes != nil {
		p := schemas.NewProblem(schemas.ProblemInvalidTenantSettings, fes[0].Error())
		for _, fe := range fes {
			p.Errors = append(p.Errors, schemas.FieldError{Field: fe.Field, Message: fe.Message})
		}
		p.Write(w)
		return
	}
	if err := e.watch.Put(r.Context(), name, spec); err != nil {
		e.log.Error("tenant change not stored", "tenant", name, "err", err)
		unavailable(w, "the tenant change could not be stored; retry")
		return
	}
	e.log.Info("tenant changed through the admin API", "tenant", name)
	e.decideNow(r, name)
	v, _ := e.view(name)
	writeJSON(w, http.StatusOK, v)
}

// decideNow reads tenant's usage from the store if its period is new, and
// writes its decision, before the admin API answers.
func (e *Enforcer) decideNow(r *http.Request, tenant string) {
	e.mu.Lock()
	reseed := e.reseed[tenant]
	e.mu.Unlock()
	if reseed {
		if err := e.reconcile(r.Context(), []string{tenant}); err != nil {
			e.log.Warn("reading a changed tenant's usage failed; retrying in the background", "tenant", tenant, "err", err)
		}
	}
	if err := e.syncTenant(r.Context(), tenant, time.Time{}); err != nil {
		e.log.Warn("blocklist write after a tenant change failed; retrying", "tenant", tenant, "err", err)
	}
}

// decodeSpec reads the body of a PUT strictly, or answers 400 naming the
// offending field.
func decodeSpec(w http.ResponseWriter, r *http.Request) (catalog.Change, bool) {
	var spec catalog.Change
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxTenantBody))
	if err != nil {
		schemas.NewProblem(schemas.ProblemBodyTooLarge, "the body exceeds 64 KiB").Write(w)
		return spec, false
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	err = dec.Decode(&spec)
	if err == nil && dec.More() {
		err = errors.New("unexpected data after the JSON object")
	}
	if err == nil {
		return spec, true
	}
	p := schemas.NewProblem(schemas.ProblemMalformedBody, "the body must be a JSON object with plan, billing_anchor, billing_url, customer_id, status, overrides: "+err.Error())
	var typeErr *json.UnmarshalTypeError
	switch {
	case errors.As(err, &typeErr):
		p.Errors = []schemas.FieldError{{Field: typeErr.Field, Message: "must be " + typeErr.Type.String() + ", not " + typeErr.Value}}
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		field := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
		p.Errors = []schemas.FieldError{{Field: field, Message: "is not a known field"}}
	}
	p.Write(w)
	return spec, false
}

func (e *Enforcer) handleDeleteTenant(w http.ResponseWriter, r *http.Request) {
	if !e.admin(w, r) {
		return
	}
	name, ok := tenantName(w, r)
	if !ok {
		return
	}
	b := e.buckets.Load()
	if b == nil {
		unavailable(w, "the enforcer is starting")
		return
	}
	found, err := e.watch.Delete(r.Context(), name)
	switch {
	case err != nil:
		e.log.Error("tenant change not removed", "tenant", name, "err", err)
		unavailable(w, "the tenant change could not be removed; retry")
		return
	case !found:
		schemas.NewProblem(schemas.ProblemTenantNotFound, "no admin API changes for tenant "+name).Write(w)
		return
	}
	e.log.Info("tenant change removed through the admin API", "tenant", name)
	e.decideNow(r, name)
	if v, ok := e.view(name); ok {
		writeJSON(w, http.StatusOK, v)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (e *Enforcer) handleBlocklist(w http.ResponseWriter, r *http.Request) {
	if !e.admin(w, r) {
		return
	}
	if e.buckets.Load() == nil {
		unavailable(w, "the enforcer is starting")
		return
	}
	e.mu.Lock()
	v := BlocklistView{Version: e.setVersion, Decisions: make([]schemas.Decision, 0, len(e.written))}
	for _, t := range slices.Sorted(maps.Keys(e.written)) {
		v.Decisions = append(v.Decisions, e.written[t])
	}
	e.mu.Unlock()
	// The tag hashes the decisions (with their versions): equal sets give
	// equal tags, on every replica and after a restart.
	set, _ := json.Marshal(v.Decisions)
	sum := sha256.Sum256(set)
	etag := `"` + hex.EncodeToString(sum[:16]) + `"`
	w.Header().Set("ETag", etag)
	w.Header().Set("Cache-Control", "no-cache")
	if etagMatch(r.Header.Get("If-None-Match"), etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// etagMatch reports whether an If-None-Match header matches etag (weak
// comparison, as RFC 9110 asks for If-None-Match).
func etagMatch(header, etag string) bool {
	for tag := range strings.SplitSeq(header, ",") {
		tag = strings.TrimSpace(tag)
		if tag == "*" || strings.TrimPrefix(tag, "W/") == etag {
			return true
		}
	}
	return false
}

func unavailable(w http.ResponseWriter, detail string) {
	w.Header().Set("Retry-After", "5")
	schemas.NewProblem(schemas.ProblemUnavailable, detail).Write(w)
}

// Register adds the enforcer's HTTP API to mux.
func (e *Enforcer) Register(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/billing/webhook", e.handleWebhook)
	mux.HandleFunc("GET /v1/tenants/{tenant}", e.handleGetTenant)
	mux.HandleFunc("PUT /v1/tenants/{tenant}", e.handlePutTenant)
	mux.HandleFunc("DELETE /v1/tenants/{tenant}", e.handleDeleteTenant)
	mux.HandleFunc("GET /v1/blocklist", e.handleBlocklist)
	mux.HandleFunc("GET /v1/usage/summary", e.handleSummary)
}
