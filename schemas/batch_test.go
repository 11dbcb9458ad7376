package schemas

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
	"unsafe"
)

func testBatch() *Batch {
	return &Batch{
		ID:        "01JDA7K3Q9ZP4M8X2BBATCH001",
		Collector: "collector-eu-1",
		SealedAt:  time.Date(2026, 11, 20, 9, 31, 0, 123456789, time.UTC),
		Events: []Event{
			{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 1, Time: time.Date(2026, 11, 20, 9, 30, 0, 0, time.UTC),
				Dimensions: map[string]string{"route": "/v1/orders", "method": "GET", "status": "200", "note": `<&> "q" é`}},
			{ID: "e2", Tenant: "globex", Meter: "tokens", Value: MaxValue, Time: time.Date(2026, 11, 20, 9, 30, 0, 1, time.UTC)},
			{ID: "e3", Tenant: "acme", Meter: "api_calls", Value: 0, Time: time.Date(2026, 10, 31, 23, 59, 59, 999999999, time.UTC)},
		},
	}
}

func TestBatchRoundTrip(t *testing.T) {
	want := testBatch()
	data, err := EncodeBatch(want)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeBatch(BatchContentType, data)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("round trip\n got %+v\nwant %+v", got, want)
	}
	for i, e := range got.Events {
		if e.Time.Location() != time.UTC {
			t.Errorf("event %d time in %v", i, e.Time.Location())
		}
	}
	// The wire names are part of the contract (docs/architecture.md#batch).
	var wire map[string]json.RawMessage
	if err := json.Unmarshal(data, &wire); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"batch_id", "collector", "sealed_at", "events"} {
		if _, ok := wire[k]; !ok {
			t.Errorf("member %q missing from %s", k, data)
		}
	}
	if !strings.Contains(string(data), `"sealed_at":"2026-11-20T09:31:00.123456789Z"`) ||
		!strings.Contains(string(data), `{"id":"e2","tenant":"globex","meter":"tokens","value":4294967295,"time":"2026-11-20T09:30:00.000000001Z"}`) {
		t.Errorf("unexpected encoding %s", data)
	}
}

// Times in another zone come back as the same instant in UTC.
func TestBatchRoundTripNormalisesToUTC(t *testing.T) {
	b := testBatch()
	zone := time.FixedZone("UTC+5:30", 5*3600+1800)
	b.Events[0].Time = b.Events[0].Time.In(zone)
	data, err := EncodeBatch(b)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeBatch(BatchContentType, data)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Events[0].Time.Equal(b.Events[0].Time) {
		t.Fatalf("time %v, want %v", got.Events[0].Time, b.Events[0].Time)
	}
}

func TestDecodeBatchRejects(t *testing.T) {
	good, err := EncodeBatch(testBatch())
	if err != nil {
		t.Fatal(err)
	}
	encode := func(edit func(*Batch)) []byte {
		b := testBatch()
		edit(b)
		data, err := EncodeBatch(b)
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	t.Run("content type", func(t *testing.T) {
		for _, ct := range []string{"", "application/json", "application/vnd.meterd.batch.v2+json", BatchContentType + "; charset=utf-8"} {
			if _, err := DecodeBatch(ct, good); !errors.Is(err, ErrUnknownContentType) {
				t.Errorf("%q: error %v", ct, err)
			}
		}
	})
	t.Run("malformed JSON", func(t *testing.T) {
		var se *SyntaxError
		if _, err := DecodeBatch(BatchContentType, good[:len(good)-1]); err == nil {
			t.Error("truncated batch decoded")
		}
		if _, err := DecodeBatch(BatchContentType, []byte(`{"batch_id":"b1",}`)); !errors.As(err, &se) {
			t.Errorf("error %v", err)
		}
	})
	t.Run("missing batch_id", func(t *testing.T) {
		_, err := DecodeBatch(BatchContentType, encode(func(b *Batch) { b.ID = "" }))
		if err == nil || !strings.Contains(err.Error(), "batch_id") {
			t.Errorf("error %v", err)
		}
	})
	for _, tc := range []struct {
		name  string
		edit  func(*Batch)
		index int
		field string
	}{
		{"invalid meter", func(b *Batch) { b.Events[1].Meter = "Tokens" }, 1, "meter"},
		{"negative value", func(b *Batch) { b.Events[2].Value = -5 }, 2, "value"},
		{"no tenant", func(b *Batch) { b.Events[0].Tenant = "" }, 0, "tenant"},
		{"no time", func(b *Batch) { b.Events[2].Time = time.Time{} }, 2, "time"},
		{"17 dimensions", func(b *Batch) {
			b.Events[1].Dimensions = map[string]string{}
			for i := range 17 {
				b.Events[1].Dimensions[strings.Repeat("k", i+1)] = "v"
			}
		}, 1, "dimensions"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeBatch(BatchContentType, encode(tc.edit))
			var fe FieldError
			if !errors.As(err, &fe) || fe.Index != tc.index || fe.Field != tc.field {
				t.Fatalf("error %v, want a FieldError of event %d field %s", err, tc.index, tc.field)
			}
			if !strings.Contains(err.Error(), testBatch().ID) {
				t.Errorf("error %q does not name the batch", err)
			}
		})
	}
}

