package schemas

import (
	"errors"
	"reflect"
	"testing"
	"time"
)

// fuzzMediaTypes are the media types FuzzDecodeEvents picks from by its first
// input, modulo their number; the seed corpus relies on this order.
var fuzzMediaTypes = []string{
	MediaJSON,                         // 0
	MediaNDJSON,                       // 1
	MediaJSONLines,                    // 2
	MediaCloudEvent,                   // 3
	MediaCloudEventsBatch,             // 4
	"application/json; charset=utf-8", // 5
	"",                                // 6
	"text/plain",                      // 7
}

func FuzzDecodeEvents(f *testing.F) {
	stamp := time.Date(2026, 11, 20, 12, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, mt byte, body []byte) {
		mediaType := fuzzMediaTypes[int(mt)%len(fuzzMediaTypes)]
		d, err := DecodeEvents(mediaType, body)
		if err != nil {
			var se *SyntaxError
			switch {
			case errors.As(err, &se), errors.Is(err, ErrNoEvents):
			case errors.Is(err, ErrUnsupportedMediaType) && mediaType == "text/plain":
			default:
				t.Fatalf("unexpected error %T %v", err, err)
			}
			return
		}
		if len(d.Events) == 0 {
			t.Fatal("no error and no events")
		}
		bad := make(map[int]bool)
		for _, fe := range d.Errors {
			if fe.Index < 0 || fe.Index >= len(d.Events) || fe.Message == "" {
				t.Fatalf("field error %+v with %d events", fe, len(d.Events))
			}
			bad[fe.Index] = true
		}
		// Every event the collector would accept survives a batch round trip.
		var valid []Event
		for i, e := range d.Events {
			if bad[i] {
				continue
			}
			if e.Tenant == "" {
				e.Tenant = "fuzz-tenant" // from the API key
			}
			if len(e.Validate(i, Window{}, nil)) > 0 {
				continue
			}
			if e.Time.IsZero() {
				e.Time = stamp // the receive time
			}
			if e.Time.Location() != time.UTC {
				t.Fatalf("event %d time %v not in UTC", i, e.Time)
			}
			valid = append(valid, e)
		}
		if len(valid) == 0 {
			return
		}
		in := &Batch{ID: "fuzz-batch", Collector: "fuzz", SealedAt: stamp, Events: valid}
		data, err := EncodeBatch(in)
		if err != nil {
			t.Fatalf("encode %+v: %v", valid, err)
		}
		out, err := DecodeBatch(BatchContentType, data)
		if err != nil {
			t.Fatalf("decode %s: %v", data, err)
		}
		if !reflect.DeepEqual(out, in) {
			t.Fatalf("round trip changed the batch\n got %+v\nwant %+v", out, in)
		}
	})
}
