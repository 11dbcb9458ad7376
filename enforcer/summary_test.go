package enforcer

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/schemas"
)

// line sums up a tenant of the summary: "tenant status reason meter=used/limit(pct)status …".
func line(ts TenantSummary) string {
	s := fmt.Sprintf("%s %s %s", ts.Tenant, ts.Status, ts.Reason)
	for _, m := range ts.Meters {
		s += fmt.Sprintf(" %s=%d", m.Meter, m.Used)
		if m.Limit != nil {
			s += fmt.Sprintf("/%d(%.1f)", *m.Limit, *m.Percent)
		}
		s += m.Status
	}
	return s
}

func TestUsageSummary(t *testing.T) {
	v := newEnv(t)
	p := v.clock.Period(catalog.Monthly)
	v.usage("acme", "api_calls", p.Start, false, 600, 250)                          // 85 % of 1000: warning
	v.usage("bigco", "api_calls", p.Start, false, 1_200_000)                        // over, but overage: warning
	v.usage("bigco", "tokens", p.Start, false, 10)                                  // 0.2 %
	v.usage("daily", "api_calls", v.clock.Period(catalog.Daily).Start, false, 1000) // at the limit: blocked
	v.usage("daily", "storage_gb", v.clock.Period(catalog.Daily).Start, false, 3)   // no limit
	v.start()
	v.waitDecision("daily", time.Second, blockedFor(schemas.ReasonQuotaExceeded))

	var s Summary
	v.eventually("summary seeded", 5*time.Second, func() error {
		s = Summary{}
		if resp := v.do(http.MethodGet, "/v1/usage/summary", adminKey, nil, &s); resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		for _, ts := range s.Tenants {
			if !ts.UsageSeeded {
				return fmt.Errorf("%s not seeded", ts.Tenant)
			}
		}
		return nil
	})
	var got []string
	for _, ts := range s.Tenants {
		got = append(got, line(ts))
	}
	want := []string{
		"acme warning  api_calls=850/1000(85.0)warning",
		"bigco warning  api_calls=1200000/1000000(120.0)warning tokens=10/5000(0.2)ok",
		"daily blocked quota_exceeded api_calls=1000/1000(100.0)blocked storage_gb=3ok",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("summary:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if d := s.Tenants[2].Detail; !strings.Contains(d, "daily used 1000 of 1000 api_calls") {
		t.Errorf("blocked detail %q", d)
	}
	if d := s.Tenants[0].Detail; !strings.Contains(d, "acme used 850 of 1000 api_calls (85.0%)") {
		t.Errorf("warning detail %q", d)
	}
	if pe := s.Tenants[0].PeriodEnd; !pe.Equal(p.End) {
		t.Errorf("acme period end %s, want %s", pe, p.End)
	}

	// An unpaid invoice blocks acme: blocked with the billing reason.
	if code := v.webhook(stripeEvent("evt_1", "invoice.payment_failed", "cus_acme", "in_1", "", v.clock.Now()), webhookSecret, v.clock.Now()); code != http.StatusOK {
		t.Fatalf("webhook: %d", code)
	}
	v.waitDecision("acme", time.Second, blockedFor(schemas.ReasonPaymentOverdue))
	s = Summary{}
	v.do(http.MethodGet, "/v1/usage/summary?tenant=acme", adminKey, nil, &s)
	if len(s.Tenants) != 1 || line(s.Tenants[0]) != "acme blocked payment_overdue api_calls=850/1000(85.0)warning" ||
		!strings.Contains(s.Tenants[0].Detail, "payment is overdue") {
		t.Errorf("acme after payment_failed: %+v", s.Tenants)
	}

	// A tenant key sees its own tenant only.
	s = Summary{}
	if resp := v.do(http.MethodGet, "/v1/usage/summary", tenantKey, nil, &s); resp.StatusCode != http.StatusOK || len(s.Tenants) != 1 || s.Tenants[0].Tenant != "acme" {
		t.Errorf("tenant key: %d %+v", resp.StatusCode, s.Tenants)
	}
	for _, c := range []struct {
		path, key string
		status    int
	}{
		{"/v1/usage/summary?tenant=bigco", tenantKey, http.StatusForbidden},
		{"/v1/usage/summary", "", http.StatusUnauthorized},
		{"/v1/usage/summary?tenant=bad%20name", adminKey, http.StatusBadRequest},
		{"/v1/usage/summary?tenants=acme", adminKey, http.StatusBadRequest},
		{"/v1/usage/summary?tenant=acme&tenant=bigco", tenantKey, http.StatusBadRequest},
		{"/v1/usage/summary?tenant=nobody", adminKey, http.StatusNotFound},
		// Undecodable, never read as no tenant (every tenant's summary).
		{"/v1/usage/summary?tenant=%zz", adminKey, http.StatusBadRequest},
		{"/v1/usage/summary?tenant=%zz", tenantKey, http.StatusBadRequest},
		{"/v1/usage/summary?tenant=acme;x=1", adminKey, http.StatusBadRequest},
		// Given but empty: never every tenant's summary either.
		{"/v1/usage/summary?tenant=", adminKey, http.StatusBadRequest},
		{"/v1/usage/summary?tenant=", tenantKey, http.StatusBadRequest},
	} {
		var body map[string]any
		resp := v.do(http.MethodGet, c.path, c.key, nil, &body)
		if resp.StatusCode != c.status || resp.Header.Get("Content-Type") != schemas.MediaProblem || strings.Contains(fmt.Sprint(body), "1200000") {
			t.Errorf("%s key %q: %d %v, want %d problem", c.path, c.key, resp.StatusCode, body, c.status)
		}
	}
}
