package schemas

import (
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
	"unsafe"
)

func utc(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		panic(err)
	}
	return t.UTC()
}

// sameEvents compares events field by field, times with Equal and in UTC.
func sameEvents(t *testing.T, got, want []Event) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d events, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		g, w := got[i], want[i]
		if !g.Time.Equal(w.Time) || g.Time.Location() != time.UTC {
			t.Errorf("event %d: time %v, want %v in UTC", i, g.Time, w.Time)
		}
		g.Time, w.Time = time.Time{}, time.Time{}
		if !reflect.DeepEqual(g, w) {
			t.Errorf("event %d:\n got %+v\nwant %+v", i, g, w)
		}
	}
}

func TestDecodeEvents(t *testing.T) {
	const full = `{"id":"e1","tenant":"acme","meter":"api_calls","value":3,"time":"2026-11-20T09:30:00.5+01:00","dimensions":{"route":"/v1/orders","method":"GET"}}`
	fullEvent := Event{ID: "e1", Tenant: "acme", Meter: "api_calls", Value: 3, Time: utc("2026-11-20T08:30:00.5Z"),
		Dimensions: map[string]string{"route": "/v1/orders", "method": "GET"}}
	minimal := func(id string) Event { return Event{ID: id, Meter: "api_calls", Value: 1} }
	ce := func(members string) string {
		return `{"specversion":"1.0","id":"ce-1","source":"/gw/eu-1","type":"api_calls","subject":"acme"` + members + `}`
	}
	ceEvent := Event{ID: "ce:8:/gw/eu-1:ce-1", Tenant: "acme", Meter: "api_calls", Value: 1}
	withValue := func(e Event, v int64) Event { e.Value = v; return e }

	cases := []struct {
		name      string
		mediaType string
		body      string
		want      []Event
		errs      []FieldError
	}{
		{"object", MediaJSON, full, []Event{fullEvent}, nil},
		{"object without value gets 1", MediaJSON, `{"id":"a","meter":"api_calls"}`, []Event{minimal("a")}, nil},
		{"object with surrounding whitespace", MediaJSON, " \r\n\t" + full + "\n\n", []Event{fullEvent}, nil},
		{"array", MediaJSON, `[` + full + `, {"id":"b","meter":"api_calls","value":0}]`,
			[]Event{fullEvent, withValue(minimal("b"), 0)}, nil},
		{"empty dimensions are nil", MediaJSON, `{"id":"a","meter":"api_calls","dimensions":{}}`, []Event{minimal("a")}, nil},
		{"escapes and unicode", MediaJSON, `{"id":"\u00e9v\u00e8nement \ud83d\ude00 \"q\" \\ \/","meter":"api_calls","dimensions":{"route":"/caf\u00e9","r\u00e9gion":"x"}}`,
			[]Event{{ID: `évènement 😀 "q" \ /`, Meter: "api_calls", Value: 1, Dimensions: map[string]string{"route": "/café", "région": "x"}}}, nil},
		{"U+FFFD itself is valid", MediaJSON, "{\"id\":\"a\xef\xbf\xbdb\\ufffd\",\"meter\":\"api_calls\"}",
			[]Event{{ID: "a\uFFFDb\uFFFD", Meter: "api_calls", Value: 1}}, nil},
		{"duplicate members keep the last", MediaJSON, `{"id":"a","meter":"x","meter":"api_calls","dimensions":{"a":"1"},"dimensions":{"b":"2","b":"3"}}`,
			[]Event{{ID: "a", Meter: "api_calls", Value: 1, Dimensions: map[string]string{"b": "3"}}}, nil},
		{"ndjson with blank lines and CRLF", MediaNDJSON, "\r\n{\"id\":\"a\",\"meter\":\"api_calls\"}\r\n\r\n" + full + "\r\n\n{\"id\":\"c\",\"meter\":\"api_calls\",\"value\":7}",
			[]Event{minimal("a"), fullEvent, withValue(minimal("c"), 7)}, nil},
		{"ndjson objects without separator", MediaNDJSON, `{"id":"a","meter":"api_calls"}{"id":"b","meter":"api_calls"}`,
			[]Event{minimal("a"), minimal("b")}, nil},
		{"jsonl", MediaJSONLines, "{\"id\":\"a\",\"meter\":\"api_calls\"}\n" + full + "\n",
			[]Event{minimal("a"), fullEvent}, nil},
		{"media type parameters", "application/json; charset=utf-8", full, []Event{fullEvent}, nil},
		{"media type case and spaces", " Application/JSON ;charset=UTF-8", full, []Event{fullEvent}, nil},
		{"ndjson media type parameters", "application/x-ndjson; charset=utf-8", full + "\n" + full, []Event{fullEvent, fullEvent}, nil},
		{"no media type reads JSON", "", full, []Event{fullEvent}, nil},

		{"cloudevent", MediaCloudEvent,
			`{"specversion":"1.0","id":"ce-1","source":"/gw/eu-1","type":"tokens","subject":"acme","time":"2026-11-20T09:30:00Z","datacontenttype":"application/json",` +
				`"data":{"value":1200,"model":"big","status":200,"cached":true,"hit":false,"ratio":0.25,"delta":-3,"big":1e3}}`,
			[]Event{{ID: "ce:8:/gw/eu-1:ce-1", Tenant: "acme", Meter: "tokens", Value: 1200, Time: utc("2026-11-20T09:30:00Z"),
				Dimensions: map[string]string{"model": "big", "status": "200", "cached": "true", "hit": "false", "ratio": "0.25", "delta": "-3", "big": "1e3"}}}, nil},
		{"cloudevent without data counts 1", MediaCloudEvent, ce(``), []Event{ceEvent}, nil},
		{"cloudevent data null", MediaCloudEvent, ce(`,"data":null`), []Event{ceEvent}, nil},
		{"cloudevent data value only", MediaCloudEvent, ce(`,"data":{"value":2.0e1}`), []Event{withValue(ceEvent, 20)}, nil},
		{"cloudevent extension attributes ignored", MediaCloudEvent, ce(`,"traceparent":"00-4bf9-00f0-01","myext":{"a":[1,{"b":null}]},"dataschema":"https://x"`), []Event{ceEvent}, nil},
		{"cloudevent null attribute is absent", MediaCloudEvent, `{"specversion":"1.0","id":"ce-1","source":"/gw/eu-1","type":"api_calls","subject":null,"time":null}`,
			[]Event{{ID: "ce:8:/gw/eu-1:ce-1", Meter: "api_calls", Value: 1}}, nil},
		{"cloudevent datacontenttype with parameters", MediaCloudEvent, ce(`,"datacontenttype":"application/json; charset=utf-8"`), []Event{ceEvent}, nil},
		{"cloudevents batch", MediaCloudEventsBatch, `[` + ce(`,"data":{"value":5,"route":"/a"}`) + `,` +
			`{"specversion":"1.0","id":"ce-2","source":"/gw","type":"tokens","subject":"globex","time":"2026-11-20T10:00:00-02:00"}]`,
			[]Event{{ID: "ce:8:/gw/eu-1:ce-1", Tenant: "acme", Meter: "api_calls", Value: 5, Dimensions: map[string]string{"route": "/a"}},
				{ID: "ce:3:/gw:ce-2", Tenant: "globex", Meter: "tokens", Value: 1, Time: utc("2026-11-20T12:00:00Z")}}, nil},
		{"cloudevent checks", MediaCloudEvent,
			`{"specversion":"0.3","id":"ce-1","type":"api_calls","subject":"","time":"yesterday","datacontenttype":"text/plain","data":{"value":"x","route":null,"tags":["a"],"ok":"y"}}`,
			[]Event{{ID: "ce:0::ce-1", Meter: "api_calls", Dimensions: map[string]string{"ok": "y"}}},
			[]FieldError{
				{0, "specversion", `must be "1.0"`},
				{0, "source", "is required"},
				{0, "datacontenttype", "must be application/json"},
				{0, "subject", "must not be empty; leave it out to use the API key's tenant"},
				{0, "time", "must be an RFC 3339 timestamp"},
				{0, "data.value", "must be a non-negative integer"},
				{0, "data.route", "must be a string, number or boolean"},
				{0, "data.tags", "must be a string, number or boolean"},
			}},
		{"cloudevent data not an object", MediaCloudEvent, ce(`,"data":"hello"`), []Event{ceEvent},
			[]FieldError{{0, "data", "must be an object"}}},
		// data_base64 carries data as bytes (CloudEvents JSON format §3.1);
		// the Go SDK sends JSON data given to it as []byte this way. Its
		// {"value":5,"route":"/a"} is read as data (once ignored: billed 1).
		{"cloudevent data_base64", MediaCloudEvent, ce(`,"datacontenttype":"application/json","data_base64":"eyJ2YWx1ZSI6NSwicm91dGUiOiIvYSJ9"`),
			[]Event{{ID: "ce:8:/gw/eu-1:ce-1", Tenant: "acme", Meter: "api_calls", Value: 5, Dimensions: map[string]string{"route": "/a"}}}, nil},
		{"cloudevent data_base64 null", MediaCloudEvent, ce(`,"data_base64":null`), []Event{ceEvent}, nil},
		{"cloudevent data_base64 not base64", MediaCloudEvent, ce(`,"data_base64":"eyJ2YWx1ZSI6NX0"`), []Event{ceEvent},
			[]FieldError{{0, "data_base64", "must be base64 (RFC 4648)"}}},
		{"cloudevent data_base64 not an object", MediaCloudEvent, ce(`,"data_base64":"WzVd"`), []Event{ceEvent}, // [5]
			[]FieldError{{0, "data_base64", "must hold a JSON object, base64-encoded"}}},
		{"cloudevent data_base64 not JSON", MediaCloudEvent, ce(`,"datacontenttype":"image/png","data_base64":"iVBORw=="`), []Event{ceEvent},
			[]FieldError{{0, "datacontenttype", "must be application/json"}, {0, "data_base64", "must hold a JSON object, base64-encoded"}}},
		{"cloudevent data and data_base64", MediaCloudEvent, ce(`,"data":{"value":5},"data_base64":"eyJ2YWx1ZSI6NX0="`), []Event{{ID: "ce:8:/gw/eu-1:ce-1", Tenant: "acme", Meter: "api_calls", Value: 5}},
			[]FieldError{{0, "data_base64", "must not be given with data"}}},
		{"cloudevent data_base64 not a string", MediaCloudEvent, ce(`,"data_base64":5`), []Event{ceEvent},
			[]FieldError{{0, "data_base64", "must be a string"}}},
		{"cloudevent attribute not a string", MediaCloudEvent, `{"specversion":"1.0","id":42,"source":"/gw","type":"api_calls"}`, []Event{{Meter: "api_calls", Value: 1}},
			[]FieldError{{0, "id", "must be a string"}}},
		{"cloudevent number dimension over 256 bytes", MediaCloudEvent, ce(`,"data":{"n":1` + strings.Repeat("0", 256) + `}`), []Event{ceEvent},
			[]FieldError{{0, "data.n", "must be a string, number or boolean"}}},

		{"wrong type of id", MediaJSON, `{"id":5,"meter":"api_calls"}`, []Event{minimal("")}, []FieldError{{0, "id", "must be a string"}}},
		{"null tenant", MediaJSON, `{"id":"a","tenant":null,"meter":"api_calls"}`, []Event{minimal("a")}, []FieldError{{0, "tenant", "must be a string"}}},
		{"wrong type of meter", MediaJSON, `{"id":"a","meter":["api_calls"]}`, []Event{{ID: "a", Value: 1}}, []FieldError{{0, "meter", "must be a string"}}},
		{"wrong type of time", MediaJSON, `{"id":"a","meter":"m","time":1732095000}`, []Event{{ID: "a", Meter: "m", Value: 1}}, []FieldError{{0, "time", "must be a string"}}},
		{"wrong type of dimensions", MediaJSON, `{"id":"a","meter":"m","dimensions":["a"]}`, []Event{{ID: "a", Meter: "m", Value: 1}}, []FieldError{{0, "dimensions", "must be an object"}}},
		{"wrong type of a dimension", MediaJSON, `{"id":"a","meter":"m","dimensions":{"status":200,"route":"/a"}}`, []Event{{ID: "a", Meter: "m", Value: 1, Dimensions: map[string]string{"route": "/a"}}}, []FieldError{{0, "dimensions.status", "must be a string"}}},
		{"unknown field", MediaJSON, `{"id":"a","meter":"m","region":"eu"}`, []Event{{ID: "a", Meter: "m", Value: 1}}, []FieldError{{0, "region", "is not a known field"}}},
		{"field name in another case", MediaJSON, `{"id":"a","Meter":"m"}`, []Event{{ID: "a", Value: 1}}, []FieldError{{0, "Meter", "is not a known field"}, {0, "meter", "is required"}}},
		{"every known member that failed, the first unknown one", MediaJSON, `{"id":1,"extra":2,"meter":3,"more":4,"id":5,"dimensions":{"a":1}}`, []Event{{Value: 1}},
			[]FieldError{{0, "id", "must be a string"}, {0, "extra", "is not a known field"}, {0, "meter", "must be a string"}}},
		{"value string", MediaJSON, `{"id":"a","meter":"api_calls","value":"5"}`, []Event{withValue(minimal("a"), 0)}, []FieldError{{0, "value", "must be a non-negative integer"}}},
		{"value fraction", MediaJSON, `{"id":"a","meter":"api_calls","value":1.5}`, []Event{withValue(minimal("a"), 0)}, []FieldError{{0, "value", "must be a non-negative integer"}}},
		{"bad time", MediaJSON, `{"id":"a","meter":"api_calls","time":"2026-11-20T09:30:00"}`, []Event{minimal("a")}, []FieldError{{0, "time", "must be an RFC 3339 timestamp"}}},
		{"empty tenant", MediaJSON, `{"id":"a","tenant":"","meter":"api_calls"}`, []Event{minimal("a")},
			[]FieldError{{0, "tenant", "must not be empty; leave it out to use the API key's tenant"}}},

		{"id with an invalid byte", MediaJSON, "{\"id\":\"u\xff\",\"meter\":\"api_calls\"}", []Event{minimal("")},
			[]FieldError{{0, "id", notUTF8}}},
		{"id with a truncated sequence", MediaJSON, "{\"id\":\"u\xe2\x82\",\"meter\":\"api_calls\"}", []Event{minimal("")},
			[]FieldError{{0, "id", notUTF8}}},
		{"id with an encoded surrogate", MediaJSON, "{\"id\":\"u\xed\xa0\x80\",\"meter\":\"api_calls\"}", []Event{minimal("")},
			[]FieldError{{0, "id", notUTF8}}},
		{"id lone high surrogate escape", MediaJSON, `{"id":"u\ud800","meter":"api_calls"}`, []Event{minimal("")},
			[]FieldError{{0, "id", notUTF8}}},
		{"id lone low surrogate escape", MediaJSON, `{"id":"\udc00u","meter":"api_calls"}`, []Event{minimal("")},
			[]FieldError{{0, "id", notUTF8}}},
		{"id high surrogate before another escape", MediaJSON, `{"id":"\ud83d\u0041","meter":"api_calls"}`, []Event{minimal("")},
			[]FieldError{{0, "id", notUTF8}}},
		{"id two high surrogates", MediaJSON, `{"id":"\ud83d\ud83d\ude00","meter":"api_calls"}`, []Event{minimal("")},
			[]FieldError{{0, "id", notUTF8}}},
		{"tenant, meter and dimension not UTF-8", MediaJSON, "{\"id\":\"a\",\"tenant\":\"acme\xc0\",\"meter\":\"api\\udfff\",\"dimensions\":{\"route\":\"/a\xfe\",\"ok\":\"y\"}}",
			[]Event{{ID: "a", Value: 1, Dimensions: map[string]string{"ok": "y"}}},
			[]FieldError{{0, "tenant", notUTF8}, {0, "meter", notUTF8}, {0, "dimensions.route", notUTF8}}},
		{"dimension key not UTF-8", MediaJSON, "{\"id\":\"a\",\"meter\":\"api_calls\",\"dimensions\":{\"r\xff\":\"x\"}}", []Event{minimal("a")},
			[]FieldError{{0, "dimensions.r\uFFFD", "key " + notUTF8}}},
		{"dimension key lone surrogate", MediaJSON, `{"id":"a","meter":"api_calls","dimensions":{"r\ud800":"x"}}`, []Event{minimal("a")},
			[]FieldError{{0, "dimensions.r\uFFFD", "key " + notUTF8}}},
		{"unknown member name not UTF-8", MediaJSON, "{\"id\":\"a\",\"meter\":\"api_calls\",\"x\xff\":1}", []Event{minimal("a")},
			[]FieldError{{0, "x\uFFFD", "is not a known field"}}},
		{"cloudevent attributes and data not UTF-8", MediaCloudEvent,
			"{\"specversion\":\"1.0\",\"id\":\"c\xff\",\"source\":\"gw\\ud800\",\"type\":\"api_calls\",\"subject\":\"ac\xffme\",\"data\":{\"k\xff\":\"v\",\"route\":\"/\\udc00\",\"ok\":\"y\"}}",
			[]Event{{Meter: "api_calls", Value: 1, Dimensions: map[string]string{"ok": "y"}}},
			[]FieldError{{0, "id", notUTF8}, {0, "source", notUTF8}, {0, "subject", notUTF8},
				{0, "data.k\uFFFD", "key " + notUTF8}, {0, "data.route", notUTF8}}},

		{"array goes on after a bad element", MediaJSON, `[{"id":"a","meter":"api_calls"},{"id":"b","meter":"api_calls","value":{"n":[1,2]}},{"id":"c","meter":"api_calls","value":2}]`,
			[]Event{minimal("a"), withValue(minimal("b"), 0), withValue(minimal("c"), 2)},
			[]FieldError{{1, "value", "must be a non-negative integer"}}},
		{"array goes on after a shape error", MediaJSON, `[{"id":"a","meter":"api_calls"},{"id":"b","meter":"api_calls","junk":{"x":[1,{"y":2}]},"id":7},{"id":"c","meter":"api_calls"}]`,
			[]Event{minimal("a"), minimal(""), minimal("c")},
			[]FieldError{{1, "junk", "is not a known field"}, {1, "id", "must be a string"}}},
		{"array element not an object", MediaJSON, `[{"id":"a","meter":"api_calls"},"b",{"id":"c","meter":"api_calls"},[1]]`,
			[]Event{minimal("a"), {}, minimal("c"), {}},
			[]FieldError{{1, "", "must be a JSON object"}, {3, "", "must be a JSON object"}}},
		{"ndjson goes on after a shape error", MediaNDJSON, "{\"id\":\"a\",\"meter\":\"api_calls\"}\n{\"id\":\"b\",\"dimensions\":{\"k\":true}}\n{\"id\":\"c\",\"meter\":\"api_calls\"}\n",
			[]Event{minimal("a"), {ID: "b", Value: 1}, minimal("c")},
			[]FieldError{{1, "dimensions.k", "must be a string"}, {1, "meter", "is required"}}},
		{"ndjson line not an object", MediaNDJSON, "{\"id\":\"a\",\"meter\":\"api_calls\"}\n42\n",
			[]Event{minimal("a"), {}},
			[]FieldError{{1, "", "must be a JSON object"}}},
		{"cloudevents batch goes on after a shape error", MediaCloudEventsBatch, `[` + ce(`,"data":7`) + `,` + ce(``) + `]`,
			[]Event{ceEvent, ceEvent},
			[]FieldError{{0, "data", "must be an object"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, err := DecodeEvents(tc.mediaType, []byte(tc.body))
			if err != nil {
				t.Fatalf("error %v", err)
			}
			sameEvents(t, d.Events, tc.want)
			if !reflect.DeepEqual(d.Errors, tc.errs) {
				t.Errorf("errors\n got %v\nwant %v", d.Errors, tc.errs)
			}
		})
	}
}

func TestDecodeEventsErrors(t *testing.T) {
	syntax := errors.New("want a *SyntaxError")
	cases := []struct {
		name      string
		mediaType string
		body      string
		want      error // ErrNoEvents, ErrUnsupportedMediaType or syntax
	}{
		{"text/plain", "text/plain", `{"id":"a","meter":"m"}`, ErrUnsupportedMediaType},
		{"xml", "application/xml", `<event/>`, ErrUnsupportedMediaType},
		{"cloudevents without +json", "application/cloudevents", `{}`, ErrUnsupportedMediaType},
		{"form", "application/x-www-form-urlencoded", `id=a`, ErrUnsupportedMediaType},

		{"empty body", MediaJSON, ``, ErrNoEvents},
		{"blank body", MediaJSON, " \r\n\t ", ErrNoEvents},
		{"empty array", MediaJSON, `[]`, ErrNoEvents},
		{"empty array with spaces", MediaJSON, " [ \n ] ", ErrNoEvents},
		{"empty ndjson", MediaNDJSON, "\n\r\n\n", ErrNoEvents},
		{"empty jsonl", MediaJSONLines, ``, ErrNoEvents},
		{"empty cloudevent", MediaCloudEvent, ``, ErrNoEvents},
		{"empty cloudevents batch", MediaCloudEventsBatch, `[]`, ErrNoEvents},

		{"truncated object", MediaJSON, `{"id":"a","meter":`, syntax},
		{"truncated string", MediaJSON, `{"id":"a`, syntax},
		{"truncated array", MediaJSON, `[{"id":"a","meter":"m"}`, syntax},
		{"open bracket only", MediaJSON, `[`, syntax},
		{"trailing garbage", MediaJSON, `{"id":"a","meter":"m"} x`, syntax},
		{"two objects", MediaJSON, `{"id":"a","meter":"m"}{"id":"b","meter":"m"}`, syntax},
		{"data after array", MediaJSON, `[{"id":"a","meter":"m"}] []`, syntax},
		{"trailing comma in array", MediaJSON, `[{"id":"a","meter":"m"},]`, syntax},
		{"trailing comma in object", MediaJSON, `{"id":"a","meter":"m",}`, syntax},
		{"missing comma", MediaJSON, `[{"id":"a"} {"id":"b"}]`, syntax},
		{"single quotes", MediaJSON, `{'id':'a'}`, syntax},
		{"bare number", MediaJSON, `5`, syntax},
		{"bare string", MediaJSON, `"a"`, syntax},
		{"NUL before the object", MediaJSON, "\x00{}", syntax},
		{"control character in string", MediaJSON, "{\"id\":\"a\x01\",\"meter\":\"m\"}", syntax},
		{"bad escape", MediaJSON, `{"id":"\q","meter":"m"}`, syntax},
		{"short unicode escape", MediaJSON, `{"id":"\u12","meter":"m"}`, syntax},
		{"leading zero", MediaJSON, `{"id":"a","meter":"m","value":01}`, syntax},
		{"dot without digits", MediaJSON, `{"id":"a","meter":"m","value":1.}`, syntax},
		{"lone minus", MediaJSON, `{"id":"a","meter":"m","value":-}`, syntax},
		{"plus sign", MediaJSON, `{"id":"a","meter":"m","value":+1}`, syntax},
		{"leading dot", MediaJSON, `{"id":"a","meter":"m","value":.5}`, syntax},
		{"exponent without digits", MediaJSON, `{"id":"a","meter":"m","value":1e}`, syntax},
		{"bad literal", MediaJSON, `{"id":"a","meter":"m","value":tru}`, syntax},
		{"NaN", MediaJSON, `{"id":"a","meter":"m","value":NaN}`, syntax},
		{"malformed unknown member", MediaJSON, `{"id":"a","meter":"m","x":[1,}`, syntax},
		{"malformed after a shape error", MediaJSON, `[{"id":5},{"id":]`, syntax},
		{"nesting too deep", MediaJSON, `{"x":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `}`, syntax},
		{"ndjson truncated last line", MediaNDJSON, "{\"id\":\"a\",\"meter\":\"m\"}\n{\"id\":", syntax},
		{"ndjson garbage line", MediaNDJSON, "{\"id\":\"a\",\"meter\":\"m\"}\nnot json\n", syntax},
		{"cloudevent given an array", MediaCloudEvent, `[{"specversion":"1.0"}]`, syntax},
		{"cloudevents batch given an object", MediaCloudEventsBatch, `{"specversion":"1.0"}`, syntax},
		{"cloudevent malformed data", MediaCloudEvent, `{"specversion":"1.0","data":{"value":}}`, syntax},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeEvents(tc.mediaType, []byte(tc.body))
			if tc.want == syntax {
				var se *SyntaxError
				if !errors.As(err, &se) || se.Msg == "" {
					t.Fatalf("error %v (%T), want a *SyntaxError", err, err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
		})
	}
}

func TestDecodeEventsSyntaxErrorSaysWhere(t *testing.T) {
	_, err := DecodeEvents(MediaJSON, []byte(`{"id":"a","meter":"m","value":tru}`))
	var se *SyntaxError
	if !errors.As(err, &se) || se.Msg != `invalid character '}' in literal true at byte 33` {
		t.Fatalf("error %v", err)
	}
	_, err = DecodeEvents(MediaJSON, []byte(`{"id":"a","meter":`))
	if !errors.As(err, &se) || se.Msg != "unexpected end of body" {
		t.Fatalf("error %v", err)
	}
}

func TestParseTime(t *testing.T) {
	cases := []struct {
		in   string
		want string // RFC 3339 in UTC; "" = refused
	}{
		{"2026-11-20T09:30:00Z", "2026-11-20T09:30:00Z"},
		{"2026-11-20t09:30:00z", "2026-11-20T09:30:00Z"},
		{"2026-11-20T09:30:00.5Z", "2026-11-20T09:30:00.5Z"},
		{"2026-11-20T09:30:00.000000001Z", "2026-11-20T09:30:00.000000001Z"},
		{"2026-11-20T09:30:00.1234567899Z", "2026-11-20T09:30:00.123456789Z"}, // truncated, as time.Parse does
		{"2026-11-20T09:30:00+05:30", "2026-11-20T04:00:00Z"},
		{"2026-11-20T23:30:00-01:00", "2026-11-21T00:30:00Z"},
		{"2026-11-20T09:30:00-00:00", "2026-11-20T09:30:00Z"},
		{"2028-02-29T00:00:00Z", "2028-02-29T00:00:00Z"},
		{"2000-02-29T00:00:00Z", "2000-02-29T00:00:00Z"},
		{"0000-01-01T00:00:00Z", "0000-01-01T00:00:00Z"},
		{"9999-12-31T23:59:59Z", "9999-12-31T23:59:59Z"},
		{"1900-02-29T00:00:00Z", ""},
		{"2026-04-31T00:00:00Z", ""},
		{"2026-00-10T00:00:00Z", ""},
		{"2026-11-00T00:00:00Z", ""},
		{"2026-11-20T23:60:00Z", ""},
		{"2026-11-20T23:59:60Z", ""},
		{"2026-11-20T09:30:00+23:60", ""},
		{"2026-11-20T09:30:00+1:00", ""},
		{"2026-11-20T09:30:00+01:00:00", ""},
		{"2026-11-20T09:30:00ZZ", ""},
		{"2026-11-20T09:30:00.5", ""},
		{"2026-11-20T09:30:00.Z", ""},
		{"2026-11-20T09:30Z", ""},
		{"+2026-11-20T09:30:00Z", ""},
		{"2026-11-2OT09:30:00Z", ""},
		{"2026/11/20T09:30:00Z", ""},
		{"", ""},
	}
	var last lastSecond // the second of the case before, then of the case itself
	for _, tc := range cases {
		for _, c := range []*lastSecond{nil, &last, &last} {
			got, ok := parseTime(tc.in, c)
			switch {
			case tc.want == "" && ok:
				t.Errorf("parseTime(%q) = %v, want refused", tc.in, got)
			case tc.want != "" && (!ok || got.Format(time.RFC3339Nano) != tc.want || got.Location() != time.UTC):
				t.Errorf("parseTime(%q) = %v, %v, want %s", tc.in, got, ok, tc.want)
			}
		}
	}
}

func TestParseValue(t *testing.T) {
	const refused = -1
	cases := []struct {
		raw  string
		want int64
	}{
		{"0", 0},
		{"1", 1},
		{"42", 42},
		{"-0", 0},
		{"-0.0", 0},
		{"0.000", 0},
		{"0e500", 0},
		{"0.0E-99999999999999999999", 0},
		{"2.0", 2},
		{"2.50e1", 25},
		{"1e3", 1000},
		{"1E3", 1000},
		{"1e+3", 1000},
		{"1e-0", 1},
		{"10e-1", 1},
		{"100e-2", 1},
		{"0.05e2", 5},
		{"10.0e-1", 1},
		{"1e18", 1_000_000_000_000_000_000},
		{"9007199254740993", 9007199254740993}, // 2^53+1: a float64 would give ...992
		{"9.007199254740993e15", 9007199254740993}, // same, in exponent form
		{"9007199254740993.000", 9007199254740993},
		{"90071992547409930e-1", 9007199254740993},
		{"9223372036854775807", math.MaxInt64},
		{"9.223372036854775807e18", math.MaxInt64},
		{"922337203685477580.7e1", math.MaxInt64},
		{"1234567890123456789000000e-6", 1234567890123456789},
		{"9223372036854775808", refused},
		{"9.223372036854775808e18", refused},
		{"1e19", refused},
		{"99999999999999999999", refused},
		{"1e400", refused},
		{"1e99999999999999999999", refused},
		{"1e-400", refused},
		{"1.5", refused},
		{"0.1", refused},
		{"1.01e1", refused},
		{"-1", refused},
		{"-1e3", refused},
		{"01", refused},
		{"1.", refused},
		{".5", refused},
		{"1e", refused},
		{"1e+", refused},
		{"+1", refused},
		{"", refused},
		{`"5"`, refused},
		{"null", refused},
		{"true", refused},
		{"[1]", refused},
		{`{"v":1}`, refused},
	}
	for _, tc := range cases {
		got, ok := parseValue([]byte(tc.raw))
		if ok != (tc.want != refused) || (ok && got != tc.want) {
			t.Errorf("parseValue(%s) = %d, %v, want %d", tc.raw, got, ok, tc.want)
		}
	}
	if v, ok := parseValue(nil); !ok || v != 1 {
		t.Errorf("absent value = %d, %v, want 1", v, ok)
	}
	// The same through the decoder, for both shapes of event.
	for _, body := range []struct{ mediaType, body string }{
		{MediaJSON, `{"id":"a","meter":"m","value":9.007199254740993e15}`},
		{MediaCloudEvent, `{"specversion":"1.0","id":"a","source":"s","type":"m","data":{"value":9007199254740993}}`},
	} {
		d, err := DecodeEvents(body.mediaType, []byte(body.body))
		if err != nil || len(d.Errors) > 0 || d.Events[0].Value != 9007199254740993 {
			t.Errorf("%s: %+v %v", body.mediaType, d, err)
		}
	}
}

// Short repeated strings are shared within a body, and no string of an event
// aliases the body: the collector reuses its body buffer for the next request.
func TestDecodeEventsStrings(t *testing.T) {
	for _, mt := range []string{MediaJSON, MediaCloudEventsBatch} {
		body := []byte(`[{"id":"a","tenant":"acme","meter":"api_calls","dimensions":{"route":"/v1"}},{"id":"b","tenant":"acme","meter":"api_calls","dimensions":{"route":"/v1"}}]`)
		if mt == MediaCloudEventsBatch {
			body = []byte(`[{"specversion":"1.0","source":"s","id":"a","subject":"acme","type":"api_calls","data":{"route":"/v1"}},{"specversion":"1.0","source":"s","id":"b","subject":"acme","type":"api_calls","data":{"route":"/v1"}}]`)
		}
		d, err := DecodeEvents(mt, body)
		if err != nil || len(d.Errors) > 0 {
			t.Fatal(err, d.Errors)
		}
		if mt == MediaJSON {
			a, b := d.Events[0], d.Events[1]
			if unsafe.StringData(a.Tenant) != unsafe.StringData(b.Tenant) || unsafe.StringData(a.Meter) != unsafe.StringData(b.Meter) ||
				unsafe.StringData(a.Dimensions["route"]) != unsafe.StringData(b.Dimensions["route"]) {
				t.Errorf("tenant, meter and dimension values are not shared")
			}
		}
		for i := range body {
			body[i] = 'X'
		}
		want := []Event{
			{ID: "a", Tenant: "acme", Meter: "api_calls", Value: 1, Dimensions: map[string]string{"route": "/v1"}},
			{ID: "b", Tenant: "acme", Meter: "api_calls", Value: 1, Dimensions: map[string]string{"route": "/v1"}},
		}
		if mt == MediaCloudEventsBatch {
			want[0].ID, want[1].ID = "ce:1:s:a", "ce:1:s:b"
		}
		if !reflect.DeepEqual(d.Events, want) {
			t.Errorf("%s: events changed with the body: %+v", mt, d.Events)
		}
	}
}

// unquote reads every valid string as encoding/json does.
func TestUnquoteAgreesWithEncodingJSON(t *testing.T) {
	for _, lit := range []string{
		`a\"b\\c\/d\be\ff\ng\rh\ti`, `\u0000\u001f\u007f\u0080\u07ff\u0800\uffff\uFFFD`,
		`\ud800\udc00\udbff\udfff\uD83D\uDE00`, "é😀\xef\xbf\xbd", `x\u00e9y`, `\u2028\u2029`,
	} {
		var want string
		if err := json.Unmarshal([]byte(`"`+lit+`"`), &want); err != nil {
			t.Fatal(err)
		}
		got, ok := unquote([]byte(lit))
		if !ok || got != want {
			t.Errorf("unquote(%s) = %q, %v, want %q", lit, got, ok, want)
		}
	}
}

// CloudEventID: distinct (source, id) pairs never meet, however they are
// cut, and the id is at most MaxIDLen characters.
func TestCloudEventID(t *testing.T) {
	long := strings.Repeat("s", 200)
	cases := []struct{ source, id, want string }{
		{"gw-1", "42", "ce:4:gw-1:42"},
		{"gw-2", "42", "ce:4:gw-2:42"},
		{"/gw/eu-1", "a:b", "ce:8:/gw/eu-1:a:b"},
		{"é", "x", "ce:2:é:x"},
		{long, "1", "ce:sha256:"},
	}
	for _, tc := range cases {
		got := CloudEventID(tc.source, tc.id)
		if got != tc.want && !(strings.HasSuffix(tc.want, ":") && strings.HasPrefix(got, tc.want) && len(got) == len(tc.want)+64) {
			t.Errorf("CloudEventID(%q, %q) = %q, want %q", tc.source, tc.id, got, tc.want)
		}
	}
	// Pairs a naive join would merge; pairs that differ only past the
	// hashing length.
	pairs := [][2]string{
		{"a:b", "c"}, {"a", "b:c"}, {"a:", "b:c"}, {"a", ":b:c"}, {"1:a", "b"}, {"1", "a:b"}, {"", "1:a:b"},
		{long, "1"}, {long, "2"}, {long + "1", ""}, {strings.Repeat("é", 100), "1"}, {strings.Repeat("é", 100), "2"},
	}
	seen := map[string][2]string{}
	for _, p := range pairs {
		id := CloudEventID(p[0], p[1])
		if utf8.RuneCountInString(id) > MaxIDLen {
			t.Errorf("CloudEventID%q has %d characters", p, utf8.RuneCountInString(id))
		}
		if q, dup := seen[id]; dup {
			t.Errorf("CloudEventID%q = CloudEventID%q = %q", p, q, id)
		}
		seen[id] = p
	}
}

// Binary content mode: the ce-* headers are the attributes (percent-encoded),
// the body is the data; mapped as structured mode is.
func TestDecodeRequestBinaryCloudEvent(t *testing.T) {
	header := func(kv ...string) http.Header {
		h := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			h.Set(kv[i], kv[i+1])
		}
		return h
	}
	base := []string{"ce-specversion", "1.0", "ce-id", "42", "ce-source", "gw-1", "ce-type", "tokens", "ce-subject", "acme"}
	with := func(kv ...string) http.Header { return header(append(append([]string{}, base...), kv...)...) }
	cases := []struct {
		name   string
		h      http.Header
		body   string
		want   []Event
		errs   []FieldError
		status error // ErrUnsupportedMediaType, or a *SyntaxError when syntax
	}{
		{"data", with("Content-Type", "application/json", "ce-time", "2026-11-20T09:30:00Z"), `{"value":1200,"model":"big","cached":true}`,
			[]Event{{ID: "ce:4:gw-1:42", Tenant: "acme", Meter: "tokens", Value: 1200, Time: utc("2026-11-20T09:30:00Z"),
				Dimensions: map[string]string{"model": "big", "cached": "true"}}}, nil, nil},
		{"no data counts 1", with(), ``, []Event{{ID: "ce:4:gw-1:42", Tenant: "acme", Meter: "tokens", Value: 1}}, nil, nil},
		{"no Content-Type reads JSON", with(), ` {"value":2} `, []Event{{ID: "ce:4:gw-1:42", Tenant: "acme", Meter: "tokens", Value: 2}}, nil, nil},
		{"percent-encoded attributes", header("ce-specversion", "1.0", "ce-id", "a%20b%25", "ce-source", "urn:gw%3A%C3%A9", "ce-type", "tokens",
			"Content-Type", "application/json; charset=utf-8"), `{"value":1}`,
			[]Event{{ID: "ce:9:urn:gw:é:a b%", Meter: "tokens", Value: 1}}, nil, nil},
		{"extension headers ignored", with("ce-traceparent", "00-4bf9", "ce-myext", "x"), ``, []Event{{ID: "ce:4:gw-1:42", Tenant: "acme", Meter: "tokens", Value: 1}}, nil, nil},
		{"checks", header("ce-specversion", "0.3", "ce-id", "42", "ce-type", "tokens", "ce-subject", "", "ce-time", "yesterday"), `{"value":-1,"tags":[1]}`,
			[]Event{{ID: "ce:0::42", Meter: "tokens"}},
			[]FieldError{{0, "specversion", `must be "1.0"`}, {0, "source", "is required"}, {0, "subject", "must not be empty; leave it out to use the API key's tenant"},
				{0, "time", "must be an RFC 3339 timestamp"}, {0, "data.value", "must be a non-negative integer"}, {0, "data.tags", "must be a string, number or boolean"}}, nil},
		{"bad percent-encoding and UTF-8", header("ce-specversion", "1.0", "ce-id", "%zz", "ce-source", "gw%ff", "ce-type", "tokens"), ``,
			[]Event{{Meter: "tokens", Value: 1}},
			[]FieldError{{0, "id", "must be percent-encoded UTF-8 in its ce- header"}, {0, "source", "must be percent-encoded UTF-8 in its ce- header"}}, nil},
		// Which of two ids or tenants would be meant? A proxy may keep the
		// last where meterd read the first.
		{"attribute header given twice", func() http.Header {
			h := with()
			h.Add("ce-id", "43")
			h.Add("ce-subject", "globex")
			return h
		}(), ``, []Event{{Meter: "tokens", Value: 1}},
			[]FieldError{{0, "id", "is given in more than one ce- header"}, {0, "subject", "is given in more than one ce- header"}}, nil},
		{"missing id", header("ce-specversion", "1.0", "ce-source", "gw", "ce-type", "tokens"), ``,
			[]Event{{Meter: "tokens", Value: 1}}, []FieldError{{0, "id", "is required"}}, nil},
		{"data not an object", with(), `[1]`, []Event{{ID: "ce:4:gw-1:42", Tenant: "acme", Meter: "tokens", Value: 1}},
			[]FieldError{{0, "data", "must be an object"}}, nil},
		{"data not JSON", with(), `{"value":`, nil, nil, errSyntax},
		{"two data objects", with(), `{}{}`, nil, nil, errSyntax},
		{"data of another type", with("Content-Type", "text/plain"), `hello`, nil, nil, ErrUnsupportedMediaType},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, err := DecodeRequest(tc.h, []byte(tc.body))
			switch {
			case tc.status == errSyntax:
				var se *SyntaxError
				if !errors.As(err, &se) {
					t.Fatalf("error %v, want a *SyntaxError", err)
				}
				return
			case tc.status != nil:
				if !errors.Is(err, tc.status) {
					t.Fatalf("error %v, want %v", err, tc.status)
				}
				return
			case err != nil:
				t.Fatal(err)
			}
			sameEvents(t, d.Events, tc.want)
			if !reflect.DeepEqual(d.Errors, tc.errs) {
				t.Errorf("errors\n got %v\nwant %v", d.Errors, tc.errs)
			}
		})
	}
}

