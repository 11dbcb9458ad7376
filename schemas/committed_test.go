package schemas

import (
	"encoding/json"
	"math"
	"testing"
	"time"
)

// sameCommitted reports whether a and b are equal, times by instant and
// location.
func sameCommitted(a, b Committed) bool {
	return a.Tenant == b.Tenant && a.Meter == b.Meter && a.Value == b.Value && a.Events == b.Events &&
		a.Hour.Equal(b.Hour) && a.Hour.Location() == b.Hour.Location() &&
		a.SealedAt.Equal(b.SealedAt) && a.SealedAt.Location() == b.SealedAt.Location()
}

var committedCases = []Committed{
	{Tenant: "acme", Meter: "api_calls", Hour: time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC), Value: 42, Events: 7},
	{Tenant: "t-\"q\"\\<&>\u2028", Meter: "m", Hour: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), Value: math.MaxInt64, Events: 1,
		SealedAt: time.Date(2026, 1, 1, 0, 59, 59, 123456789, time.UTC)},
	{Tenant: "a", Meter: "b", Hour: time.Date(0, 1, 1, 0, 0, 0, 0, time.UTC), SealedAt: time.Date(9999, 12, 31, 23, 0, 0, 1000, time.UTC)},
}

// What AppendCommitted writes, encoding/json and DecodeCommitted's fast
// path read back the same, and it is what json.Marshal writes for plain
// strings.
func TestCommittedRoundTrip(t *testing.T) {
	for i, c := range committedCases {
		data, err := AppendCommitted(nil, &c)
		if err != nil {
			t.Fatal(err)
		}
		var viaJSON Committed
		if err := json.Unmarshal(data, &viaJSON); err != nil || !sameCommitted(viaJSON, c) {
			t.Fatalf("case %d: encoding/json read %s as %+v (%v)", i, data, viaJSON, err)
		}
		fast, ok := decodeCommitted(data)
		if !ok || !sameCommitted(fast, c) {
			t.Fatalf("case %d: the fast path read %s as %+v, ok=%v", i, data, fast, ok)
		}
		if i == 0 {
			want, _ := json.Marshal(c)
			if string(data) != string(want) {
				t.Fatalf("AppendCommitted wrote %s, encoding/json %s", data, want)
			}
		}
	}
	if _, err := AppendCommitted(nil, &Committed{Hour: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}); err == nil {
		t.Fatal("a year past 9999 was written")
	}
}

// Forms the fast path leaves to encoding/json are read as encoding/json
// reads them, errors included.
func TestDecodeCommittedOtherForms(t *testing.T) {
	for _, doc := range []string{
		`{"Tenant":"a","meter":"m","hour":"2026-12-06T10:00:00Z","value":1,"events":1}`,
		`{"tenant":"a","meter":"m","hour":"2026-12-06T11:00:00+01:00","value":1,"events":1}`,
		`{"tenant":"a","meter":"m","hour":"2026-12-06T10:00:00Z","value":1e2,"events":1}`,
		`{"tenant":"a","meter":"m","hour":"2026-12-06T10:00:00Z","value":-5,"events":1}`,
		`{"tenant":"a","meter":"m","hour":"2026-12-06T10:00:00Z","value":99999999999999999999,"events":1}`,
		`{"tenant":null,"meter":"m","hour":"2026-12-06T10:00:00Z","value":1,"events":1,"extra":[1]}`,
		`{"tenant":"a","meter":"m","hour":"2026-12-06t10:00:00z","value":1,"events":1}`,
		`{"tenant":"a",`, `[]`, `null`, ``,
	} {
		got, gotErr := DecodeCommitted([]byte(doc))
		var want Committed
		wantErr := json.Unmarshal([]byte(doc), &want)
		if (gotErr == nil) != (wantErr == nil) || gotErr == nil && !sameCommitted(got, want) {
			t.Errorf("%s: DecodeCommitted %+v, %v; encoding/json %+v, %v", doc, got, gotErr, want, wantErr)
		}
	}
}

// Whatever the fast path accepts, encoding/json reads the same.
func FuzzDecodeCommitted(f *testing.F) {
	for _, c := range committedCases {
		data, _ := AppendCommitted(nil, &c)
		f.Add(data)
	}
	f.Add([]byte(`{"tenant":"a","meter":"m","hour":"2026-12-06T10:00:00.5Z","value":0,"events":0}`))
	f.Add([]byte(`{"value":007}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		fast, ok := decodeCommitted(data)
		if !ok {
			return
		}
		var want Committed
		if err := json.Unmarshal(data, &want); err != nil {
			t.Fatalf("%q: the fast path read %+v, encoding/json fails: %v", data, fast, err)
		}
		if !sameCommitted(fast, want) {
			t.Fatalf("%q: the fast path read %+v, encoding/json %+v", data, fast, want)
		}
	})
}

// BenchmarkCommitted encodes and decodes one committed increment, with
// encoding/json and with AppendCommitted and DecodeCommitted.
func BenchmarkCommitted(b *testing.B) {
	c := committedCases[1]
	c.Tenant = "tenant-0042"
	data, _ := json.Marshal(c)
	b.Run("encoding-json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			out, _ := json.Marshal(c)
			var back Committed
			if err := json.Unmarshal(out, &back); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("append-decode", func(b *testing.B) {
		b.ReportAllocs()
		buf := make([]byte, 0, len(data))
		for b.Loop() {
			buf, _ = AppendCommitted(buf[:0], &c)
			if _, err := DecodeCommitted(buf); err != nil {
				b.Fatal(err)
			}
		}
	})
}
