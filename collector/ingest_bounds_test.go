package collector

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/schemas"
)

// A body of many invalid events costs what its size does, not its size
// squared, and its 422 lists at most schemas.MaxFieldErrors errors: the
// body of 200 000 non-objects, each one error, took minutes to answer and
// answered hundreds of megabytes when every error was checked against
// every event and listed.
func TestManyInvalidEventsBounded(t *testing.T) {
	env := newIngestEnv(t, nil)
	h := http.Header{"Content-Type": {schemas.MediaJSON}}
	for _, c := range []struct {
		name, body, detail string
		firstField         string
		lastIndex          int // of the last error listed
	}{
		{"non-objects", "[" + strings.TrimSuffix(strings.Repeat("1,", 200_000), ",") + "]",
			"1000 of the first 1000 events are invalid (the rest was not checked); nothing of this request was accepted", "", 999},
		// Each without an id (found by the decoder), tenant and meter.
		{"empty objects", "[" + strings.TrimSuffix(strings.Repeat(`{},`, 200_000), ",") + "]",
			"500 of the first 500 events are invalid (the rest was not checked); the first 1000 errors are listed; nothing of this request was accepted", "id", 333},
		{"invalid objects", "[" + strings.TrimSuffix(strings.Repeat(`{"id":"a","tenant":"acme","meter":"Bad Meter"},`, 20_000), ",") + "]",
			"1000 of the first 1000 events are invalid (the rest was not checked); nothing of this request was accepted", "meter", 999},
	} {
		t.Run(c.name, func(t *testing.T) {
			status, body := env.postRaw(t, h, c.body)
			if status != http.StatusUnprocessableEntity {
				t.Fatalf("status %d: %.300s", status, body)
			}
			var p schemas.Problem
			if err := json.Unmarshal(body, &p); err != nil {
				t.Fatal(err)
			}
			if len(p.Errors) != schemas.MaxFieldErrors || p.Detail != c.detail || p.Errors[0].Field != c.firstField || p.Errors[999].Index != c.lastIndex {
				t.Errorf("%d errors, detail %q, first %+v, last %+v; want %d, %q, field %q, the last of event %d",
					len(p.Errors), p.Detail, p.Errors[0], p.Errors[len(p.Errors)-1], schemas.MaxFieldErrors, c.detail, c.firstField, c.lastIndex)
			}
		})
	}
	// A valid request still goes through.
	status, body := env.postRaw(t, h, `{"id":"ok-1","tenant":"acme","meter":"api_calls"}`)
	if status != http.StatusAccepted {
		t.Fatalf("a valid event afterwards: %d %s", status, body)
	}
}

// An event whose time is the zero time (an unset time.Time of a Go client)
// is refused, never stamped with the receive time; so is one before 1970
// when the late-event bound would let it through.
func TestZeroAndPre1970TimesRefused(t *testing.T) {
	env := newIngestEnv(t, func(c *Config) { c.MaxEventAge = 100 * 365 * 24 * time.Hour })
	for _, c := range []struct{ ct, body, msg string }{
		{schemas.MediaJSON, `{"id":"z0","tenant":"acme","meter":"api_calls","time":"0001-01-01T00:00:00Z"}`, "unset time"},
		{schemas.MediaJSON, `{"id":"z1","tenant":"acme","meter":"api_calls","time":"0000-12-31T23:30:00-00:30"}`, "unset time"},
		{schemas.MediaCloudEvent, `{"specversion":"1.0","id":"z2","source":"s","type":"api_calls","subject":"acme","time":"0001-01-01T00:00:00Z"}`, "unset time"},
		{schemas.MediaJSON, `{"id":"z3","tenant":"acme","meter":"api_calls","time":"1969-12-31T23:59:59Z"}`, "1970"},
	} {
		status, body := env.postRaw(t, http.Header{"Content-Type": {c.ct}}, c.body)
		errs := problemErrors(t, body)
		if status != http.StatusUnprocessableEntity || len(errs) != 1 || errs[0].Field != "time" || !strings.Contains(errs[0].Message, c.msg) {
			t.Errorf("%s: %d %s; want a 422 for time saying %q", c.body, status, body, c.msg)
		}
	}
	status, body := env.postRaw(t, http.Header{"Content-Type": {schemas.MediaJSON}}, `{"id":"z4","tenant":"acme","meter":"api_calls","time":"1970-01-01T00:00:00Z"}`)
	if status != http.StatusAccepted {
		t.Errorf("1970-01-01T00:00:00Z within the bound: %d %s, want 202", status, body)
	}
}

// The NDJSON decoder makes room for the events a body can hold, not for
// each of its newlines.
func TestBlankLinesCostNothing(t *testing.T) {
	body := strings.Repeat("\n", 1<<20) + `{"id":"a","tenant":"acme","meter":"m"}` + "\n"
	d, err := schemas.DecodeEvents(schemas.MediaNDJSON, []byte(body))
	if err != nil || len(d.Events) != 1 {
		t.Fatalf("%d events, %v", len(d.Events), err)
	}
	if c := cap(d.Events); c > len(body)/64+1 {
		t.Errorf("room for %d events in a body of %d bytes", c, len(body))
	}
}

// BenchmarkRefuseInvalid decodes and admits bodies that are refused: 20 000
// non-objects, and 999 non-objects followed by 100 000 events with an
// invalid meter. The work grows with the body, not with its events times
// its errors.
func BenchmarkRefuseInvalid(b *testing.B) {
	env := newIngestEnv(b, nil)
	for _, c := range []struct {
		name       string
		nonObjects int
		badMeter   int
	}{{"non-objects", 20_000, 0}, {"bad-meters", 999, 100_000}} {
		b.Run(c.name, func(b *testing.B) {
			var body strings.Builder
			body.WriteString("[" + strings.Repeat("1,", c.nonObjects) + strings.Repeat(`{"id":"a","tenant":"acme","meter":"Bad Meter"},`, c.badMeter))
			raw := []byte(strings.TrimSuffix(body.String(), ",") + "]")
			b.ReportAllocs()
			b.SetBytes(int64(len(raw)))
			for b.Loop() {
				d, err := schemas.DecodeEvents(schemas.MediaJSON, raw)
				if err != nil {
					b.Fatal(err)
				}
				if _, _, p := env.col.admit(auth.Principal{Admin: true}, d); p == nil || len(p.Errors) == 0 {
					b.Fatalf("problem %+v", p)
				}
			}
		})
	}
}
