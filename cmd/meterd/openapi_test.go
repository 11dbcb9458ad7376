package main

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/api"
	"github.com/meterd/meterd/api/apitest"
	"github.com/meterd/meterd/enforcer"
	"github.com/meterd/meterd/schemas"
)

// openapiConfig has a tenant for each kind of 402, API keys, and the
// webhook on.
const openapiConfig = `plans:
  free: {period: monthly, limits: {api_calls: 1000}, on_exceed: block}
  pro:  {period: monthly, limits: {api_calls: 1000000}, on_exceed: overage}
  tiny: {period: monthly, limits: {api_calls: 2}, on_exceed: block}
tenants:
  acme:    {plan: free, billing_url: "https://billing.example.com/acme"}
  globex:  {plan: pro, customer_id: cus_globex, billing_url: "https://billing.example.com/globex"}
  initech: {plan: pro, customer_id: cus_initech}
  tinyco:  {plan: tiny, billing_url: "https://billing.example.com/tinyco"}
  latepay: {plan: free, status: past_due, billing_url: "https://billing.example.com/latepay"}
  frozen:  {plan: free, status: suspended}
api_keys:
  - {key: openapi-admin-key-0001, admin: true}
  - {key: openapi-acme-key-00001, tenant: acme}
enforcer:
  webhook_secret: whsec_test
  heartbeat_every: 1s
`

const (
	adminKey = "openapi-admin-key-0001"
	acmeKey  = "openapi-acme-key-00001"
)

