package rollup

import (
	"bytes"
	"encoding/json"
	"errors"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/schemas"
)

func at(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		panic(err)
	}
	return t
}

func sec(s string) int64 { return at(s).Unix() }

func TestSplit(t *testing.T) {
	for _, tc := range []struct {
		from, to string
		hours    Range
		edges    []Range
	}{
		{"2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z",
			Range{sec("2026-01-01T00:00:00Z"), sec("2026-02-01T00:00:00Z")}, nil},
		{"2026-01-31T22:30:00Z", "2026-02-01T01:15:00Z",
			Range{sec("2026-01-31T23:00:00Z"), sec("2026-02-01T01:00:00Z")},
			[]Range{{sec("2026-01-31T22:30:00Z"), sec("2026-01-31T23:00:00Z")}, {sec("2026-02-01T01:00:00Z"), sec("2026-02-01T01:15:00Z")}}},
		{"2026-01-31T22:30:00Z", "2026-01-31T22:40:00Z",
			Range{}, []Range{{sec("2026-01-31T22:30:00Z"), sec("2026-01-31T22:40:00Z")}}},
		{"2026-01-31T22:30:00Z", "2026-01-31T23:40:00Z", // no whole hour inside
			Range{}, []Range{{sec("2026-01-31T22:30:00Z"), sec("2026-01-31T23:40:00Z")}}},
		{"2026-01-31T22:59:59.5Z", "2026-01-31T23:00:00.5Z", // bounds round up to the second
			Range{}, []Range{{sec("2026-01-31T23:00:00Z"), sec("2026-01-31T23:00:01Z")}}},
		{"2026-01-31T22:00:00.5Z", "2026-01-31T23:00:00Z",
			Range{}, []Range{{sec("2026-01-31T22:00:01Z"), sec("2026-01-31T23:00:00Z")}}},
		{"2026-02-01T00:00:00Z", "2026-02-01T00:00:00Z", Range{}, nil},
		{"2026-02-01T00:00:00Z", "2026-01-01T00:00:00Z", Range{}, nil},
		{"1900-01-01T00:00:00Z", "1970-01-01T02:00:00Z", Range{0, 7200}, nil},
	} {
		sp := Split(at(tc.from), at(tc.to))
		if sp.Hours != tc.hours || !slices.Equal(sp.Edges, tc.edges) {
			t.Errorf("Split(%s, %s) = %+v, want hours %+v edges %+v", tc.from, tc.to, sp, tc.hours, tc.edges)
		}
	}
	sp := Split(aggregator.MinEventTime, at("2200-01-01T00:00:00Z"))
	if max := aggregator.MaxEventTime.Unix(); sp.Hours.From != 0 || sp.Hours.To != Hour(max) || !slices.Equal(sp.Edges, []Range{{Hour(max), max}}) {
		t.Errorf("Split of everything = %+v", sp)
	}
}

func TestCovering(t *testing.T) {
	for _, tc := range []struct {
		from, to string
		want     Range
	}{
		{"2026-01-31T23:59:59Z", "2026-02-01T00:30:00Z", Range{sec("2026-01-31T23:00:00Z"), sec("2026-02-01T01:00:00Z")}},
		{"2026-01-31T23:00:00Z", "2026-02-01T00:00:00Z", Range{sec("2026-01-31T23:00:00Z"), sec("2026-02-01T00:00:00Z")}},
		{"2026-01-31T23:00:00Z", "2026-01-31T23:00:00.1Z", Range{sec("2026-01-31T23:00:00Z"), sec("2026-02-01T00:00:00Z")}},
		{"2026-02-01T00:00:00Z", "2026-02-01T00:00:00Z", Range{}},
	} {
		if got := Covering(at(tc.from), at(tc.to)); got != tc.want {
			t.Errorf("Covering(%s, %s) = %+v, want %+v", tc.from, tc.to, got, tc.want)
		}
	}
	if got := Covering(aggregator.MinEventTime, aggregator.MaxEventTime); got.To != aggregator.MaxEventTime.Unix() {
		t.Errorf("Covering of everything ends at %d, want %d", got.To, aggregator.MaxEventTime.Unix())
	}
}

func TestIncrements(t *testing.T) {
	h0, h1 := sec("2026-01-31T23:00:00Z"), sec("2026-02-01T00:00:00Z")
	r := Rows{}
	r.Add(Key{"globex", "api_calls", h0, ""}, Sum{5, 1})
	r.Add(Key{"acme", "tokens", h0, ""}, Sum{3, 1})
	r.Add(Key{"acme", "api_calls", h1, `{"route":"/a"}`}, Sum{2, 1})
	r.Add(Key{"acme", "api_calls", h1, ""}, Sum{4, 2})
	r.Add(Key{"acme", "api_calls", h0, ""}, Sum{1, 1})
	r.Add(Key{"initech", "api_calls", h0, `{"a":"b"}`}, Sum{7, 1})
	r.Add(Key{"initech", "api_calls", h0, ""}, Sum{-7, -1}) // sums to zero: left out
	want := []aggregator.Increment{
		{Tenant: "acme", Meter: "api_calls", Hour: Time(h0), Value: 1, Events: 1},
		{Tenant: "acme", Meter: "api_calls", Hour: Time(h1), Value: 6, Events: 3},
		{Tenant: "acme", Meter: "tokens", Hour: Time(h0), Value: 3, Events: 1},
		{Tenant: "globex", Meter: "api_calls", Hour: Time(h0), Value: 5, Events: 1},
	}
	if got := r.Increments(); !slices.Equal(got, want) {
		t.Errorf("Increments() = %v, want %v", got, want)
	}
}

