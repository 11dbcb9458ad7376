package schemas

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func testBatch() *Batch {
	return &Batch{
		ID:        "01JDA7K3Q9ZP4M8X2BBATCH001",
		Collector: "collector-eu-1",
		SealedAt:  time.Date(2026, 11, 20, 9, 31, 0, 123456789, time.UTC),
		Events: []Event{
			{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 1, Time: time.Date(2026, 11, 20, 9, 30, 0, 0, time.UTC),
				Dimensions: map[string]string{"route": "/v1/orders", "method": "GET", "status": "200", "note": `<&> "q" é`}},
			{ID: "e2", Tenant: "globex", Meter: "tokens", Value: 1<<63 - 1, Time: time.Date(2026, 11, 20, 9, 30, 0, 1, time.UTC)},
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
	// The wire names are part of the contract (DESIGN §3.1).
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
		!strings.Contains(string(data), `{"id":"e2","tenant":"globex","meter":"tokens","value":9223372036854775807,"time":"2026-11-20T09:30:00.000000001Z"}`) {
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
		var se *json.SyntaxError
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
