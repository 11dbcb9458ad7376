// Package apitest validates real HTTP exchanges of meterd's handlers
// against the OpenAPI document (api/openapi.yaml) with a maintained
// validator (github.com/pb33f/libopenapi-validator), so a handler that
// drifts from the document fails its tests. Tests only.
package apitest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/pb33f/libopenapi"
	validator "github.com/pb33f/libopenapi-validator"
	"github.com/pb33f/libopenapi-validator/config"
	"github.com/pb33f/libopenapi-validator/content"
	liberrors "github.com/pb33f/libopenapi-validator/errors"
	"github.com/pb33f/libopenapi-validator/schema_validation"
	v3 "github.com/pb33f/libopenapi/datamodel/high/v3"

	"github.com/meterd/meterd/api"
	"github.com/meterd/meterd/schemas"
)

// Validator checks exchanges against the document and records which
// operations and problem types they covered.
type Validator struct {
	v      validator.Validator
	schema schema_validation.SchemaValidator
	model  *v3.Document

	mu       sync.Mutex
	covered  map[string]bool // "METHOD path" of the document
	problems map[string]bool // slugs answered
}

// New parses the document and builds its validator, with the decoders of
// the NDJSON and JSON Lines bodies POST /v1/events reads (each line an
// element of the array the document describes).
func New(t testing.TB) *Validator {
	t.Helper()
	doc, err := libopenapi.NewDocument(api.Document())
	if err != nil {
		t.Fatalf("parse api/openapi.yaml: %v", err)
	}
	m, err := doc.BuildV3Model()
	if err != nil {
		t.Fatalf("build the model of api/openapi.yaml: %v", err)
	}
	opts := []config.Option{
		config.WithFormatAssertions(),
		config.WithBodyDecoder(schemas.MediaNDJSON, ndjson),
		config.WithBodyDecoder(schemas.MediaJSONLines, ndjson),
	}
	return &Validator{
		v:        validator.NewValidatorFromV3Model(&m.Model, opts...),
		schema:   schema_validation.NewSchemaValidator(opts...),
		model:    &m.Model,
		covered:  map[string]bool{},
		problems: map[string]bool{},
	}
}