// TestRowsSaturate: rows and increments that would pass 2^63 stay at
// math.MaxInt64 instead of wrapping negative.
func TestRowsSaturate(t *testing.T) {
	h0 := sec("2026-01-31T23:00:00Z")
	r := Rows{}
	k := Key{"acme", "api_calls", h0, ""}
	r.Add(k, Sum{math.MaxInt64, 1})
	r.Add(k, Sum{1, 1})
	r.Add(Key{"acme", "api_calls", h0, `{"a":"b"}`}, Sum{math.MaxInt64, math.MaxInt64})
	if got := r[k]; got != (Sum{math.MaxInt64, 2}) {
		t.Errorf("row = %+v, want {MaxInt64 2}", got)
	}
	want := []aggregator.Increment{{Tenant: "acme", Meter: "api_calls", Hour: Time(h0), Value: math.MaxInt64, Events: math.MaxInt64}}
	if got := r.Increments(); !slices.Equal(got, want) {
		t.Errorf("Increments() = %v, want %v", got, want)
	}
}

func TestCheck(t *testing.T) {
	ok := schemas.Event{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 1, Time: at("2026-01-31T23:00:00Z")}
	last := ok
	last.Time = aggregator.MaxEventTime.Add(-time.Nanosecond)
	if err := Check([]*schemas.Batch{{ID: "b", Events: []schemas.Event{ok, last}}}); err != nil {
		t.Errorf("Check of valid events: %v", err)
	}
	for name, e := range map[string]func(*schemas.Event){
		"future":  func(e *schemas.Event) { e.Time = aggregator.MaxEventTime },
		"past":    func(e *schemas.Event) { e.Time = aggregator.MinEventTime.Add(-time.Nanosecond) },
		"no id":   func(e *schemas.Event) { e.ID = "" },
		"meter":   func(e *schemas.Event) { e.Meter = "API" },
		"value":   func(e *schemas.Event) { e.Value = -1 },
		"dim key": func(e *schemas.Event) { e.Dimensions = map[string]string{"1x": "y"} },
	} {
		bad := ok
		e(&bad)
		err := Check([]*schemas.Batch{{ID: "b", Events: []schemas.Event{ok, bad}}})
		if !errors.Is(err, aggregator.ErrInvalidEvent) {
			t.Errorf("%s: Check = %v, want ErrInvalidEvent", name, err)
		}
	}
}

// jsonDims is DimsKey by encoding/json, which sorts map keys.
func jsonDims(t testing.TB, dims map[string]string) string {
	if len(dims) == 0 {
		return ""
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(dims); err != nil {
		t.Fatal(err)
	}
	return string(bytes.TrimSuffix(b.Bytes(), []byte("\n")))
}

func TestDimsKey(t *testing.T) {
	var cache DimsCache
	for _, dims := range []map[string]string{
		nil,
		{},
		{"route": "/v1/a"},
		{"route": "/v1/a", "method": "GET", "Region": "eu", "_x": ""},
		{"q": "a \"quoted\" \\ back\nslash\ttab\x01\x1f <html> & é ☃ \u2028"},
		{"bad": "\xff\xfeinvalid\xc3"},
	} {
		want := jsonDims(t, dims)
		if got := DimsKey(dims); got != want {
			t.Errorf("DimsKey(%q) = %s, want %s", dims, got, want)
		}
		for range 2 { // the second time from the cache
			if got := cache.Get(dims); got != want {
				t.Errorf("DimsCache.Get(%q) = %s, want %s", dims, got, want)
			}
		}
	}
}

func FuzzDimsKey(f *testing.F) {
	f.Add("route", "/v1/a", "method", "GET")
	f.Add("a", "\"\\\n", "b", "\xff")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		dims := map[string]string{k1: v1, k2: v2}
		if got, want := DimsKey(dims), jsonDims(t, dims); got != want {
			t.Errorf("DimsKey(%q) = %s, want %s", dims, got, want)
		}
	})
}

func BenchmarkDimsKey(b *testing.B) {
	dims := map[string]string{"route": "/v1/users/{id}", "method": "GET", "status": "200"}
	b.ReportAllocs()
	for b.Loop() {
		DimsKey(dims)
	}
}

func BenchmarkDimsCache(b *testing.B) {
	dims := map[string]string{"route": "/v1/users/{id}", "method": "GET", "status": "200"}
	var c DimsCache
	b.ReportAllocs()
	for b.Loop() {
		c.Get(dims)
	}
}
