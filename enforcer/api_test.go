package enforcer

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/schemas"
)

func TestAdminAuth(t *testing.T) {
	v := newEnv(t)
	v.start()
	for _, tc := range []struct {
		method, path, key string
		want              int
	}{
		{http.MethodGet, "/v1/tenants/acme", "", http.StatusUnauthorized},
		{http.MethodGet, "/v1/tenants/acme", "not-a-key-0123456789", http.StatusUnauthorized},
		{http.MethodGet, "/v1/tenants/acme", tenantKey, http.StatusForbidden},
		{http.MethodPut, "/v1/tenants/acme", tenantKey, http.StatusForbidden},
		{http.MethodGet, "/v1/blocklist", "", http.StatusUnauthorized},
		{http.MethodGet, "/v1/tenants/acme", adminKey, http.StatusOK},
		{http.MethodGet, "/v1/tenants/nobody", adminKey, http.StatusNotFound},
		{http.MethodGet, "/v1/tenants/bad%20name", adminKey, http.StatusBadRequest},
	} {
		var body map[string]any
		resp := v.do(tc.method, tc.path, tc.key, map[string]any{"plan": "pro"}, &body)
		if resp.StatusCode != tc.want {
			t.Errorf("%s %s key %q: %d, want %d", tc.method, tc.path, tc.key, resp.StatusCode, tc.want)
		}
		if tc.want >= 400 && (resp.Header.Get("Content-Type") != schemas.MediaProblem || body["status"] != float64(tc.want)) {
			t.Errorf("%s %s key %q: not a problem: %s %v", tc.method, tc.path, tc.key, resp.Header.Get("Content-Type"), body)
		}
	}
}

func TestAdminPutChangesPlanImmediately(t *testing.T) {
	v := newEnv(t)
	p := v.clock.Period(catalog.Monthly)
	v.usage("acme", "api_calls", p.Start, false, 1200)
	v.usage("newco", "api_calls", p.Start, false, 1500)
	v.start()
	v.waitDecision("acme", time.Second, blockedFor(schemas.ReasonQuotaExceeded))

	var tv TenantView
	if resp := v.do(http.MethodPut, "/v1/tenants/acme", adminKey, map[string]any{"plan": "pro"}, &tv); resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT: %d", resp.StatusCode)
	}
	if tv.Plan != "pro" || tv.Limits["api_calls"] != 1_000_000 || tv.Blocked != nil || tv.Usage["api_calls"] != 1200 ||
		tv.BillingURL != "https://billing.example.com/acme" || tv.CustomerID != "cus_acme" {
		t.Errorf("view after PUT = %+v", tv)
	}
	if d, _ := v.decision("acme"); d != nil { // no waiting: decided before the answer
		t.Fatalf("still blocked after moving to pro: %+v", *d)
	}

	// Back to free with a lower override: blocked at once.
	body := map[string]any{"plan": "free", "overrides": map[string]any{"limits": map[string]int64{"api_calls": 1100}}}
	if resp := v.do(http.MethodPut, "/v1/tenants/acme", adminKey, body, &tv); resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT: %d", resp.StatusCode)
	}
	if d, _ := v.decision("acme"); d == nil || d.Limit != 1100 || d.Used != 1200 {
		t.Fatalf("decision after PUT free = %+v, want limit 1100 used 1200", d)
	}
	if tv.Blocked == nil || tv.Blocked.Limit != 1100 {
		t.Errorf("view's block = %+v", tv.Blocked)
	}

	// A tenant only the API knows: its usage is read from the store first.
	if resp := v.do(http.MethodPut, "/v1/tenants/newco", adminKey, map[string]any{"plan": "free", "billing_anchor": p.Start.Format(time.DateOnly)}, &tv); resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT newco: %d", resp.StatusCode)
	}
	if d, _ := v.decision("newco"); d == nil || d.Used != 1500 || !tv.UsageSeeded {
		t.Fatalf("newco decision = %+v (view %+v), want blocked with 1500 used", d, tv)
	}

	// The changes live in the bucket: a restart keeps them.
	v.stop()
	v.start()
	if tv := v.view("acme"); tv.Plan != "free" || tv.Limits["api_calls"] != 1100 {
		t.Errorf("after restart: plan %q limits %v", tv.Plan, tv.Limits)
	}
	if tv := v.view("newco"); tv.Plan != "free" {
		t.Errorf("newco after restart: %+v", tv)
	}

	// DELETE drops the change: the file's free plan and its 1000 again.
	if resp := v.do(http.MethodDelete, "/v1/tenants/acme", adminKey, nil, &tv); resp.StatusCode != http.StatusOK {
		t.Fatalf("DELETE: %d", resp.StatusCode)
	}
	if d, _ := v.decision("acme"); d == nil || d.Limit != 1000 {
		t.Errorf("after DELETE: %+v, want limit 1000", d)
	}
	if resp := v.do(http.MethodDelete, "/v1/tenants/newco", adminKey, nil, nil); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("DELETE newco: %d", resp.StatusCode)
	}
	v.waitDecision("newco", time.Second, unblocked)
}

