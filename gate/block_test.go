package gate

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/schemas"
)

// wantBody is the exact problem body of docs/architecture.md#http-apis for the test decisions.
func wantBody(d schemas.Decision) map[string]any {
	base := map[string]any{"title": "Payment Required", "status": json.Number("402"), "reason": string(d.Reason), "tenant": d.Tenant}
	if d.BillingURL != "" {
		base["billing_url"] = d.BillingURL
	}
	switch d.Reason {
	case schemas.ReasonQuotaExceeded:
		base["type"] = "https://meterd.dev/problems/quota-exceeded"
		base["detail"] = d.Tenant + " used 1004 of 1000 api_calls in the period ending 2026-12-01T00:00:00Z; upgrade the plan or wait for the next period."
		base["meter"] = "api_calls"
		base["limit"] = json.Number("1000")
		base["used"] = json.Number("1004")
		base["period_end"] = "2026-12-01T00:00:00Z"
	case schemas.ReasonPaymentOverdue:
		base["type"] = "https://meterd.dev/problems/payment-overdue"
		base["detail"] = d.Tenant + "'s payment is overdue; pay the open invoice at " + d.BillingURL + " to restore access."
	case schemas.ReasonPaymentMethodRequired:
		base["type"] = "https://meterd.dev/problems/payment-method-required"
		base["detail"] = d.Tenant + " has no valid payment method; add one at " + d.BillingURL + " to restore access."
	case schemas.ReasonSuspended:
		base["type"] = "https://meterd.dev/problems/suspended"
		base["detail"] = d.Tenant + "'s account is suspended; contact the provider to restore access."
	}
	return base
}

func TestNewBlock(t *testing.T) {
	for _, d := range []schemas.Decision{
		quota("acme", 42),
		unpaid("bravo", schemas.ReasonPaymentOverdue, "https://billing.example.com/bravo?invoice=in_1&pay=1", 7),
		unpaid("charlie", schemas.ReasonPaymentMethodRequired, "https://billing.example.com/charlie", 1),
		unpaid("delta", schemas.ReasonSuspended, "", 3),
	} {
		t.Run(string(d.Reason), func(t *testing.T) {
			got, err := decodeDecision(d.Tenant, mustJSON(t, d))
			if err != nil {
				t.Fatal(err)
			}
			if got != d {
				t.Fatalf("decoded %+v, want %+v", got, d)
			}
			b, err := newBlock(got)
			if err != nil {
				t.Fatal(err)
			}
			if b.Status != http.StatusPaymentRequired {
				t.Errorf("Status = %d, want 402", b.Status)
			}
			if body, want := decodeProblem(t, b.Problem), wantBody(d); !reflect.DeepEqual(body, want) {
				t.Errorf("body\n got %v\nwant %v", body, want)
			}
			if strings.Contains(string(b.Problem), `\u0026`) {
				t.Errorf("body escapes & in the billing URL: %s", b.Problem)
			}
			wantLink := ""
			if d.BillingURL != "" {
				wantLink = "<" + d.BillingURL + `>; rel="payment"`
			}
			if b.Link != wantLink {
				t.Errorf("Link = %q, want %q", b.Link, wantLink)
			}
		})
	}
}

func TestRetryAfter(t *testing.T) {
	q := mustBlock(t, quota("acme", 1))
	for _, tc := range []struct {
		name   string
		b      *Block
		now    time.Time
		want   int64
		wantOK bool
	}{
		{"whole seconds", q, periodEnd.Add(-734400 * time.Second), 734400, true},
		{"rounded up", q, periodEnd.Add(-1500 * time.Millisecond), 2, true},
		{"just before the end", q, periodEnd.Add(-time.Nanosecond), 1, true},
		{"at the end", q, periodEnd, 1, true},
		{"after the end", q, periodEnd.Add(time.Hour), 1, true},
		{"unpaid", mustBlock(t, unpaid("b", schemas.ReasonPaymentOverdue, "", 1)), periodStart, 0, false},
		{"suspended", mustBlock(t, unpaid("b", schemas.ReasonSuspended, "", 1)), periodStart, 0, false},
		{"quota without a period end", mustBlock(t, schemas.Decision{Tenant: "x", Reason: schemas.ReasonQuotaExceeded, Meter: "m"}), periodStart, 0, false},
		{"stale", newStaleBlock(15 * time.Second), periodStart, 5, true},
		{"stale, short", newStaleBlock(time.Second), periodStart, 1, true},
		{"stale, rounded up", newStaleBlock(10 * time.Second), periodStart, 4, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := tc.b.RetryAfter(tc.now)
			if got != tc.want || ok != tc.wantOK {
				t.Errorf("RetryAfter = %d, %v; want %d, %v", got, ok, tc.want, tc.wantOK)
			}
		})
	}
}

