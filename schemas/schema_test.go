package schemas

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

// eventSchema compiles event.schema.json as draft 2020-12 with format
// assertion on, as a client validating its events would.
func eventSchema(t *testing.T) *jsonschema.Schema {
	t.Helper()
	raw, err := os.ReadFile("event.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	const url = "https://meterd.dev/schemas/event.schema.json"
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft2020)
	c.AssertFormat()
	if err := c.AddResource(url, doc); err != nil {
		t.Fatal(err)
	}
	sch, err := c.Compile(url)
	if err != nil {
		t.Fatal(err)
	}
	return sch
}

// goAccepts says whether the collector would accept doc as a single event:
// it decodes without error or field error, and once the API key has filled
// an absent tenant, it validates (no time window: the schema has none).
func goAccepts(doc string) (bool, string) {
	d, err := DecodeEvents(MediaJSON, []byte(doc))
	if err != nil {
		return false, err.Error()
	}
	if len(d.Errors) > 0 {
		return false, fmt.Sprint(d.Errors)
	}
	if len(d.Events) != 1 {
		return false, fmt.Sprintf("%d events", len(d.Events))
	}
	e := d.Events[0]
	if e.Tenant == "" {
		e.Tenant = "tenant-of-the-api-key"
	}
	if errs := e.Validate(0, Window{}, nil); len(errs) > 0 {
		return false, fmt.Sprint(errs)
	}
	return true, "accepted"
}

