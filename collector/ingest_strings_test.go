package collector

import (
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/meterd/meterd/schemas"
)

// notUTF8 is the decoder's message for a string that is not valid UTF-8.
const notUTF8 = `must be valid UTF-8 (no invalid bytes, no unpaired surrogate escape such as \ud800)`

// postRaw posts body with header h (and the admin key unless h has one).
func (env *ingestEnv) postRaw(t *testing.T, h http.Header, body string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, env.srv.URL+"/v1/events", strings.NewReader(body))
	req.Header = h.Clone()
	if req.Header.Get("Authorization") == "" {
		req.Header.Set("Authorization", "Bearer "+ingestAdminKey)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

// problemErrors reads the field errors of a 422.
func problemErrors(t *testing.T, body []byte) []schemas.FieldError {
	t.Helper()
	var p schemas.Problem
	if err := json.Unmarshal(body, &p); err != nil {
		t.Fatalf("%v: %s", err, body)
	}
	return p.Errors
}

// A string that is not valid UTF-8 is a 422 naming its field, never
// repaired: "u\xff" and "u\xfe" used to be accepted and merged into one id.
// And a 422 names only what is wrong: an unknown member does not bring
// "id is required" along when id was given.
func TestIngestFieldErrors(t *testing.T) {
	env := newIngestEnv(t, nil)
	jsonH := http.Header{"Content-Type": {"application/json"}}
	ceH := http.Header{"Content-Type": {"application/cloudevents+json"}}
	cases := []struct {
		name string
		h    http.Header
		body string
		want []schemas.FieldError
	}{
		{"id with byte ff", jsonH, "{\"id\":\"u\xff\",\"tenant\":\"acme\",\"meter\":\"api_calls\"}", []schemas.FieldError{{Index: 0, Field: "id", Message: notUTF8}}},
		{"id with byte fe", jsonH, "{\"id\":\"u\xfe\",\"tenant\":\"acme\",\"meter\":\"api_calls\"}", []schemas.FieldError{{Index: 0, Field: "id", Message: notUTF8}}},
		{"id lone surrogate", jsonH, `[{"id":"ok","tenant":"acme","meter":"api_calls"},{"id":"u\ud800","tenant":"acme","meter":"api_calls"}]`,
			[]schemas.FieldError{{Index: 1, Field: "id", Message: notUTF8}}},
		{"tenant", jsonH, "{\"id\":\"t\",\"tenant\":\"ac\xe9me\",\"meter\":\"api_calls\"}", []schemas.FieldError{{Index: 0, Field: "tenant", Message: notUTF8}}},
		{"meter", jsonH, `{"id":"m","tenant":"acme","meter":"api\udc00"}`, []schemas.FieldError{{Index: 0, Field: "meter", Message: notUTF8}}},
		{"dimension value", jsonH, "{\"id\":\"d\",\"tenant\":\"acme\",\"meter\":\"api_calls\",\"dimensions\":{\"route\":\"/\xc3\"}}",
			[]schemas.FieldError{{Index: 0, Field: "dimensions.route", Message: notUTF8}}},
		{"dimension key", jsonH, `{"id":"k","tenant":"acme","meter":"api_calls","dimensions":{"r\ud83d":"x"}}`,
			[]schemas.FieldError{{Index: 0, Field: "dimensions.r\uFFFD", Message: "key " + notUTF8}}},
		{"cloudevent source", ceH, "{\"specversion\":\"1.0\",\"id\":\"1\",\"source\":\"gw\xff\",\"type\":\"api_calls\",\"subject\":\"acme\"}",
			[]schemas.FieldError{{Index: 0, Field: "source", Message: notUTF8}}},
		{"cloudevent without source", ceH, `{"specversion":"1.0","id":"1","type":"api_calls","subject":"acme"}`,
			[]schemas.FieldError{{Index: 0, Field: "source", Message: "is required"}}},

		{"unknown member only", jsonH, `{"id":"a","tenant":"acme","meter":"api_calls","region":"eu"}`,
			[]schemas.FieldError{{Index: 0, Field: "region", Message: "is not a known field"}}},
		{"unknown member and a bad value", jsonH, `{"id":"a","tenant":"acme","meter":"api_calls","region":"eu","value":-1}`,
			[]schemas.FieldError{{Index: 0, Field: "region", Message: "is not a known field"}, {Index: 0, Field: "value", Message: "must be a non-negative integer"}}},
		{"wrong type and a bad meter", jsonH, `{"id":7,"tenant":"acme","meter":"Bad"}`,
			[]schemas.FieldError{{Index: 0, Field: "id", Message: "must be a string"}, {Index: 0, Field: "meter", Message: "must match " + schemas.MeterGrammar}}},
		{"tenant key, unknown member", http.Header{"Content-Type": {"application/json"}, "Authorization": {"Bearer " + ingestAcmeKey}},
			`{"id":"a","meter":"api_calls","extra":1}`, []schemas.FieldError{{Index: 0, Field: "extra", Message: "is not a known field"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, body := env.postRaw(t, tc.h, tc.body)
			if status != http.StatusUnprocessableEntity {
				t.Fatalf("status %d, want 422: %s", status, body)
			}
			if got := problemErrors(t, body); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("errors\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
	if seen := env.streamEvents(t); len(seen) != 0 {
		t.Fatalf("the stream holds events of refused requests: %v", seen)
	}
}

// CloudEvents identity is (source, id) in each HTTP mode: the same id from
// two sources is two events, the same pair twice is one, and a binary-mode
// event (ce-* headers, the data as the body) maps as a structured one.
func TestIngestCloudEventsModes(t *testing.T) {
	env := newIngestEnv(t, nil)
	ce := func(source, id string, value int) string {
		return `{"specversion":"1.0","id":"` + id + `","source":"` + source + `","type":"api_calls","subject":"acme","data":{"value":` + strconv.Itoa(value) + `}}`
	}
	binary := func(source, id string) http.Header {
		return http.Header{"Content-Type": {"application/json"}, "Ce-Specversion": {"1.0"}, "Ce-Id": {id},
			"Ce-Source": {source}, "Ce-Type": {"api_calls"}, "Ce-Subject": {"acme"}, "Ce-Time": {"2026-11-21T11:00:00Z"}}
	}
	batchH := http.Header{"Content-Type": {"application/cloudevents-batch+json"}}
	cases := []struct {
		name                 string
		h                    http.Header
		body                 string
		accepted, duplicates int
	}{
		{"same id, two sources", batchH, `[` + ce("gw-1", "42", 3) + `,` + ce("gw-2", "42", 5) + `]`, 2, 0},
		{"same source and id twice", batchH, `[` + ce("gw-3", "42", 7) + `,` + ce("gw-3", "42", 7) + `]`, 1, 1},
		{"structured", http.Header{"Content-Type": {"application/cloudevents+json"}}, ce("gw-4", "42", 11), 1, 0},
		{"binary", binary("gw-1", "44"), `{"value":13,"route":"/v1/orders"}`, 1, 0},
		{"binary, percent-encoded source", binary("gw%201%25", "42"), `{"value":17}`, 1, 0},
		{"binary without data", binary("gw-5", "42"), ``, 1, 0},
	}
	for _, tc := range cases {
		status, body := env.postRaw(t, tc.h, tc.body)
		var got struct{ Accepted, Duplicates int }
		if status != http.StatusAccepted || json.Unmarshal(body, &got) != nil || got.Accepted != tc.accepted || got.Duplicates != tc.duplicates {
			t.Fatalf("%s: %d %s, want 202 accepted %d duplicates %d", tc.name, status, body, tc.accepted, tc.duplicates)
		}
	}
	status, body := env.postRaw(t, http.Header{"Content-Type": {"application/json"}, "Ce-Specversion": {"1.0"}, "Ce-Id": {"1"}, "Ce-Type": {"api_calls"}, "Ce-Subject": {"acme"}}, `{}`)
	if status != http.StatusUnprocessableEntity || !reflect.DeepEqual(problemErrors(t, body), []schemas.FieldError{{Index: 0, Field: "source", Message: "is required"}}) {
		t.Fatalf("binary without ce-source: %d %s", status, body)
	}
	status, body = env.postRaw(t, binary("gw-1", "45").Clone(), "hello")
	if status != http.StatusBadRequest {
		t.Fatalf("binary with data that is not JSON: %d %s", status, body)
	}
	h := binary("gw-1", "46")
	h.Set("Content-Type", "text/plain")
	if status, body = env.postRaw(t, h, "hello"); status != http.StatusUnsupportedMediaType {
		t.Fatalf("binary with text/plain data: %d %s", status, body)
	}

	seen := env.streamEvents(t)
	want := map[string]int{
		"acme/ce:4:gw-1:42": 1, "acme/ce:4:gw-2:42": 1, "acme/ce:4:gw-3:42": 1, "acme/ce:4:gw-4:42": 1,
		"acme/ce:4:gw-1:44": 1, "acme/ce:5:gw 1%:42": 1, "acme/ce:4:gw-5:42": 1,
	}
	if !reflect.DeepEqual(seen, want) {
		t.Fatalf("stream holds %v, want %v", seen, want)
	}
}