// DecodeBatch reads exactly what AppendBatch writes and refuses anything
// else, naming the batch and the event.
func TestDecodeBatchStrict(t *testing.T) {
	const (
		head = `{"batch_id":"b7","collector":"c","sealed_at":"2026-11-20T09:31:00Z","events":[`
		ev0  = `{"id":"e0","tenant":"acme","meter":"api_calls","value":1,"time":"2026-11-20T09:30:00Z"}`
	)
	for _, tc := range []struct {
		name, body string
		want       string // in the error
	}{
		{"unknown batch member", `{"batch_id":"b7","extra":1,"events":[]}`, `decode batch b7: extra: is not a known field`},
		{"member name in another case", `{"Batch_ID":"b7","events":[]}`, `Batch_ID: is not a known field`},
		{"batch_id not a string", `{"batch_id":7,"events":[]}`, `batch_id: must be a string`},
		{"batch_id null", `{"batch_id":null,"events":[]}`, `batch_id: must be a string`},
		{"collector not a string", `{"collector":false,"batch_id":"b7"}`, `decode batch b7: collector: must be a string`},
		{"sealed_at not RFC 3339", `{"batch_id":"b7","sealed_at":"2026-11-20 09:31:00Z"}`, `decode batch b7: sealed_at: must be an RFC 3339`},
		{"sealed_at null", `{"batch_id":"b7","sealed_at":null}`, `sealed_at: must be a string`},
		{"sealed_at before year 0 in UTC", `{"batch_id":"b7","sealed_at":"0000-01-01T00:00:00+00:01"}`, `sealed_at: must be an RFC 3339 timestamp in the years 0000 to 9999`},
		{"events not an array", `{"batch_id":"b7","events":{}}`, `decode batch b7: events: must be an array`},
		{"event not an object", head + ev0 + `,null]}`, `decode batch b7: event 1: : must be a JSON object`},
		{"unknown event member", head + ev0 + `,{"id":"e1","tenant":"acme","meter":"m","time":"2026-11-20T09:30:00Z","unit":"s"}]}`, `decode batch b7: event 1: unit: is not a known field`},
		{"event id not a string", head + `{"id":1}]}`, `event 0: id: must be a string`},
		{"dimensions null", head + `{"id":"e0","dimensions":null}]}`, `event 0: dimensions: must be an object`},
		{"dimension not a string", head + `{"id":"e0","dimensions":{"a":1}}]}`, `event 0: dimensions.a: must be a string`},
		// Only a foreign writer produces these: collectors refuse such strings
		// at ingest. The aggregator dead-letters the batch with this reason.
		{"event id not UTF-8", head + ev0 + ",{\"id\":\"u\xff\",\"tenant\":\"acme\",\"meter\":\"m\",\"time\":\"2026-11-20T09:30:00Z\"}]}", `decode batch b7: event 1: id: must be valid UTF-8`},
		{"event id lone surrogate", head + `{"id":"u\ud800","tenant":"acme","meter":"m","time":"2026-11-20T09:30:00Z"}]}`, `decode batch b7: event 0: id: must be valid UTF-8`},
		{"dimension value not UTF-8", head + "{\"id\":\"e0\",\"dimensions\":{\"a\":\"\xc3\"}}]}", `event 0: dimensions.a: must be valid UTF-8`},
		{"batch_id not UTF-8", "{\"batch_id\":\"b\xff\",\"events\":[]}", `batch_id: must be valid UTF-8`},
		{"value fractional", head + ev0 + `,{"id":"e1","value":1.5}]}`, `event 1: value: must be a non-negative integer`},
		{"value too large", head + `{"id":"e0","value":9223372036854775808}]}`, `event 0: value: must be a non-negative integer`},
		{"value a string", head + `{"id":"e0","value":"1"}]}`, `event 0: value: must be a non-negative integer`},
		{"time not RFC 3339", head + `{"id":"e0","time":"2026-11-20T09:30:00"}]}`, `event 0: time: must be an RFC 3339 timestamp`},
		{"time missing", head + `{"id":"e0","tenant":"acme","meter":"m","value":1}]}`, `event 0: time: is required in a batch`},
		{"time outside years in UTC", head + `{"id":"e0","tenant":"acme","meter":"m","value":1,"time":"9999-12-31T23:59:59-00:01"}]}`, `event 0: time: must lie in the years 0000 to 9999 in UTC`},
		{"batch_id missing", `{"events":[` + ev0 + `]}`, `decode batch: batch_id is missing`},
		{"batch_id empty", `{"batch_id":"","events":[]}`, `decode batch: batch_id is missing`},
		{"not an object", `[]`, `decode batch: schemas: malformed body: expected a JSON object`},
		{"null", `null`, `malformed body`},
		{"trailing data", head + `]}{}`, `malformed body: unexpected data after the JSON value`},
		{"trailing comma", head + ev0 + `,]}`, `malformed body: invalid character ']' looking for beginning of value`},
		{"empty", ``, `malformed body`},
		// The first problem is reported: a malformed body before all.
		{"malformed over unknown member", `{"batch_id":"b7","x":1,"events":[}`, `malformed body`},
		{"first shape problem", head + `{"id":"e0","x":1},{"id":1}],"y":2}`, `event 0: x: is not a known field`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := DecodeBatch(BatchContentType, []byte(tc.body))
			if err == nil || b != nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("DecodeBatch(%s) = %+v, %v; want an error with %q", tc.body, b, err, tc.want)
			}
		})
	}
}