// Real requests and answers of every process's handlers (collector,
// aggregator, enforcer and the shared endpoints, all in `meterd dev`),
// good and bad, validated against api/openapi.yaml with
// libopenapi-validator: every answer must conform, and every request must
// conform exactly when it is meant to. Every operation of the document is
// exercised, and every problem type is answered here or in the collector's
// own test of the answers `meterd dev` cannot be brought to give.
func TestOpenAPIExchanges(t *testing.T) {
	s := startE2EDev(t, openapiConfig, "--max-body-bytes", "65536", "--unknown-tenant-policy", "deny")
	v := apitest.New(t)
	admin := http.Header{"Authorization": {"Bearer " + adminKey}}
	with := func(h http.Header, kv ...string) http.Header {
		out := h.Clone()
		if out == nil {
			out = http.Header{}
		}
		for i := 0; i+1 < len(kv); i += 2 {
			out.Add(kv[i], kv[i+1])
		}
		return out
	}
	json := func(h http.Header) http.Header { return with(h, "Content-Type", "application/json") }
	do := func(x apitest.Exchange) apitest.Answer {
		t.Helper()
		x.URL = s.base + x.URL
		return v.Do(t, s.client, x)
	}
	now := time.Now().UTC()
	ev := func(id, tenant string) string {
		return fmt.Sprintf(`{"id":%q,"tenant":%q,"meter":"api_calls","value":2,"time":%q,"dimensions":{"route":"/v1/items"}}`,
			id, tenant, now.Format(time.RFC3339Nano))
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(ev("gz-1", "acme")))
	zw.Close()
	var large strings.Builder
	large.WriteString("[")
	for i := range 700 {
		if i > 0 {
			large.WriteString(",")
		}
		large.WriteString(ev(fmt.Sprintf("large-%d", i), "acme"))
	}
	large.WriteString("]")

	events := []apitest.Exchange{
		{Name: "one event", Header: json(admin), Body: []byte(ev("one-1", "acme")), Status: 202, Conforms: true},
		{Name: "an array with a repeat", Header: json(admin), Body: []byte("[" + ev("arr-1", "acme") + "," + ev("arr-2", "globex") + "," + ev("arr-1", "acme") + "]"), Status: 202, Conforms: true},
		{Name: "NDJSON", Header: with(admin, "Content-Type", "application/x-ndjson"), Body: []byte(ev("nd-1", "acme") + "\n" + ev("nd-2", "acme") + "\n"), Status: 202, Conforms: true},
		{Name: "JSON Lines", Header: with(admin, "Content-Type", "application/jsonl"), Body: []byte(ev("jl-1", "acme") + "\n"), Status: 202, Conforms: true},
		{Name: "CloudEvent structured", Header: with(admin, "Content-Type", "application/cloudevents+json"),
			Body: []byte(`{"specversion":"1.0","id":"ce-1","source":"gw-1","type":"api_calls","subject":"acme","data":{"value":3,"route":"/v1/x","status":200}}`), Status: 202, Conforms: true},
		{Name: "CloudEvents batched", Header: with(admin, "Content-Type", "application/cloudevents-batch+json"),
			Body: []byte(`[{"specversion":"1.0","id":"ce-2","source":"gw-1","type":"api_calls","subject":"acme"},{"specversion":"1.0","id":"ce-2","source":"gw-2","type":"api_calls","subject":"acme","time":"` + now.Format(time.RFC3339) + `"}]`), Status: 202, Conforms: true},
		{Name: "CloudEvent binary", Header: with(json(admin), "Ce-Specversion", "1.0", "Ce-Id", "ce-3", "Ce-Source", "gw-1", "Ce-Type", "api_calls", "Ce-Subject", "acme"),
			Body: []byte(`{"value":4,"route":"/v1/y"}`), Status: 202, Conforms: true},
		{Name: "tenant key, tenant from the key", Header: json(http.Header{"X-Api-Key": {acmeKey}}), Body: []byte(`{"id":"key-1","meter":"api_calls"}`), Status: 202, Conforms: true},
		{Name: "gzip", Header: with(json(admin), "Content-Encoding", "gzip"), Body: gz.Bytes(), Status: 202, Conforms: true, SkipRequest: true},
		{Name: "malformed JSON", Header: json(admin), Body: []byte(`{"id":`), Status: 400, Problem: "malformed-body"},
		{Name: "no events", Header: json(admin), Body: []byte(`[]`), Status: 400, Problem: "no-events"},
		{Name: "a bad meter", Header: json(admin), Body: []byte(`[` + ev("bad-1", "acme") + `,{"id":"bad-2","tenant":"acme","meter":"Api-Calls","value":-1}]`), Status: 422, Problem: "invalid-events"},
		{Name: "too old (a rule no schema holds)", Header: json(admin), Body: []byte(`{"id":"old-1","tenant":"acme","meter":"api_calls","time":"2001-01-01T00:00:00Z"}`), Status: 422, Problem: "invalid-events", Conforms: true},
		{Name: "text/plain", Header: with(admin, "Content-Type", "text/plain"), Body: []byte(ev("tp-1", "acme")), Status: 415, Problem: "unsupported-media-type"},
		{Name: "brotli", Header: with(json(admin), "Content-Encoding", "br"), Body: []byte(ev("br-1", "acme")), Status: 415, Problem: "unsupported-content-encoding"},
		{Name: "over --max-body-bytes", Header: json(admin), Body: []byte(large.String()), Status: 413, Problem: "body-too-large", Conforms: true},
		{Name: "no key", Header: json(nil), Body: []byte(ev("nokey-1", "acme")), Status: 401, Problem: "unauthorized"},
		{Name: "unknown key", Header: json(http.Header{"Authorization": {"Bearer not-a-key-of-ours-000"}}), Body: []byte(ev("badkey-1", "acme")), Status: 401, Problem: "unauthorized", Conforms: true},
		{Name: "another tenant's event", Header: json(http.Header{"X-Api-Key": {acmeKey}}), Body: []byte(ev("other-1", "globex")), Status: 403, Problem: "forbidden-tenant", Conforms: true},
	}
	for _, x := range events {
		x.Method, x.URL = http.MethodPost, "/v1/events"
		do(x)
	}

	// The check: every method, on /v1/check and below it.
	for _, path := range []string{"/v1/check", "/v1/check/orders"} {
		for _, m := range []string{"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"} {
			do(apitest.Exchange{Name: m + " " + path, Method: m, URL: path,
				Header: http.Header{"X-Tenant-Id": {"acme"}, "X-Request-Id": {"req-" + m + path}}, Status: 200, Conforms: true})
		}
	}
	checks := []apitest.Exchange{
		{Name: "check with a tenant key and a price", Header: http.Header{"X-Api-Key": {acmeKey}, "X-Meter": {"tokens"}, "X-Meter-Value": {"250"}}, Status: 200, Conforms: true},
		{Name: "check, bad tenant", Header: http.Header{"X-Tenant-Id": {"ac..me"}}, Status: 400, Problem: "invalid-tenant"},
		{Name: "check, bad meter", Header: http.Header{"X-Tenant-Id": {"acme"}, "X-Meter": {"Tokens"}}, Status: 400, Problem: "invalid-meter"},
		{Name: "check, bad value", Header: http.Header{"X-Tenant-Id": {"acme"}, "X-Meter-Value": {"-3"}}, Status: 400, Problem: "invalid-value"},
		{Name: "check, value over the maximum", Header: http.Header{"X-Tenant-Id": {"acme"}, "X-Meter-Value": {"4294967296"}}, Status: 400, Problem: "invalid-value"},
		{Name: "check, neither key nor tenant", Status: 401, Problem: "unauthorized", Conforms: true},
		{Name: "check, a tenant without a plan", Header: http.Header{"X-Tenant-Id": {"nobody"}}, Status: 403, Problem: "unknown-tenant", Conforms: true},
	}
	for _, x := range checks {
		x.Method, x.URL = http.MethodGet, "/v1/check"
		do(x)
	}

	// The 402s: the quota of tinyco, the billing statuses of latepay and
	// frozen, and a payment action webhook for initech.
	for i := range 3 {
		s.check("tinyco", fmt.Sprintf("tiny-%d", i))
	}
	sign := func(body []byte) http.Header {
		return json(http.Header{"Stripe-Signature": {enforcer.Sign(body, e2eWebhookSecret, time.Now())}})
	}
	action := e2eStripeEvent("evt_action", "invoice.payment_action_required", "in_1", "cus_initech", now)
	do(apitest.Exchange{Name: "webhook: payment action required", Method: "POST", URL: "/v1/billing/webhook", Header: sign(action), Body: action, Status: 200, Conforms: true})
	for _, c := range []struct{ tenant, slug string }{
		{"tinyco", "quota-exceeded"}, {"latepay", "payment-overdue"}, {"frozen", "suspended"}, {"initech", "payment-method-required"},
	} {
		s.waitCheck(t, c.tenant, http.StatusPaymentRequired, time.Now(), 20*time.Second)
		a := do(apitest.Exchange{Name: "402 " + c.slug, Method: "GET", URL: "/v1/check",
			Header: http.Header{"X-Tenant-Id": {c.tenant}}, Status: 402, Problem: c.slug, Conforms: true})
		if c.slug == "quota-exceeded" && (a.Header.Get("Retry-After") == "" || a.Header.Get("Link") == "") {
			t.Errorf("402 quota-exceeded without Retry-After or Link: %v", a.Header)
		}
	}

	// Usage reports (aggregator).
	tenantKey := http.Header{"X-Api-Key": {acmeKey}}
	for _, x := range []apitest.Exchange{
		{Name: "report", URL: "/v1/usage?tenant=acme&window=day", Header: admin, Status: 200, Conforms: true},
		{Name: "report by period, grouped", URL: "/v1/usage?window=period&group_by=route,method,status", Header: admin, Status: 200, Conforms: true},
		{Name: "report grouped, repeated", URL: "/v1/usage?group_by=route&group_by=status", Header: admin, Status: 200, Conforms: true},
		{Name: "report, group_by twice", URL: "/v1/usage?group_by=route,route", Header: admin, Status: 400, Problem: "invalid-parameter"},
		{Name: "report as CSV", URL: "/v1/usage?format=csv&window=month", Header: admin, Status: 200, Conforms: true},
		{Name: "report, Accept CSV", URL: "/v1/usage?window=hour", Header: with(tenantKey, "Accept", "text/csv"), Status: 200, Conforms: true},
		{Name: "report, bad window", URL: "/v1/usage?window=week", Header: admin, Status: 400, Problem: "invalid-parameter"},
		{Name: "report, bad from", URL: "/v1/usage?from=yesterday", Header: admin, Status: 400, Problem: "invalid-parameter"},
		{Name: "report, another tenant", URL: "/v1/usage?tenant=globex", Header: tenantKey, Status: 403, Problem: "forbidden", Conforms: true},
		{Name: "report, no key", URL: "/v1/usage", Status: 401, Problem: "unauthorized"},
	} {
		x.Method = http.MethodGet
		do(x)
	}

	// The enforcer: summary, admin API, blocklist, webhook.
	for _, x := range []apitest.Exchange{
		{Name: "summary", Method: "GET", URL: "/v1/usage/summary", Header: admin, Status: 200, Conforms: true},
		{Name: "summary of one tenant", Method: "GET", URL: "/v1/usage/summary?tenant=tinyco", Header: admin, Status: 200, Conforms: true},
		{Name: "summary, tenant key", Method: "GET", URL: "/v1/usage/summary", Header: tenantKey, Status: 200, Conforms: true},
		{Name: "summary, unknown tenant", Method: "GET", URL: "/v1/usage/summary?tenant=nobody", Header: admin, Status: 404, Problem: "tenant-not-found", Conforms: true},
		{Name: "summary, another tenant", Method: "GET", URL: "/v1/usage/summary?tenant=globex", Header: tenantKey, Status: 403, Problem: "forbidden", Conforms: true},
		{Name: "summary, bad tenant", Method: "GET", URL: "/v1/usage/summary?tenant=a..b", Header: admin, Status: 400, Problem: "invalid-parameter"},

		{Name: "get a tenant", Method: "GET", URL: "/v1/tenants/acme", Header: admin, Status: 200, Conforms: true},
		{Name: "get a blocked tenant", Method: "GET", URL: "/v1/tenants/tinyco", Header: admin, Status: 200, Conforms: true},
		{Name: "get a tenant, tenant key", Method: "GET", URL: "/v1/tenants/acme", Header: tenantKey, Status: 403, Problem: "forbidden", Conforms: true},
		{Name: "get an unknown tenant", Method: "GET", URL: "/v1/tenants/nobody", Header: admin, Status: 404, Problem: "tenant-not-found", Conforms: true},
		{Name: "get a bad tenant name", Method: "GET", URL: "/v1/tenants/a..b", Header: admin, Status: 400, Problem: "invalid-tenant"},
		{Name: "create a tenant", Method: "PUT", URL: "/v1/tenants/newco", Header: json(admin), Body: []byte(`{"plan":"pro","billing_anchor":"2026-01-15","billing_url":"https://billing.example.com/newco","customer_id":"cus_newco"}`), Status: 200, Conforms: true},
		{Name: "change a tenant", Method: "PUT", URL: "/v1/tenants/acme", Header: json(admin), Body: []byte(`{"overrides":{"limits":{"api_calls":5000}},"status":null}`), Status: 200, Conforms: true},
		{Name: "change to an unknown plan", Method: "PUT", URL: "/v1/tenants/acme", Header: json(admin), Body: []byte(`{"plan":"platinum"}`), Status: 422, Problem: "invalid-tenant-settings", Conforms: true},
		{Name: "change with an unknown field", Method: "PUT", URL: "/v1/tenants/acme", Header: json(admin), Body: []byte(`{"plan":"pro","colour":"red"}`), Status: 400, Problem: "malformed-body"},
		{Name: "change with a wrong type", Method: "PUT", URL: "/v1/tenants/acme", Header: json(admin), Body: []byte(`{"plan":5}`), Status: 400, Problem: "malformed-body"},
		{Name: "change too large", Method: "PUT", URL: "/v1/tenants/acme", Header: json(admin), Body: []byte(`{"billing_url":"https://x.example/` + strings.Repeat("a", 70<<10) + `"}`), Status: 413, Problem: "body-too-large", Conforms: true},
		{Name: "change, tenant key", Method: "PUT", URL: "/v1/tenants/acme", Header: json(tenantKey), Body: []byte(`{"plan":"pro"}`), Status: 403, Problem: "forbidden", Conforms: true},
		{Name: "delete a tenant only the API defines", Method: "DELETE", URL: "/v1/tenants/newco", Header: admin, Status: 204, Conforms: true},
		{Name: "delete the changes of a file tenant", Method: "DELETE", URL: "/v1/tenants/acme", Header: admin, Status: 200, Conforms: true},
		{Name: "delete without changes", Method: "DELETE", URL: "/v1/tenants/acme", Header: admin, Status: 404, Problem: "tenant-not-found", Conforms: true},

		{Name: "webhook, unknown customer", Method: "POST", URL: "/v1/billing/webhook", Body: e2eStripeEvent("evt_u", "invoice.payment_failed", "in_u", "cus_nobody", now), Status: 202, Conforms: true},
		{Name: "webhook, ignored type", Method: "POST", URL: "/v1/billing/webhook", Body: []byte(`{"id":"evt_i","type":"charge.refunded","created":1}`), Status: 200, Conforms: true},
		{Name: "webhook, bad signature", Method: "POST", URL: "/v1/billing/webhook", Header: json(http.Header{"Stripe-Signature": {"t=1,v1=00"}}), Body: []byte(`{"id":"evt_b","type":"invoice.paid"}`), Status: 400, Problem: "invalid-signature", Conforms: true},
		{Name: "webhook, no signature", Method: "POST", URL: "/v1/billing/webhook", Header: json(nil), Body: []byte(`{"id":"evt_n","type":"invoice.paid"}`), Status: 400, Problem: "invalid-signature"},
		{Name: "webhook, not an event", Method: "POST", URL: "/v1/billing/webhook", Body: []byte(`{"object":"event"}`), Status: 400, Problem: "malformed-body"},
		{Name: "webhook, too large", Method: "POST", URL: "/v1/billing/webhook", Header: json(http.Header{"Stripe-Signature": {"t=1,v1=00"}}), Body: []byte(`{"id":"evt_l","type":"x","pad":"` + strings.Repeat("a", 1<<20) + `"}`), Status: 413, Problem: "body-too-large", Conforms: true},

		{Name: "healthz", Method: "GET", URL: "/healthz", Status: 200, Conforms: true},
		{Name: "readyz", Method: "GET", URL: "/readyz", Status: 200, Conforms: true},
		{Name: "metrics", Method: "GET", URL: "/metrics", Status: 200, Conforms: true},
	} {
		if x.Method == "POST" && x.Header == nil {
			x.Header = sign(x.Body)
		}
		do(x)
	}
	applied := e2eStripeEvent("evt_paid", "invoice.paid", "in_1", "cus_initech", now.Add(time.Second))
	for _, outcome := range []string{"applied", "duplicate"} {
		a := do(apitest.Exchange{Name: "webhook " + outcome, Method: "POST", URL: "/v1/billing/webhook", Header: sign(applied), Body: applied, Status: 200, Conforms: true})
		if !bytes.Contains(a.Body, []byte(`"status":"`+outcome+`"`)) {
			t.Errorf("webhook answer %s, want status %s", a.Body, outcome)
		}
	}
	bl := do(apitest.Exchange{Name: "blocklist", Method: "GET", URL: "/v1/blocklist", Header: admin, Status: 200, Conforms: true})
	do(apitest.Exchange{Name: "blocklist unchanged", Method: "GET", URL: "/v1/blocklist", Header: with(admin, "If-None-Match", bl.Header.Get("ETag")), Status: 304, Conforms: true})
	do(apitest.Exchange{Name: "blocklist, tenant key", Method: "GET", URL: "/v1/blocklist", Header: tenantKey, Status: 403, Problem: "forbidden", Conforms: true})
	doc := do(apitest.Exchange{Name: "the document", Method: "GET", URL: "/openapi.yaml", Status: 200, Conforms: true})
	if !bytes.Equal(doc.Body, api.Document()) {
		t.Errorf("GET /openapi.yaml served %d bytes, not the embedded document", len(doc.Body))
	}

	// What no operation describes: an unknown path and a wrong method.
	for _, c := range []struct{ method, path, component string }{
		{"GET", "/v1/nothing", "NotFound"}, {"GET", "/v1/events", "MethodNotAllowed"}, {"POST", "/v1/usage", "MethodNotAllowed"},
	} {
		a, err := s.do(c.method, c.path, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		v.ValidateComponentResponse(t, c.component, apitest.Answer{Status: a.status, Header: a.header, Body: a.body})
	}

	for _, op := range v.Operations() {
		if !v.Covered(op) {
			t.Errorf("no exchange of this test exercised %s", op)
		}
	}
	seen := v.Problems()
	for _, pt := range schemas.ProblemTypes() {
		if !seen[pt.Slug()] && apitest.ProblemsElsewhere[pt.Slug()] == "" {
			t.Errorf("problem type %s: no exchange answered it; add one here or to apitest.ProblemsElsewhere with where it is tested", pt.Slug())
		}
	}
}