func TestBlockWrite(t *testing.T) {
	b := mustBlock(t, quota("acme", 1))
	rec := httptest.NewRecorder()
	rec.Header().Set("X-Request-ID", "r1")
	b.Write(rec, periodEnd.Add(-734400*time.Second))
	res := rec.Result()
	if res.StatusCode != http.StatusPaymentRequired {
		t.Errorf("status %d", res.StatusCode)
	}
	for h, want := range map[string]string{
		"Content-Type":           "application/problem+json",
		"Retry-After":            "734400",
		"Link":                   `<https://billing.example.com/acme>; rel="payment"`,
		"X-Request-ID":           "r1",
		"X-Content-Type-Options": "nosniff",
	} {
		if got := res.Header.Get(h); got != want {
			t.Errorf("%s = %q, want %q", h, got, want)
		}
	}
	if rec.Body.String() != string(b.Problem) {
		t.Errorf("body %s, want %s", rec.Body, b.Problem)
	}

	rec = httptest.NewRecorder()
	mustBlock(t, unpaid("bravo", schemas.ReasonSuspended, "", 1)).Write(rec, periodStart)
	if h := rec.Result().Header; h.Get("Retry-After") != "" || h.Get("Link") != "" {
		t.Errorf("suspended without billing URL sent Retry-After %q, Link %q", h.Get("Retry-After"), h.Get("Link"))
	}
}

func TestStaleBlock(t *testing.T) {
	b := newStaleBlock(15 * time.Second)
	want := map[string]any{
		"type":   "https://meterd.dev/problems/blocklist-stale",
		"title":  "Service Unavailable",
		"status": json.Number("503"),
		"detail": "the blocklist has had no update from the enforcer for more than 15s; requests are denied until it is current again.",
		"reason": "stale",
	}
	if got := decodeProblem(t, b.Problem); !reflect.DeepEqual(got, want) {
		t.Errorf("body\n got %v\nwant %v", got, want)
	}
	if b.Status != http.StatusServiceUnavailable || b.Link != "" || b.Decision.Reason != ReasonStale {
		t.Errorf("stale block %+v", b)
	}
}

func TestDecodeDecisionRejects(t *testing.T) {
	good := quota("acme", 1)
	for _, tc := range []struct {
		name  string
		key   string
		value string
	}{
		{"not JSON", "acme", "not json"},
		{"JSON but not an object", "acme", `[1,2]`},
		{"key is not a tenant", "acme=x", string(mustJSON(t, good))},
		{"tenant differs from key", "bravo", string(mustJSON(t, good))},
		{"unknown reason", "acme", `{"tenant":"acme","reason":"over_the_moon","version":1}`},
		{"quota without meter", "acme", `{"tenant":"acme","reason":"quota_exceeded","limit":1,"used":2,"version":1}`},
		{"negative used", "acme", `{"tenant":"acme","reason":"quota_exceeded","meter":"m","limit":1,"used":-2,"version":1}`},
		{"relative billing URL", "acme", `{"tenant":"acme","reason":"payment_overdue","billing_url":"/pay","version":1}`},
		{"script billing URL", "acme", `{"tenant":"acme","reason":"payment_overdue","billing_url":"javascript:alert(1)","version":1}`},
		{"header injection", "acme", `{"tenant":"acme","reason":"payment_overdue","billing_url":"https://x.example/\r\nSet-Cookie: a=b","version":1}`},
		{"version is text", "acme", `{"tenant":"acme","reason":"suspended","version":"1"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if d, err := decodeDecision(tc.key, []byte(tc.value)); err == nil {
				t.Errorf("accepted %+v", d)
			}
		})
	}
}

func FuzzDecodeDecision(f *testing.F) {
	f.Add("acme", string(mustJSON(f, quota("acme", 42))))
	f.Add("bravo", string(mustJSON(f, unpaid("bravo", schemas.ReasonPaymentOverdue, "https://b.example/p?a=1&b=2", 3))))
	f.Add("acme", `{"tenant":"acme","reason":"quota_exceeded","meter":"m","period_end":"9999-12-31T23:00:00-05:00","version":1}`)
	f.Add("=heartbeat", `{"at":"2026-11-28T16:00:00Z"}`)
	f.Fuzz(func(t *testing.T, key, value string) {
		d, err := decodeDecision(key, []byte(value))
		if err != nil {
			return
		}
		b, err := newBlock(d)
		if err != nil {
			return
		}
		p := decodeProblem(t, b.Problem)
		if p["tenant"] != key || p["status"] != json.Number("402") || p["reason"] != string(d.Reason) {
			t.Fatalf("body %s for key %q", b.Problem, key)
		}
		if b.Link != "" && strings.ContainsAny(b.Link[1:len(b.Link)-len(`>; rel="payment"`)], "<>\r\n") {
			t.Fatalf("Link %q", b.Link)
		}
	})
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustBlock(t testing.TB, d schemas.Decision) *Block {
	t.Helper()
	b, err := newBlock(d)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