func TestSchemaAgreement(t *testing.T) {
	sch := eventSchema(t)
	// ev builds an event document from the base id and meter plus members.
	ev := func(members string) string {
		if members == "" {
			return `{"id":"evt-1","meter":"api_calls"}`
		}
		return `{"id":"evt-1","meter":"api_calls",` + members + `}`
	}
	dims := func(n int) string {
		var b strings.Builder
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `"k%02d":"v"`, i)
		}
		return `"dimensions":{` + b.String() + `}`
	}
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	rep := strings.Repeat
	cases := []struct {
		name  string
		doc   string
		valid bool
	}{
		{"minimal", ev(""), true},
		{"every field", `{"id":"01JDA7K3Q9ZP4M8X2B00000001","tenant":"acme","meter":"api_calls","value":3,"time":"2026-11-20T09:30:00.123Z","dimensions":{"route":"/v1/orders","method":"GET","status":"200"}}`, true},

		{"id absent", `{"meter":"api_calls"}`, false},
		{"id empty", `{"id":"","meter":"api_calls"}`, false},
		{"id 1 char", `{"id":"x","meter":"api_calls"}`, true},
		{"id 128 ascii", `{"id":` + q(rep("a", 128)) + `,"meter":"api_calls"}`, true},
		{"id 129 ascii", `{"id":` + q(rep("a", 129)) + `,"meter":"api_calls"}`, false},
		{"id 128 two-byte chars", `{"id":"` + rep("é", 128) + `","meter":"api_calls"}`, true},
		{"id 129 two-byte chars", `{"id":"` + rep("é", 129) + `","meter":"api_calls"}`, false},
		{"id 128 chars of four bytes", `{"id":"` + rep("😀", 128) + `","meter":"api_calls"}`, true},
		{"id 129 chars as escapes", `{"id":"` + rep(`\u00e9`, 129) + `","meter":"api_calls"}`, false},
		{"id 128 surrogate pairs", `{"id":"` + rep(`\ud83d\ude00`, 128) + `","meter":"api_calls"}`, true},
		{"id number", `{"id":42,"meter":"api_calls"}`, false},
		{"id null", `{"id":null,"meter":"api_calls"}`, false},

		{"tenant absent (from the API key)", ev(""), true},
		{"tenant with every allowed kind of char", ev(`"tenant":"Acme.corp_EU-09"`), true},
		{"tenant digits only", ev(`"tenant":"0123456789"`), true},
		{"tenant dot dash underscore", ev(`"tenant":"_.-"`), true},
		{"tenant dots between", ev(`"tenant":"a.b.c"`), true},
		{"tenant leading dot", ev(`"tenant":".acme"`), false},
		{"tenant trailing dot", ev(`"tenant":"acme."`), false},
		{"tenant double dot", ev(`"tenant":"ac..me"`), false},
		{"tenant dot only", ev(`"tenant":"."`), false},
		{"tenant 128", ev(`"tenant":` + q(rep("t", 128))), true},
		{"tenant 129", ev(`"tenant":` + q(rep("t", 129))), false},
		{"tenant empty", ev(`"tenant":""`), false},
		{"tenant space", ev(`"tenant":"acme corp"`), false},
		{"tenant NATS wildcard", ev(`"tenant":"acme>"`), false},
		{"tenant star", ev(`"tenant":"acme*"`), false},
		{"tenant slash", ev(`"tenant":"acme/eu"`), false},
		{"tenant colon", ev(`"tenant":"acme:eu"`), false},
		{"tenant non-ascii", ev(`"tenant":"acmé"`), false},
		{"tenant trailing newline", ev(`"tenant":"acme\n"`), false},
		{"tenant null", ev(`"tenant":null`), false},
		{"tenant number", ev(`"tenant":7`), false},

		{"meter one letter", `{"id":"e","meter":"a"}`, true},
		{"meter digits and underscores", `{"id":"e","meter":"a_1_b2"}`, true},
		{"meter 64", `{"id":"e","meter":"m` + rep("x", 63) + `"}`, true},
		{"meter 65", `{"id":"e","meter":"m` + rep("x", 64) + `"}`, false},
		{"meter uppercase", `{"id":"e","meter":"Api_calls"}`, false},
		{"meter uppercase inside", `{"id":"e","meter":"apiCalls"}`, false},
		{"meter leading digit", `{"id":"e","meter":"1api"}`, false},
		{"meter leading underscore", `{"id":"e","meter":"_api"}`, false},
		{"meter dash", `{"id":"e","meter":"api-calls"}`, false},
		{"meter dot", `{"id":"e","meter":"api.calls"}`, false},
		{"meter empty", `{"id":"e","meter":""}`, false},
		{"meter absent", `{"id":"e"}`, false},
		{"meter trailing newline", `{"id":"e","meter":"api\n"}`, false},

		{"value 0", ev(`"value":0`), true},
		{"value 1", ev(`"value":1`), true},
		{"value -1", ev(`"value":-1`), false},
		{"value 1.5", ev(`"value":1.5`), false},
		{"value 2.0", ev(`"value":2.0`), true},
		{"value 1e3", ev(`"value":1e3`), true},
		{"value 1E+3", ev(`"value":1E+3`), true},
		{"value 10e-1", ev(`"value":10e-1`), true},
		{"value 1e-1", ev(`"value":1e-1`), false},
		{"value string", ev(`"value":"5"`), false},
		{"value null", ev(`"value":null`), false},
		{"value true", ev(`"value":true`), false},
		{"value max", ev(`"value":4294967295`), true},
		{"value over max", ev(`"value":4294967296`), false},
		{"value max int64", ev(`"value":9223372036854775807`), false},
		{"value max int64 + 1", ev(`"value":9223372036854775808`), false},
		{"value max in exponent form", ev(`"value":4.294967295e9`), true},
		{"value max int64 in exponent form", ev(`"value":9.223372036854775807e18`), false},
		{"value 1e19", ev(`"value":1e19`), false},
		{"value -0", ev(`"value":-0`), true},
		{"value -0.0", ev(`"value":-0.0`), true},
		{"value 0e500", ev(`"value":0e500`), true},
		{"value 1e400", ev(`"value":1e400`), false},
		{"value -1e-400", ev(`"value":-1e-400`), false},
		{"value 2^53+1", ev(`"value":9007199254740993`), false},

		{"time UTC", ev(`"time":"2026-11-20T09:30:00Z"`), true},
		{"time nanoseconds", ev(`"time":"2026-11-20T09:30:00.123456789Z"`), true},
		{"time twelve fraction digits", ev(`"time":"2026-11-20T09:30:00.123456789012Z"`), true},
		{"time offset", ev(`"time":"2026-11-20T09:30:00+05:30"`), true},
		{"time negative offset", ev(`"time":"2026-11-20T09:30:00-08:00"`), true},
		{"time unknown offset -00:00", ev(`"time":"2026-11-20T09:30:00-00:00"`), true},
		{"time lowercase t and z", ev(`"time":"2026-11-20t09:30:00z"`), true},
		{"time leap day", ev(`"time":"2024-02-29T00:00:00Z"`), true},
		{"time year 0000", ev(`"time":"0000-01-01T00:00:00Z"`), true},
		{"time no zone", ev(`"time":"2026-11-20T09:30:00"`), false},
		{"time space separator", ev(`"time":"2026-11-20 09:30:00Z"`), false},
		{"time date only", ev(`"time":"2026-11-20"`), false},
		{"time not a leap day", ev(`"time":"2026-02-29T00:00:00Z"`), false},
		{"time day 31 of a 30-day month", ev(`"time":"2026-11-31T00:00:00Z"`), false},
		{"time month 13", ev(`"time":"2026-13-01T00:00:00Z"`), false},
		{"time hour 24", ev(`"time":"2026-11-20T24:00:00Z"`), false},
		{"time one-digit hour", ev(`"time":"2026-11-20T9:30:00Z"`), false},
		{"time comma fraction", ev(`"time":"2026-11-20T09:30:00,5Z"`), false},
		{"time dot without digits", ev(`"time":"2026-11-20T09:30:00.Z"`), false},
		{"time offset hour 24", ev(`"time":"2026-11-20T09:30:00+24:00"`), false},
		{"time offset without colon", ev(`"time":"2026-11-20T09:30:00+0530"`), false},
		{"time leap second", ev(`"time":"2016-12-31T23:59:60Z"`), false},
		{"time empty", ev(`"time":""`), false},
		{"time null", ev(`"time":null`), false},
		{"time unix seconds", ev(`"time":1732095000`), false},

		{"dimensions empty", ev(`"dimensions":{}`), true},
		{"dimensions 16 keys", ev(dims(16)), true},
		{"dimensions 17 keys", ev(dims(17)), false},
		{"dimensions duplicate member keeps the last", ev(dims(16) + "," + dims(16)), true},
		{"dimension key punctuation", ev(`"dimensions":{"_x.y-z":"v"}`), true},
		{"dimension key 64", ev(`"dimensions":{"k` + rep("x", 63) + `":"v"}`), true},
		{"dimension key 65", ev(`"dimensions":{"k` + rep("x", 64) + `":"v"}`), false},
		{"dimension key leading digit", ev(`"dimensions":{"1route":"v"}`), false},
		{"dimension key leading dash", ev(`"dimensions":{"-route":"v"}`), false},
		{"dimension key space", ev(`"dimensions":{"my route":"v"}`), false},
		{"dimension key empty", ev(`"dimensions":{"":"v"}`), false},
		{"dimension key non-ascii", ev(`"dimensions":{"régión":"v"}`), false},
		{"dimension value empty", ev(`"dimensions":{"route":""}`), true},
		{"dimension value 256 chars", ev(`"dimensions":{"route":"` + rep("é", 256) + `"}`), true},
		{"dimension value 257 chars", ev(`"dimensions":{"route":"` + rep("é", 257) + `"}`), false},
		{"dimension value number", ev(`"dimensions":{"status":200}`), false},
		{"dimension value boolean", ev(`"dimensions":{"cached":true}`), false},
		{"dimension value null", ev(`"dimensions":{"route":null}`), false},
		{"dimension value object", ev(`"dimensions":{"route":{"a":"b"}}`), false},
		{"dimensions array", ev(`"dimensions":["route"]`), false},
		{"dimensions string", ev(`"dimensions":"route=/v1"`), false},
		{"dimensions null", ev(`"dimensions":null`), false},

		{"unknown member", ev(`"region":"eu"`), false},
		{"unknown member null", ev(`"extra":null`), false},
		{"member name in another case", `{"ID":"evt-1","meter":"api_calls"}`, false},
		{"member name capitalised", `{"id":"evt-1","Meter":"api_calls"}`, false},
		{"member name escaped", `{"\u0069d":"evt-1","meter":"api_calls"}`, true},
		{"duplicate member keeps the last", `{"id":"evt-1","meter":"API","meter":"api_calls"}`, true},

		{"document number", `5`, false},
		{"document string", `"evt-1"`, false},
		{"document null", `null`, false},
		{"document true", `true`, false},
		{"document empty array", `[]`, false},
		{"document array of a number", `[1]`, false},
	}
	// Strings that are not valid UTF-8 are refused (docs/architecture.md#money-safety), but no JSON
	// Schema can say so: a validator reads the document into Unicode strings
	// first, and its parser (encoding/json here, as most) has already put
	// U+FFFD in place of an invalid byte or an unpaired surrogate escape. The
	// schema's description says it; these rows pin both sides down.
	notUTF8 := []struct{ name, doc string }{
		{"id invalid byte", "{\"id\":\"u\xff\",\"meter\":\"api_calls\"}"},
		{"id encoded surrogate", "{\"id\":\"u\xed\xa0\x80\",\"meter\":\"api_calls\"}"},
		{"id lone high surrogate escape", `{"id":"u\ud800","meter":"api_calls"}`},
		{"id lone low surrogate escape", `{"id":"\udc00","meter":"api_calls"}`},
		{"dimension value invalid byte", "{\"id\":\"a\",\"meter\":\"api_calls\",\"dimensions\":{\"route\":\"/\xfe\"}}"},
		{"dimension value lone surrogate", `{"id":"a","meter":"api_calls","dimensions":{"route":"/\ud83d"}}`},
	}
	for _, tc := range notUTF8 {
		t.Run("not UTF-8/"+tc.name, func(t *testing.T) {
			if ok, why := goAccepts(tc.doc); ok || !strings.Contains(why, "valid UTF-8") {
				t.Errorf("Go accepts=%v (%s), want a refusal for UTF-8", ok, why)
			}
			inst, err := jsonschema.UnmarshalJSON(strings.NewReader(tc.doc))
			if err != nil {
				t.Fatalf("the validator's parser refuses the document: %v", err)
			}
			if err := sch.Validate(inst); err != nil {
				t.Errorf("the schema sees the repaired document and refuses it: %v; update this test and the schema's description", err)
			}
		})
	}
	if len(cases) < 40 {
		t.Fatalf("only %d cases", len(cases))
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			inst, err := jsonschema.UnmarshalJSON(strings.NewReader(tc.doc))
			if err != nil {
				t.Fatalf("the test document is not JSON: %v", err)
			}
			schemaErr := sch.Validate(inst)
			schemaOK := schemaErr == nil
			goOK, why := goAccepts(tc.doc)
			if schemaOK != goOK {
				t.Errorf("schema accepts=%v (%v), Go accepts=%v (%s)\n%s", schemaOK, schemaErr, goOK, why, tc.doc)
			}
			if schemaOK != tc.valid {
				t.Errorf("schema accepts=%v, want %v: %v", schemaOK, tc.valid, schemaErr)
			}
			if goOK != tc.valid {
				t.Errorf("Go accepts=%v, want %v: %s", goOK, tc.valid, why)
			}
		})
	}
}
