package schemas

import (
	"bytes"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// Pieces of random strings: escapes, HTML characters encoding/json escapes
// and EncodeBatch does not, JavaScript line ends, replacement characters.
var stringPieces = []string{
	"a", "Z", "0", "-", "_", ".", "/", " ", "~", `"`, `\`, "\n", "\r", "\t", "\b", "\f",
	"\x00", "\x01", "\x1f", "\x7f", "<", ">", "&", "é", "世", "\u2028", "\u2029", "😀", "\ufffd",
	"\u00a0", "\ufeff",
}

// invalidUTF8 holds byte sequences that are not UTF-8: encoding/json writes
// each byte as \ufffd.
var invalidUTF8 = []string{"\xff", "\xc3", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xe2\x28\xa1", "\xc0\xaf"}

// randString returns up to maxRunes runes of long plain runs, pieces and
// random code points, with invalid UTF-8 unless valid is set.
func randString(r *rand.Rand, maxRunes int, valid bool) string {
	var sb strings.Builder
	for n := r.IntN(maxRunes + 1); n > 0; {
		switch k := r.IntN(10); {
		case k < 3: // a run of ASCII letters: the 8-byte paths
			run := min(n, 1+r.IntN(24))
			for range run {
				sb.WriteByte(byte('a' + r.IntN(26)))
			}
			n -= run
			continue
		case k < 7:
			sb.WriteString(stringPieces[r.IntN(len(stringPieces))])
		case k < 9:
			c := rune(r.IntN(utf8.MaxRune + 1))
			if !utf8.ValidRune(c) {
				c = 'x'
			}
			sb.WriteRune(c)
		case valid:
			sb.WriteByte('v')
		default:
			sb.WriteString(invalidUTF8[r.IntN(len(invalidUTF8))])
		}
		n--
	}
	return sb.String()
}

// randName returns 1 to maxLen characters: first of first, the rest of rest.
func randName(r *rand.Rand, maxLen int, first, rest string) string {
	b := []byte{first[r.IntN(len(first))]}
	for n := r.IntN(maxLen); n > 0; n-- {
		b = append(b, rest[r.IntN(len(rest))])
	}
	return string(b)
}

// randTime returns a time whose year is 0000 to 9999 in UTC and in its zone,
// in UTC or a random zone of whole minutes (RFC 3339 writes no seconds).
func randTime(r *rand.Rand) time.Time {
	lo, hi := minBatchTime.Add(24*time.Hour).Unix(), endBatchTime.Add(-24*time.Hour).Unix()
	var t time.Time
	switch r.IntN(4) {
	case 0: // near now, as events are
		t = time.Date(2026, 11, 20, 9, 30, 0, 0, time.UTC).Add(time.Duration(r.Int64N(int64(time.Hour))))
	case 1: // whole seconds: no fraction
		t = time.Unix(lo+r.Int64N(hi-lo), 0)
	default:
		t = time.Unix(lo+r.Int64N(hi-lo), r.Int64N(1e9))
	}
	if r.IntN(3) == 0 {
		return t.In(time.FixedZone("", (r.IntN(28*60+1)-14*60)*60))
	}
	return t.UTC()
}

func randValue(r *rand.Rand) int64 {
	switch r.IntN(4) {
	case 0:
		return 0
	case 1:
		return MaxValue
	case 2:
		return r.Int64N(1000)
	default:
		return r.Int64N(MaxValue + 1)
	}
}

// randBatch returns a batch with 0 to 8 events of 0 to 16 dimensions. With
// valid set, every event passes Validate and every string is UTF-8, so that
// the batch decodes back as it was; otherwise anything goes.
func randBatch(r *rand.Rand, valid bool) *Batch {
	str := func(maxRunes int) string { return randString(r, maxRunes, valid) }
	b := &Batch{ID: str(40), Collector: str(20), SealedAt: randTime(r)}
	if valid && b.ID == "" {
		b.ID = "batch"
	}
	switch r.IntN(8) {
	case 0: // nil: written null
	case 1:
		b.Events = []Event{}
	default:
		b.Events = make([]Event, 1+r.IntN(8))
	}
	for i := range b.Events {
		e := Event{ID: str(MaxIDLen), Tenant: str(20), Meter: str(20), Value: randValue(r), Time: randTime(r)}
		if valid {
			const alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
			if e.ID == "" {
				e.ID = "e"
			}
			e.Tenant = randName(r, MaxTenantLen-1, alnum+"_-", alnum+"._-")
			// A dot only between other characters, never two in a row.
			e.Tenant = strings.ReplaceAll(strings.TrimRight(e.Tenant, "."), "..", ".-")
			e.Meter = randName(r, MaxMeterLen, "abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz0123456789_")
		}
		switch n := r.IntN(MaxDimensions + 1); {
		case n == 0 && r.IntN(2) == 0: // nil
		case n == 0:
			if !valid { // empty: omitted, so decoded as nil
				e.Dimensions = map[string]string{}
			}
		default:
			e.Dimensions = make(map[string]string, n)
			for range n {
				k := str(12)
				if valid {
					k = randName(r, MaxDimensionKeyLen, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_",
						"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
				}
				e.Dimensions[k] = str(MaxDimensionValueLen)
			}
		}
		b.Events[i] = e
	}
	return b
}

// inUTC returns a copy of b with every time in UTC.
func inUTC(b *Batch) *Batch {
	c := *b
	c.SealedAt = c.SealedAt.UTC()
	if b.Events != nil {
		c.Events = make([]Event, len(b.Events))
		for i, e := range b.Events {
			e.Time = e.Time.UTC()
			c.Events[i] = e
		}
	}
	return &c
}

// decodeStd reads data with encoding/json, times in UTC.
func decodeStd(t *testing.T, data []byte) *Batch {
	t.Helper()
	var b Batch
	if err := json.Unmarshal(data, &b); err != nil {
		t.Fatalf("encoding/json: %v\n%s", err, data)
	}
	return inUTC(&b)
}

// marshalJSON is what encoding/json writes for b without its HTML escaping.
func marshalJSON(t *testing.T, b *Batch) []byte {
	t.Helper()
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(b); err != nil {
		t.Fatal(err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

// randomBatches is how many random batches a test tries.
const randomBatches = 1000

// EncodeBatch writes what encoding/json writes, but for the HTML escaping
// and times in UTC; both decode to the same batch.
func TestEncodeBatchMatchesEncodingJSON(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for n := range randomBatches {
		b := randBatch(r, false)
		got, err := EncodeBatch(b)
		if err != nil {
			t.Fatalf("batch %d: %v", n, err)
		}
		if want := marshalJSON(t, inUTC(b)); !bytes.Equal(got, want) {
			t.Fatalf("batch %d:\n got %s\nwant %s", n, got, want)
		}
		std, err := json.Marshal(b)
		if err != nil {
			t.Fatalf("batch %d: json.Marshal: %v", n, err)
		}
		if g, w := decodeStd(t, got), decodeStd(t, std); !reflect.DeepEqual(g, w) {
			t.Fatalf("batch %d decodes differently\n got %+v\nwant %+v", n, g, w)
		}
	}
}

// A valid batch decodes back as it was, times in UTC.
func TestBatchRoundTripRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	var buf []byte
	for n := range randomBatches {
		b := randBatch(r, true)
		data, err := EncodeBatch(b)
		if err != nil {
			t.Fatalf("batch %d: %v", n, err)
		}
		got, err := DecodeBatch(BatchContentType, data)
		if err != nil {
			t.Fatalf("batch %d: %v\n%s", n, err, data)
		}
		if want := inUTC(b); !reflect.DeepEqual(got, want) {
			t.Fatalf("batch %d:\n got %+v\nwant %+v", n, got, want)
		}
		// AppendBatch into a used buffer writes the same.
		if buf, err = AppendBatch(buf[:0], b); err != nil || !bytes.Equal(buf, data) {
			t.Fatalf("batch %d: AppendBatch %v\n%s\nwant %s", n, err, buf, data)
		}
	}
}

func TestEncodeBatchStrings(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", `""`},
		{"plain ASCII longer than eight", `"plain ASCII longer than eight"`},
		{`q"b\s/`, `"q\"b\\s/"`},
		{"\b\f\n\r\t\x00\x1f\x7f", `"\b\f\n\r\t\u0000\u001f` + "\x7f" + `"`},
		{"<&>", `"<&>"`},
		{"é世😀", `"é世😀"`},
		{"a\u2028b\u2029", `"a\u2028b\u2029"`},
		{"a\xffb\xc3", `"a\ufffdb\ufffd"`},
		{"\xed\xa0\x80", `"\ufffd\ufffd\ufffd"`},
		{"0123456\"89abcdef\\", `"0123456\"89abcdef\\"`},
		{"01234567\x01", `"01234567\u0001"`},
	} {
		if got := appendString(nil, tc.in); string(got) != tc.want {
			t.Errorf("appendString(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

func TestEncodeBatchTimes(t *testing.T) {
	for _, tc := range []struct {
		in   time.Time
		want string // "": refused
	}{
		{time.Date(2026, 11, 20, 9, 30, 0, 0, time.UTC), "2026-11-20T09:30:00Z"},
		{time.Date(2026, 11, 20, 9, 30, 0, 100, time.UTC), "2026-11-20T09:30:00.0000001Z"},
		{time.Date(2026, 11, 20, 9, 30, 0, 120000000, time.FixedZone("", 3600)), "2026-11-20T08:30:00.12Z"},
		{time.Time{}, "0001-01-01T00:00:00Z"},
		{minBatchTime, "0000-01-01T00:00:00Z"},
		{endBatchTime.Add(-1), "9999-12-31T23:59:59.999999999Z"},
		{minBatchTime.Add(-1), ""},
		{endBatchTime, ""},
		{time.Date(-1, 6, 1, 0, 0, 0, 0, time.UTC), ""},
		// In their own zones these are years 0000 and 9999, which
		// json.Marshal writes; in UTC they are not.
		{time.Date(0, 1, 1, 0, 30, 0, 0, time.FixedZone("", 3600)), ""},
		{time.Date(9999, 12, 31, 23, 0, 0, 0, time.FixedZone("", -7200)), ""},
	} {
		b := &Batch{ID: "b", SealedAt: tc.in}
		data, err := EncodeBatch(b)
		if tc.want == "" {
			if err == nil {
				t.Errorf("sealed_at %v: encoded %s", tc.in, data)
			}
		} else if want := `"sealed_at":"` + tc.want + `"`; err != nil || !strings.Contains(string(data), want) {
			t.Errorf("sealed_at %v: %s, %v; want %s", tc.in, data, err, want)
		}

		// As an event time it fails with the index, and AppendBatch
		// leaves the buffer as it was.
		b = &Batch{ID: "b", SealedAt: time.Unix(0, 0), Events: []Event{{ID: "e0"}, {ID: "e1", Time: tc.in}}}
		prefix := []byte("keep")
		got, err := AppendBatch(prefix, b)
		var fe FieldError
		switch {
		case tc.want != "" && err != nil:
			t.Errorf("event time %v: %v", tc.in, err)
		case tc.want == "" && (!errors.As(err, &fe) || fe.Index != 1 || fe.Field != "time" || string(got) != "keep"):
			t.Errorf("event time %v: %q, %v", tc.in, got, err)
		}
	}
	// Times of the same second share the formatting of the date and clock.
	base := time.Date(2026, 11, 20, 9, 30, 0, 0, time.UTC)
	b := &Batch{ID: "b", SealedAt: base, Events: []Event{
		{Time: base.Add(5)}, {Time: base.Add(time.Second - 1)}, {Time: base.Add(time.Second)},
		{Time: base.Add(time.Second).In(time.FixedZone("", -3600))}, {Time: base},
	}}
	data, err := EncodeBatch(b)
	if err != nil {
		t.Fatal(err)
	}
	if want := marshalJSON(t, inUTC(b)); !bytes.Equal(data, want) {
		t.Errorf("got %s\nwant %s", data, want)
	}
}

func TestEncodeBatchNil(t *testing.T) {
	data, err := EncodeBatch(nil)
	if err != nil || string(data) != "null" {
		t.Errorf("EncodeBatch(nil) = %s, %v", data, err)
	}
	data, err = EncodeBatch(&Batch{ID: "b", SealedAt: time.Unix(0, 0)})
	if want := `{"batch_id":"b","collector":"","sealed_at":"1970-01-01T00:00:00Z","events":null}`; err != nil || string(data) != want {
		t.Errorf("got %s, %v; want %s", data, err, want)
	}
}

// The result of EncodeBatch is the caller's: later calls do not touch it.
func TestEncodeBatchOwnsResult(t *testing.T) {
	first, err := EncodeBatch(testBatch())
	if err != nil {
		t.Fatal(err)
	}
	want := string(first)
	for range 10 {
		if _, err := EncodeBatch(benchBatch()); err != nil {
			t.Fatal(err)
		}
	}
	if string(first) != want {
		t.Errorf("result changed to %s", first)
	}
}

// TestAppendEncodedBatch: a batch sealed from events encoded one at a time
// is byte for byte what AppendBatch writes, escapes included.
func TestAppendEncodedBatch(t *testing.T) {
	at := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	events := []Event{
		{ID: "a", Tenant: "acme", Meter: "api_calls", Value: 1, Time: at},
		{ID: "b\u2028", Tenant: "acme", Meter: "api_calls", Value: 2, Time: at.Add(time.Millisecond), Dimensions: map[string]string{"z": "1", "a": "x\u2029<&>\"\\"}},
		{ID: "c", Tenant: "beta", Meter: "tokens", Value: 3, Time: at.Add(2 * time.Second)},
	}
	b := &Batch{ID: "B1", Collector: "col", SealedAt: at.Add(123 * time.Microsecond), Events: events}
	want, err := AppendBatch(nil, b)
	if err != nil {
		t.Fatal(err)
	}
	var enc EventEncoder
	var buf []byte
	for i := range events {
		if i > 0 {
			buf = append(buf, ',')
		}
		if buf, err = enc.Append(buf, &events[i]); err != nil {
			t.Fatal(err)
		}
	}
	got, err := AppendEncodedBatch([]byte("x"), &Batch{ID: b.ID, Collector: b.Collector, SealedAt: b.SealedAt}, buf)
	if err != nil {
		t.Fatal(err)
	}
	if string(got[1:]) != string(want) {
		t.Fatalf("AppendEncodedBatch:\n%s\nAppendBatch:\n%s", got[1:], want)
	}
	if _, err := enc.Append(nil, &Event{ID: "x", Tenant: "t", Meter: "m", Time: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}); err == nil {
		t.Fatal("Append of a time in the year 10000 succeeded")
	}
}