// ndjson decodes newline-delimited JSON into the array of its values.
var ndjson = content.DecoderFunc(func(in *content.DecodeInput) (any, error) {
	if in == nil || in.Body == nil {
		return nil, nil
	}
	var out []any
	sc := bufio.NewScanner(in.Body)
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var v any
		if err := json.Unmarshal(line, &v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, sc.Err()
})

// Exchange is one request and what a test expects of its answer.
type Exchange struct {
	Name   string
	Method string
	// URL is the full URL of the request.
	URL    string
	Header http.Header
	Body   []byte
	// Status is the status the handler must answer.
	Status int
	// Problem is the slug of the problem type the answer must carry, or "".
	Problem string
	// Conforms says whether the request conforms to the document: a bad
	// request the document can describe as bad must be found invalid too.
	Conforms bool
	// SkipRequest leaves the request unvalidated (a gzip body, which the
	// validator cannot read).
	SkipRequest bool
}

// Answer is what a handler answered.
type Answer struct {
	Status int
	Header http.Header
	Body   []byte
}

// Do sends x with client, checks the status and the problem type, and
// validates the request (it must conform exactly when x.Conforms says) and
// the answer (it must always conform) against the document.
func (v *Validator) Do(t testing.TB, client *http.Client, x Exchange) Answer {
	t.Helper()
	req, err := x.request(t)
	if err != nil {
		t.Fatalf("%s: %v", x.Name, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s: %v", x.Name, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("%s: reading the answer: %v", x.Name, err)
	}
	a := Answer{Status: resp.StatusCode, Header: resp.Header, Body: body}
	v.Check(t, x, a)
	return a
}

// request builds the request of x.
func (x Exchange) request(t testing.TB) (*http.Request, error) {
	req, err := http.NewRequestWithContext(t.Context(), x.Method, x.URL, bytes.NewReader(x.Body))
	if err != nil {
		return nil, err
	}
	for k, vs := range x.Header {
		req.Header[k] = slices.Clone(vs)
	}
	if x.Body == nil {
		req.Body, req.ContentLength = http.NoBody, 0
	}
	return req, nil
}

// Check checks a, the answer to x sent some other way (a test's own
// connection), as Do does.
func (v *Validator) Check(t testing.TB, x Exchange, a Answer) {
	t.Helper()
	if a.Status != x.Status {
		t.Errorf("%s: status %d, want %d: %s", x.Name, a.Status, x.Status, a.Body)
	}
	if x.Problem != "" {
		var p struct{ Type string }
		json.Unmarshal(a.Body, &p)
		if got := slugOf(p.Type); got != x.Problem {
			t.Errorf("%s: problem type %q, want %q", x.Name, p.Type, x.Problem)
		}
	}
	req, err := x.request(t)
	if err != nil {
		t.Fatalf("%s: %v", x.Name, err)
	}
	if !x.SkipRequest {
		ok, errs := v.v.ValidateHttpRequestSync(req)
		switch {
		case x.Conforms && !ok:
			t.Errorf("%s: the request does not conform to api/openapi.yaml:\n%s", x.Name, describe(errs))
		case !x.Conforms && ok:
			t.Errorf("%s: the request conforms to api/openapi.yaml, want it found invalid", x.Name)
		}
	}
	resp := &http.Response{StatusCode: a.Status, Header: a.Header, Body: io.NopCloser(bytes.NewReader(a.Body)), Request: req}
	if ok, errs := v.v.ValidateHttpResponse(req, resp); !ok {
		t.Errorf("%s: the answer %d does not conform to api/openapi.yaml:\n%s\nbody: %.2000s", x.Name, a.Status, describe(errs), a.Body)
	}
	v.record(req, a)
}

// ProblemsElsewhere are the problem types `meterd dev` cannot be brought
// to answer in cmd/meterd's TestOpenAPIExchanges, each with the test that
// validates it against the document instead.
var ProblemsElsewhere = map[string]string{
	"event-too-large":   "collector: TestOpenAPICollectorAnswers (a batch bound below one event)",
	"body-timeout":      "collector: TestOpenAPICollectorAnswers (a body slower than the read timeout)",
	"spool-full":        "collector: TestOpenAPICollectorAnswers (NATS away, a small spool)",
	"overloaded":        "collector: TestOpenAPICollectorAnswers (the in-flight body budget held)",
	"blocklist-stale":   "collector: TestOpenAPICollectorAnswers (a stale gate under the deny policy)",
	"unavailable":       "collector: TestOpenAPICollectorAnswers (a check while the collector shuts down)",
	"not-ready":         "internal/serve: TestOpenAPIServe (a failing readiness check)",
	"store-unavailable": "aggregator/report: TestOpenAPIReportStoreDown (a store that fails)",
	"internal":          "none: only an encoding failure (a bug) answers it; api's TestProblemTypes checks its schema against the table",
}

// record notes the operation vreq matched and the problem type a carried.
func (v *Validator) record(req *http.Request, a Answer) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if path, ok := v.match(req); ok {
		v.covered[req.Method+" "+path] = true
	}
	if strings.HasPrefix(a.Header.Get("Content-Type"), schemas.MediaProblem) {
		var p struct{ Type string }
		if json.Unmarshal(a.Body, &p) == nil {
			v.problems[slugOf(p.Type)] = true
		}
	}
}

// slugOf returns the slug of the problem type whose URI is uri, or "".
func slugOf(uri string) string {
	for _, t := range schemas.ProblemTypes() {
		if t.URI() == uri {
			return t.Slug()
		}
	}
	return ""
}

// match finds the document's path template of req.
func (v *Validator) match(req *http.Request) (string, bool) {
	for tmpl, item := range v.model.Paths.PathItems.FromOldest() {
		if templateMatches(tmpl, req.URL.Path) && item.GetOperations().GetOrZero(strings.ToLower(req.Method)) != nil {
			return tmpl, true
		}
	}
	return "", false
}

// templateMatches reports whether path fits tmpl, a {param} standing for
// one segment.
func templateMatches(tmpl, path string) bool {
	ts, ps := strings.Split(tmpl, "/"), strings.Split(path, "/")
	if len(ts) != len(ps) {
		return false
	}
	for i := range ts {
		if !(strings.HasPrefix(ts[i], "{") && ps[i] != "") && ts[i] != ps[i] {
			return false
		}
	}
	return true
}

// ValidateComponentResponse checks an answer against the document's
// response component name (NotFound, MethodNotAllowed: the answers to
// requests no operation describes): its required headers and its
// problem+json body.
func (v *Validator) ValidateComponentResponse(t testing.TB, name string, a Answer) {
	t.Helper()
	r := v.model.Components.Responses.GetOrZero(name)
	if r == nil {
		t.Fatalf("api/openapi.yaml has no response component %s", name)
	}
	for h, hdr := range r.Headers.FromOldest() {
		if hdr.Required && a.Header.Get(h) == "" {
			t.Errorf("%s: header %s missing", name, h)
		}
	}
	mt := r.Content.GetOrZero(schemas.MediaProblem)
	if mt == nil {
		t.Fatalf("response component %s has no %s body", name, schemas.MediaProblem)
	}
	if ct := a.Header.Get("Content-Type"); ct != schemas.MediaProblem {
		t.Errorf("%s: Content-Type %q, want %s", name, ct, schemas.MediaProblem)
	}
	if ok, errs := v.schema.ValidateSchemaBytes(mt.Schema.Schema(), a.Body); !ok {
		t.Errorf("%s: the body does not conform:\n%s\nbody: %s", name, describe(errs), a.Body)
	}
	v.mu.Lock()
	var p struct{ Type string }
	if json.Unmarshal(a.Body, &p) == nil {
		v.problems[slugOf(p.Type)] = true
	}
	v.mu.Unlock()
}

// Operations returns "METHOD path" of every operation of the document.
func (v *Validator) Operations() []string {
	var ops []string
	for path, item := range v.model.Paths.PathItems.FromOldest() {
		for method := range item.GetOperations().FromOldest() {
			ops = append(ops, strings.ToUpper(method)+" "+path)
		}
	}
	slices.Sort(ops)
	return ops
}

// Covered reports whether an exchange matched the operation "METHOD path".
func (v *Validator) Covered(op string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.covered[op]
}

// Problems returns the slugs of the problem types the exchanges answered.
func (v *Validator) Problems() map[string]bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make(map[string]bool, len(v.problems))
	for k := range v.problems {
		out[k] = true
	}
	return out
}

func describe(errs []*liberrors.ValidationError) string {
	var b strings.Builder
	for _, e := range errs {
		fmt.Fprintf(&b, "  - %s: %s\n", e.Message, e.Reason)
		for _, f := range e.SchemaValidationErrors {
			fmt.Fprintf(&b, "      %s (at %s)\n", f.Reason, f.FieldPath)
		}
	}
	return b.String()
}
