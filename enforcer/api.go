package enforcer

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
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

// api serves the enforcer's HTTP API: the admin API (this file), the usage
// summary (summary.go) and the billing webhook (webhook.go). It holds no
// state of its own: it reads and changes that of the enforcer's parts.
type api struct {
	keys             *auth.Keys
	webhookSecret    string
	webhookTolerance time.Duration
	now              func() time.Time
	log              *slog.Logger
	m                *metrics
	open             *atomic.Pointer[buckets] // the Enforcer's buckets, once open
	watch            *catalog.Watcher
	track            *tracker
	billing          *billing
	pub              *publisher
	rec              *reconciler
}

// register adds the API to mux.
func (a *api) register(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/billing/webhook", a.handleWebhook)
	mux.HandleFunc("GET /v1/tenants/{tenant}", a.adminOnly(forTenant(a.handleGetTenant)))
	mux.HandleFunc("PUT /v1/tenants/{tenant}", a.adminOnly(forTenant(a.handlePutTenant)))
	mux.HandleFunc("DELETE /v1/tenants/{tenant}", a.adminOnly(forTenant(a.handleDeleteTenant)))
	mux.HandleFunc("GET /v1/blocklist", a.adminOnly(a.handleBlocklist))
	mux.HandleFunc("GET /v1/usage/summary", a.handleSummary)
}

// adminOnly serves h to admin API keys only; other requests get 401 or
// 403.
func (a *api) adminOnly(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		p, err := a.keys.Authenticate(r)
		if err != nil {
			auth.Unauthorized(w, err)
			return
		}
		if !p.Admin {
			schemas.NewProblem(schemas.ProblemForbidden, "this endpoint needs an admin API key").Write(w)
			return
		}
		h(w, r)
	}
}

// forTenant serves h with the {tenant} of the path, or answers 400.
func forTenant(h func(w http.ResponseWriter, r *http.Request, tenant string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("tenant")
		if !schemas.ValidTenant(name) {
			schemas.NewProblem(schemas.ProblemInvalidTenant, "the tenant name must be "+schemas.TenantGrammar).Write(w)
			return
		}
		h(w, r, name)
	}
}

func (a *api) handleGetTenant(w http.ResponseWriter, r *http.Request, name string) {
	v, ok := a.view(name)
	if !ok {
		schemas.NewProblem(schemas.ProblemTenantNotFound, "no tenant "+name+" in the catalog").Write(w)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// view returns the view of tenant; ok is false for a tenant the catalog
// does not know.
func (a *api) view(tenant string) (TenantView, bool) {
	cat := a.watch.Catalog()
	t, plan, ok := cat.Tenant(tenant)
	if !ok {
		return TenantView{}, false
	}
	v := TenantView{
		Tenant: tenant, Plan: t.Plan, OnExceed: plan.OnExceed,
		Limits: cat.Limits(tenant), BillingURL: t.BillingURL, CustomerID: t.CustomerID,
		Status: t.Status, BillingStatus: a.billing.status(cat, tenant), Usage: map[string]int64{},
	}
	if !t.BillingAnchor.IsZero() {
		v.BillingAnchor = t.BillingAnchor.Format(time.DateOnly)
	}
	if v.Limits == nil {
		v.Limits = map[string]int64{}
	}
	p, seeded, used := a.track.usageOf(tenant)
	v.UsageSeeded, v.PeriodStart, v.PeriodEnd = seeded, p.Start, p.End
	if seeded {
		v.Usage = used
	}
	if d, ok := a.pub.decision(tenant); ok {
		v.Blocked = &d
	}
	return v, true
}

func (a *api) handlePutTenant(w http.ResponseWriter, r *http.Request, name string) {
	spec, ok := decodeSpec(w, r)
	if !ok {
		return
	}
	if a.open.Load() == nil {
		unavailable(w, "the enforcer is starting")
		return
	}
	if fes := a.watch.Check(name, spec); fes != nil {
		p := schemas.NewProblem(schemas.ProblemInvalidTenantSettings, fes[0].Error())
		for _, fe := range fes {
			p.Errors = append(p.Errors, schemas.FieldError{Field: fe.Field, Message: fe.Message})
		}
		p.Write(w)
		return
	}
	if err := a.watch.Put(r.Context(), name, spec); err != nil {
		a.log.Error("tenant change not stored", "tenant", name, "err", err)
		unavailable(w, "the tenant change could not be stored; retry")
		return
	}
	a.log.Info("tenant changed through the admin API", "tenant", name)
	a.decideNow(r, name)
	v, _ := a.view(name)
	writeJSON(w, http.StatusOK, v)
}

// decideNow reads tenant's usage from the store if its period is new, and
// writes its decision, before the admin API answers.
func (a *api) decideNow(r *http.Request, tenant string) {
	a.rec.reseedNow(r.Context(), tenant)
	if err := a.pub.sync(r.Context(), tenant, time.Time{}); err != nil {
		a.log.Warn("blocklist write after a tenant change failed; retrying", "tenant", tenant, "err", err)
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

func (a *api) handleDeleteTenant(w http.ResponseWriter, r *http.Request, name string) {
	if a.open.Load() == nil {
		unavailable(w, "the enforcer is starting")
		return
	}
	found, err := a.watch.Delete(r.Context(), name)
	switch {
	case err != nil:
		a.log.Error("tenant change not removed", "tenant", name, "err", err)
		unavailable(w, "the tenant change could not be removed; retry")
		return
	case !found:
		schemas.NewProblem(schemas.ProblemTenantNotFound, "no admin API changes for tenant "+name).Write(w)
		return
	}
	a.log.Info("tenant change removed through the admin API", "tenant", name)
	a.decideNow(r, name)
	if v, ok := a.view(name); ok {
		writeJSON(w, http.StatusOK, v)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (a *api) handleBlocklist(w http.ResponseWriter, r *http.Request) {
	if a.open.Load() == nil {
		unavailable(w, "the enforcer is starting")
		return
	}
	v := a.pub.blocklist()
	// The body is the BlocklistView, encoded once: the decisions are
	// encoded straight after its head, and the tag hashes them (with their
	// versions), so equal sets give equal tags, on every replica and after
	// a restart. With 100k blocked tenants the set is tens of MB; encoding
	// it a second time for the tag would double the cost of every poll.
	var buf bytes.Buffer
	buf.WriteString(`{"version":` + strconv.FormatUint(v.Version, 10) + `,"decisions":`)
	head := buf.Len()
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v.Decisions); err != nil {
		schemas.NewProblem(schemas.ProblemInternal, "encoding the answer failed").Write(w)
		return
	}
	buf.Truncate(buf.Len() - 1) // the newline Encode adds
	sum := sha256.Sum256(buf.Bytes()[head:])
	buf.WriteString("}\n")
	etag := `"` + hex.EncodeToString(sum[:16]) + `"`
	w.Header().Set("ETag", etag)
	w.Header().Set("Cache-Control", "no-cache")
	if etagMatch(r.Header.Get("If-None-Match"), etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(http.StatusOK)
	w.Write(buf.Bytes())
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
