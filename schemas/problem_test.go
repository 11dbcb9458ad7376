package schemas

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"net/url"
	"reflect"
	"testing"
	"time"
)

// problemBody decodes a problem body with numbers kept exact.
func problemBody(t *testing.T, body []byte) map[string]any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("%v: %s", err, body)
	}
	return m
}

func TestProblemWrite402(t *testing.T) {
	limit, used := int64(1000), int64(1004)
	end := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	p := NewProblem(ProblemQuotaExceeded, "acme used 1004 of 1000 api_calls in the period ending 2026-12-01T00:00:00Z; upgrade the plan or wait for the next period.")
	p.Block = &Block{Reason: ReasonQuotaExceeded, Tenant: "acme", Meter: "api_calls", Limit: &limit, Used: &used,
		PeriodEnd: &end, BillingURL: "https://billing.example.com/acme"}
	rec := httptest.NewRecorder()
	rec.Header().Set("Retry-After", "734400")
	rec.Header().Set("Link", `<https://billing.example.com/acme>; rel="payment"`)
	p.Write(rec)

	if rec.Code != 402 {
		t.Errorf("status %d", rec.Code)
	}
	h := rec.Header()
	if h.Get("Content-Type") != "application/problem+json" || h.Get("X-Content-Type-Options") != "nosniff" ||
		h.Get("Retry-After") != "734400" || h.Get("Link") != `<https://billing.example.com/acme>; rel="payment"` {
		t.Errorf("headers %v", h)
	}
	want := map[string]any{
		"type":        "https://meterd.dev/problems/quota-exceeded",
		"title":       "Payment Required",
		"status":      json.Number("402"),
		"detail":      "acme used 1004 of 1000 api_calls in the period ending 2026-12-01T00:00:00Z; upgrade the plan or wait for the next period.",
		"reason":      "quota_exceeded",
		"tenant":      "acme",
		"meter":       "api_calls",
		"limit":       json.Number("1000"),
		"used":        json.Number("1004"),
		"period_end":  "2026-12-01T00:00:00Z",
		"billing_url": "https://billing.example.com/acme",
	}
	if got := problemBody(t, rec.Body.Bytes()); !reflect.DeepEqual(got, want) {
		t.Errorf("body\n got %v\nwant %v", got, want)
	}
}

// An unpaid tenant's block has no quota members; a zero limit is still shown.
func TestProblemWrite402Unpaid(t *testing.T) {
	zero := int64(0)
	for _, tc := range []struct {
		block *Block
		want  map[string]any
	}{
		{&Block{Reason: ReasonPaymentOverdue, Tenant: "acme", BillingURL: "https://billing.example.com/acme"},
			map[string]any{"type": "https://meterd.dev/problems/payment-overdue", "reason": "payment_overdue", "tenant": "acme", "billing_url": "https://billing.example.com/acme"}},
		{&Block{Reason: ReasonQuotaExceeded, Tenant: "acme", Meter: "tokens", Limit: &zero, Used: &zero},
			map[string]any{"type": "https://meterd.dev/problems/quota-exceeded", "reason": "quota_exceeded", "tenant": "acme", "meter": "tokens", "limit": json.Number("0"), "used": json.Number("0")}},
	} {
		// A block's problem type is its reason's: payment-required is no
		// type of meterd's.
		typ, _ := ReasonProblem(tc.block.Reason)
		p := NewProblem(typ, "")
		p.Block = tc.block
		rec := httptest.NewRecorder()
		p.Write(rec)
		got := problemBody(t, rec.Body.Bytes())
		tc.want["title"] = "Payment Required"
		tc.want["status"] = json.Number("402")
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("body\n got %v\nwant %v", got, tc.want)
		}
	}
}

func TestProblemWrite422(t *testing.T) {
	p := NewProblem(ProblemInvalidEvents, "2 events are invalid; nothing of the request was kept")
	p.Errors = []FieldError{{Index: 0, Field: "meter", Message: "is required"}, {Index: 2, Field: "value", Message: "must be a non-negative integer"}}
	rec := httptest.NewRecorder()
	p.Write(rec)
	if rec.Code != 422 || rec.Header().Get("Content-Type") != MediaProblem {
		t.Fatalf("status %d, headers %v", rec.Code, rec.Header())
	}
	want := map[string]any{
		"type":   "https://meterd.dev/problems/invalid-events",
		"title":  "Unprocessable Entity",
		"status": json.Number("422"),
		"detail": "2 events are invalid; nothing of the request was kept",
		"errors": []any{
			map[string]any{"index": json.Number("0"), "field": "meter", "message": "is required"},
			map[string]any{"index": json.Number("2"), "field": "value", "message": "must be a non-negative integer"},
		},
	}
	if got := problemBody(t, rec.Body.Bytes()); !reflect.DeepEqual(got, want) {
		t.Errorf("body\n got %v\nwant %v", got, want)
	}
	// A Problem decodes back, as clients in Go read it.
	var back Problem
	if err := json.Unmarshal(rec.Body.Bytes(), &back); err != nil || back.Status != 422 || len(back.Errors) != 2 || back.Errors[1] != p.Errors[1] || back.Block != nil {
		t.Errorf("decoded %+v, %v", back, err)
	}
}

func TestProblemWriteMinimal(t *testing.T) {
	rec := httptest.NewRecorder()
	NewProblem(ProblemUnsupportedMediaType, "").Write(rec)
	want := map[string]any{"type": "https://meterd.dev/problems/unsupported-media-type", "title": "Unsupported Media Type", "status": json.Number("415")}
	if got := problemBody(t, rec.Body.Bytes()); rec.Code != 415 || !reflect.DeepEqual(got, want) {
		t.Errorf("%d %v", rec.Code, got)
	}
}

// A query string that is not valid percent-encoding names the parameter it
// spoils instead of losing it, where url.ParseQuery drops the pair.
func TestParseQuery(t *testing.T) {
	for _, c := range []struct {
		raw string
		v   url.Values
		bad []InvalidParam
	}{
		{"", url.Values{}, nil},
		{"tenant=acme&group_by=route&group_by=method&&x", url.Values{"tenant": {"acme"}, "group_by": {"route", "method"}, "x": {""}}, nil},
		{"tenant=acme%20corp&a+b=c%2Bd", url.Values{"tenant": {"acme corp"}, "a b": {"c+d"}}, nil},
		{"tenant=%zz&meter=api_calls", url.Values{"meter": {"api_calls"}},
			[]InvalidParam{{"tenant", "the value is not valid percent-encoding (% must be followed by two hex digits)"}}},
		{"ten%ant=acme&from=%", url.Values{},
			[]InvalidParam{{"ten%ant", "the name is not valid percent-encoding (% must be followed by two hex digits)"},
				{"from", "the value is not valid percent-encoding (% must be followed by two hex digits)"}}},
		{"tenant=acme;meter=x", url.Values{},
			[]InvalidParam{{"tenant", "holds a semicolon; separate parameters with & and send a ; in a value as %3B"}}},
	} {
		v, bad := ParseQuery(c.raw)
		if !reflect.DeepEqual(v, c.v) || !reflect.DeepEqual(bad, c.bad) {
			t.Errorf("ParseQuery(%q) = %v, %v; want %v, %v", c.raw, v, bad, c.v, c.bad)
		}
	}
}