func TestAdminPutValidation(t *testing.T) {
	v := newEnv(t)
	v.start()
	for _, tc := range []struct {
		name  string
		body  any
		want  int
		field string
	}{
		{"unknown plan", map[string]any{"plan": "gold"}, http.StatusUnprocessableEntity, "plan"},
		{"bad status", map[string]any{"status": "late"}, http.StatusUnprocessableEntity, "status"},
		{"bad anchor", map[string]any{"billing_anchor": "soon"}, http.StatusUnprocessableEntity, "billing_anchor"},
		{"negative limit", map[string]any{"overrides": map[string]any{"limits": map[string]int64{"api_calls": -1}}}, http.StatusUnprocessableEntity, "overrides.limits.api_calls"},
		{"customer of another tenant", map[string]any{"customer_id": "cus_bigco"}, http.StatusUnprocessableEntity, "customer_id"},
		{"billing URL not http", map[string]any{"billing_url": "ftp://x"}, http.StatusUnprocessableEntity, "billing_url"},
		{"wrong type", map[string]any{"plan": 5}, http.StatusBadRequest, "plan"},
		{"unknown field", map[string]any{"plan": "free", "colour": "red"}, http.StatusBadRequest, "colour"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var p schemas.Problem
			resp := v.do(http.MethodPut, "/v1/tenants/acme", adminKey, tc.body, &p)
			if resp.StatusCode != tc.want || len(p.Errors) == 0 || p.Errors[0].Field != tc.field {
				t.Errorf("%d %+v, want %d naming %s", resp.StatusCode, p, tc.want, tc.field)
			}
		})
	}
	if tv := v.view("acme"); tv.Plan != "free" || tv.CustomerID != "cus_acme" {
		t.Errorf("a refused PUT changed the tenant: %+v", tv)
	}
}

func TestBlocklistETag(t *testing.T) {
	v := newEnv(t)
	p := v.clock.Period(catalog.Monthly)
	v.usage("acme", "api_calls", p.Start, false, 1000)
	v.start()
	v.waitDecision("acme", time.Second, blockedFor(schemas.ReasonQuotaExceeded))

	get := func(etag string) (*http.Response, BlocklistView) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, v.api.URL+"/v1/blocklist", nil)
		req.Header.Set("X-API-Key", adminKey)
		if etag != "" {
			req.Header.Set("If-None-Match", etag)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var bv BlocklistView
		if resp.StatusCode == http.StatusOK {
			if err := json.NewDecoder(resp.Body).Decode(&bv); err != nil {
				t.Fatal(err)
			}
		}
		return resp, bv
	}
	resp, bv := get("")
	etag := resp.Header.Get("ETag")
	if resp.StatusCode != http.StatusOK || etag == "" || etag[0] != '"' || len(bv.Decisions) != 1 || bv.Decisions[0].Tenant != "acme" {
		t.Fatalf("GET: %d etag %q %+v", resp.StatusCode, etag, bv)
	}
	if resp, _ := get(etag); resp.StatusCode != http.StatusNotModified {
		t.Errorf("If-None-Match with the current tag: %d, want 304", resp.StatusCode)
	}
	if resp, _ := get(`"other", W/` + etag); resp.StatusCode != http.StatusNotModified {
		t.Errorf("If-None-Match with a list holding the tag: %d, want 304", resp.StatusCode)
	}

	now := v.clock.Now()
	v.webhook(stripeEvent("evt_1", "customer.subscription.deleted", "cus_bigco", "sub_1", "canceled", now), webhookSecret, now)
	resp2, bv2 := get(etag)
	if resp2.StatusCode != http.StatusOK || resp2.Header.Get("ETag") == etag || len(bv2.Decisions) != 2 || bv2.Version <= bv.Version {
		t.Errorf("after a change: %d etag %q (was %q) version %d (was %d) %d decisions",
			resp2.StatusCode, resp2.Header.Get("ETag"), etag, bv2.Version, bv.Version, len(bv2.Decisions))
	}
}