// What encoding/json accepted of the form AppendBatch writes is still read.
func TestDecodeBatchAccepts(t *testing.T) {
	sealed := time.Date(2026, 11, 20, 9, 31, 0, 0, time.UTC)
	for _, tc := range []struct {
		name, body string
		want       *Batch
	}{
		{"events null", `{"batch_id":"b","collector":"c","sealed_at":"2026-11-20T09:31:00Z","events":null}`,
			&Batch{ID: "b", Collector: "c", SealedAt: sealed}},
		{"events empty", `{"events":[],"sealed_at":"2026-11-20T10:31:00+01:00","batch_id":"b"}`,
			&Batch{ID: "b", SealedAt: sealed, Events: []Event{}}},
		{"whitespace, escapes, last member wins", " {\n\t\"b\\u0061tch_id\" : \"x\", \"batch_id\":\"b\\u00e9\\ud83d\\ude00\\n\",\r\n\"events\" : [ {\"id\":\"e\\\"1\",\"tenant\":\"acme\",\"meter\":\"m\",\"value\":2e0,\"time\":\"2026-11-20t09:30:00.5z\",\"dimensions\":{\"k\":\"v\",\"k\":\"w\\u2028\"}} ] } ",
			&Batch{ID: "bé😀\n", Events: []Event{{ID: `e"1`, Tenant: "acme", Meter: "m", Value: 2, Time: time.Date(2026, 11, 20, 9, 30, 0, 5e8, time.UTC), Dimensions: map[string]string{"k": "w\u2028"}}}}},
		{"empty dimensions", `{"batch_id":"b","events":[{"id":"e","tenant":"t","meter":"m","time":"2026-11-20T09:30:00Z","dimensions":{}}]}`,
			&Batch{ID: "b", Events: []Event{{ID: "e", Tenant: "t", Meter: "m", Time: sealed.Add(-time.Minute)}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DecodeBatch(BatchContentType, []byte(tc.body))
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, %v\nwant %+v", got, err, tc.want)
			}
		})
	}
}

// No string of a decoded batch aliases the message, which NATS may reuse;
// short repeated ones are shared.
func TestDecodeBatchStrings(t *testing.T) {
	data, err := EncodeBatch(testBatch())
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeBatch(BatchContentType, data)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := got.Events[0], got.Events[2]; unsafe.StringData(a.Tenant) != unsafe.StringData(b.Tenant) || unsafe.StringData(a.Meter) != unsafe.StringData(b.Meter) {
		t.Errorf("tenant and meter are not shared")
	}
	for i := range data {
		data[i] = 'X'
	}
	if want := testBatch(); !reflect.DeepEqual(got, want) {
		t.Errorf("batch changed with the message:\n got %+v\nwant %+v", got, want)
	}
}

// A batch is read whole, however many of its events fail to decode: the
// bound of DecodeEvents is for request bodies, and a batch with a bad
// event is refused for its first one, as before, not for a syntax error.
func TestDecodeBatchReadWhole(t *testing.T) {
	body := `{"batch_id":"b1","events":[` + strings.TrimSuffix(strings.Repeat(`{"id":"a","tenant":"acme","meter":"m","x":1},`, MaxFieldErrors+5), ",") + `]}`
	_, err := DecodeBatch(BatchContentType, []byte(body))
	var fe FieldError
	if !errors.As(err, &fe) || fe.Index != 0 || fe.Field != "x" {
		t.Fatalf("DecodeBatch = %v, want the first event's unknown member x", err)
	}
}