var errSyntax = errors.New("want a *SyntaxError")

// The other modes go by the Content-Type as DecodeEvents does, whatever ce-*
// headers come with them: a structured event's attributes are its members.
func TestDecodeRequestOtherModes(t *testing.T) {
	ce := `{"specversion":"1.0","id":"7","source":"gw-2","type":"tokens","subject":"acme"}`
	for _, tc := range []struct{ contentType, body string }{
		{"application/cloudevents+json; charset=utf-8", ce},
		{"Application/CloudEvents-Batch+JSON", "[" + ce + "]"},
	} {
		h := http.Header{"Content-Type": {tc.contentType}, "Ce-Specversion": {"1.0"}, "Ce-Id": {"other"}, "Ce-Source": {"gw-9"}}
		d, err := DecodeRequest(h, []byte(tc.body))
		if err != nil || len(d.Errors) > 0 || len(d.Events) != 1 || d.Events[0].ID != "ce:4:gw-2:7" {
			t.Errorf("%s: %+v %v", tc.contentType, d, err)
		}
	}
	d, err := DecodeRequest(http.Header{"Content-Type": {"application/json"}}, []byte(`{"id":"ce:4:gw-2:7","meter":"tokens"}`))
	if err != nil || len(d.Errors) > 0 || d.Events[0].ID != "ce:4:gw-2:7" {
		t.Errorf("plain JSON: %+v %v", d, err)
	}
	if _, err := DecodeRequest(http.Header{"Content-Type": {"text/plain"}}, []byte(`x`)); !errors.Is(err, ErrUnsupportedMediaType) {
		t.Errorf("text/plain without ce- headers: %v", err)
	}
}

