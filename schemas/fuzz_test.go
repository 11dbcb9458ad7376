package schemas

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
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
	fuzzBinary,                        // 8
}

// fuzzBinary stands for a binary-mode CloudEvent: fuzzBinaryHeader and the
// body as its data.
const fuzzBinary = "binary"

var fuzzBinaryHeader = http.Header{
	"Content-Type": {MediaJSON}, "Ce-Specversion": {"1.0"}, "Ce-Id": {"f%C3%A9-1"},
	"Ce-Source": {"/fuzz"}, "Ce-Type": {"api_calls"}, "Ce-Subject": {"acme"},
}

func FuzzDecodeEvents(f *testing.F) {
	stamp := time.Date(2026, 11, 20, 12, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, mt byte, body []byte) {
		mediaType := fuzzMediaTypes[int(mt)%len(fuzzMediaTypes)]
		h := http.Header{"Content-Type": {mediaType}}
		if mediaType == fuzzBinary {
			h = fuzzBinaryHeader
		}
		d, err := DecodeRequest(h, body)
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
			// Nothing is repaired: what is accepted is valid UTF-8.
			strs := []string{e.ID, e.Tenant, e.Meter}
			for k, v := range e.Dimensions {
				strs = append(strs, k, v)
			}
			for _, s := range strs {
				if !utf8.ValidString(s) {
					t.Fatalf("event %d holds %q, not UTF-8", i, s)
				}
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
		// The collector seals from events encoded one at a time.
		var enc EventEncoder
		var events []byte
		for i := range valid {
			if i > 0 {
				events = append(events, ',')
			}
			if events, err = enc.Append(events, &valid[i]); err != nil {
				t.Fatalf("EventEncoder %+v: %v", valid[i], err)
			}
		}
		sealed, err := AppendEncodedBatch(nil, &Batch{ID: in.ID, Collector: in.Collector, SealedAt: in.SealedAt}, events)
		if err != nil || !bytes.Equal(sealed, data) {
			t.Fatalf("AppendEncodedBatch = %s, %v; EncodeBatch = %s", sealed, err, data)
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

// FuzzDecodeBatch: DecodeBatch does not panic, fails with a "decode batch"
// error, and what it accepts encodes and decodes to the same batch, which
// encoding/json reads alike.
func FuzzDecodeBatch(f *testing.F) {
	for _, b := range []*Batch{testBatch(), {ID: "b", Events: []Event{}}} {
		data, err := EncodeBatch(b)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := DecodeBatch(BatchContentType, data)
		if err != nil {
			if b != nil || !strings.HasPrefix(err.Error(), "decode batch") {
				t.Fatalf("DecodeBatch = %+v, %v", b, err)
			}
			return
		}
		enc, err := EncodeBatch(b)
		if err != nil {
			t.Fatalf("encode %+v: %v", b, err)
		}
		again, err := DecodeBatch(BatchContentType, enc)
		if err != nil {
			t.Fatalf("decode %s: %v", enc, err)
		}
		if !reflect.DeepEqual(again, b) {
			t.Fatalf("round trip changed the batch\n got %+v\nwant %+v", again, b)
		}
		var std Batch
		if err := json.Unmarshal(enc, &std); err != nil {
			t.Fatalf("encoding/json: %v\n%s", err, enc)
		}
		if !reflect.DeepEqual(inUTC(&std), b) {
			t.Fatalf("encoding/json reads %s as\n%+v\nwant %+v", enc, std, b)
		}
	})
}