// A CloudEvent's data members of the wrong shape are reported up to
// maxElementErrors, and an NDJSON body of invalid lines stops being read at
// MaxFieldErrors: what a body of bad members costs stays in proportion to
// its size.
func TestManyFailuresReportedBounded(t *testing.T) {
	var data strings.Builder
	for i := range 5000 {
		if i > 0 {
			data.WriteByte(',')
		}
		data.WriteString(`"k` + strconv.Itoa(i) + `":[]`)
	}
	d, err := DecodeEvents(MediaCloudEvent, []byte(`{"specversion":"1.0","id":"1","source":"s","type":"api_calls","data":{`+data.String()+`}}`))
	if err != nil || len(d.Errors) != maxElementErrors || d.Errors[0].Field != "data.k0" || d.Errors[63].Field != "data.k63" {
		t.Errorf("%d errors (%v), first %+v; want %d, from data.k0", len(d.Errors), err, d.Errors[0], maxElementErrors)
	}
	d, err = DecodeEvents(MediaNDJSON, []byte(strings.Repeat("1\n", 5000)))
	if err != nil || !d.Cut || len(d.Errors) != MaxFieldErrors || len(d.Events) != MaxFieldErrors {
		t.Errorf("NDJSON of 5000 non-objects: cut %v, %d errors, %d events, %v; want cut at %d", d.Cut, len(d.Errors), len(d.Events), err, MaxFieldErrors)
	}
	d, err = DecodeEvents(MediaNDJSON, []byte(strings.Repeat("1\n", MaxFieldErrors-1)))
	if err != nil || d.Cut || len(d.Errors) != MaxFieldErrors-1 {
		t.Errorf("NDJSON of %d non-objects: cut %v, %d errors, %v; want all read", MaxFieldErrors-1, d.Cut, len(d.Errors), err)
	}
}
