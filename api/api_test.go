package api

import (
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/pb33f/libopenapi"
	validator "github.com/pb33f/libopenapi-validator"
	"gopkg.in/yaml.v3"

	"github.com/meterd/meterd/schemas"
)

// raw is the document read as plain data, for the checks the model does
// not make easy.
func raw(t *testing.T) map[string]any {
	t.Helper()
	var doc map[string]any
	if err := yaml.Unmarshal(Document(), &doc); err != nil {
		t.Fatalf("api/openapi.yaml is not YAML: %v", err)
	}
	return doc
}

func get(t *testing.T, v any, path ...string) any {
	t.Helper()
	for _, p := range path {
		m, ok := v.(map[string]any)
		if !ok {
			t.Fatalf("api/openapi.yaml: %s is not an object", strings.Join(path, "."))
		}
		if v, ok = m[p]; !ok {
			t.Fatalf("api/openapi.yaml: no %s", strings.Join(path, "."))
		}
	}
	return v
}

// The document is OpenAPI 3.1 and valid against the specification's schema.
func TestDocumentValid(t *testing.T) {
	doc, err := libopenapi.NewDocument(Document())
	if err != nil {
		t.Fatal(err)
	}
	if v := doc.GetVersion(); !strings.HasPrefix(v, "3.1") {
		t.Fatalf("openapi %s, want 3.1", v)
	}
	v, errs := validator.NewValidator(doc)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	if ok, verrs := v.ValidateDocument(); !ok {
		for _, e := range verrs {
			t.Errorf("%s: %s", e.Message, e.Reason)
			for _, se := range e.SchemaValidationErrors {
				t.Errorf("  %s at %s", se.Reason, se.FieldPath)
			}
		}
	}
}

// The Event schema of the document is schemas/event.schema.json, member for
// member, so the two cannot drift.
func TestEventSchema(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "schemas", "event.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	var want any
	if err := json.Unmarshal(b, &want); err != nil {
		t.Fatal(err)
	}
	got := normalize(get(t, raw(t), "components", "schemas", "Event"))
	if !reflect.DeepEqual(got, normalize(want)) {
		gb, _ := json.MarshalIndent(got, "", "  ")
		t.Errorf("components.schemas.Event differs from schemas/event.schema.json; copy the file into the document. The document has:\n%s", gb)
	}
}

// normalize makes numbers float64, as encoding/json reads them.
func normalize(v any) any {
	b, _ := json.Marshal(v)
	var out any
	json.Unmarshal(b, &out)
	return out
}

// Every problem type of the table has its schema, Problem<Name>, with the
// table's type URI, status and title as constants and its "when" as the
// description; the document has no other problem type; and every one is
// an answer of an operation or of a response component.
func TestProblemTypes(t *testing.T) {
	doc := raw(t)
	comps := get(t, doc, "components", "schemas").(map[string]any)
	want := map[string]bool{}
	for _, pt := range schemas.ProblemTypes() {
		name := SchemaName(pt)
		want[name] = true
		s, ok := comps[name].(map[string]any)
		if !ok {
			t.Errorf("no components.schemas.%s for problem type %s", name, pt.Slug())
			continue
		}
		props := get(t, s, "properties").(map[string]any)
		if c := get(t, props, "type", "const"); c != pt.URI() {
			t.Errorf("%s: type const %v, want %s", name, c, pt.URI())
		}
		if c := get(t, props, "status", "const"); c != pt.Status() {
			t.Errorf("%s: status const %v, want %d", name, c, pt.Status())
		}
		if c := get(t, props, "title", "const"); c != pt.Title() {
			t.Errorf("%s: title const %v, want %s", name, c, pt.Title())
		}
		if d := s["description"]; d != pt.When() {
			t.Errorf("%s: description %q, want the table's %q", name, d, pt.When())
		}
	}
	for name := range comps {
		if strings.HasPrefix(name, "Problem") && name != "Problem" && !want[name] {
			t.Errorf("components.schemas.%s is not a problem type of schemas/problem_types.go", name)
		}
	}
	// Referenced: a response of a path, or a response component.
	var refs []string
	collectRefs(get(t, doc, "paths"), &refs)
	collectRefs(get(t, doc, "components", "responses"), &refs)
	for i := 0; i < len(refs); i++ { // follow response components to their schemas
		if name, ok := strings.CutPrefix(refs[i], "#/components/responses/"); ok {
			collectRefs(get(t, doc, "components", "responses", name), &refs)
		}
	}
	for _, pt := range schemas.ProblemTypes() {
		if !slices.Contains(refs, "#/components/schemas/"+SchemaName(pt)) {
			t.Errorf("problem type %s: no response refers to %s", pt.Slug(), SchemaName(pt))
		}
	}
}

// SchemaName is the document's schema of the problem type t: Problem and
// its slug in camel case, as the Go constant is named.
func SchemaName(t schemas.ProblemType) string {
	var b strings.Builder
	b.WriteString("Problem")
	for part := range strings.SplitSeq(t.Slug(), "-") {
		b.WriteString(strings.ToUpper(part[:1]) + part[1:])
	}
	return b.String()
}

func collectRefs(v any, refs *[]string) {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			if s, ok := e.(string); ok && k == "$ref" {
				*refs = append(*refs, s)
			}
			collectRefs(e, refs)
		}
	case []any:
		for _, e := range v {
			collectRefs(e, refs)
		}
	}
}

// methods are the methods a pattern without one (any method) must list.
var methods = []string{"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}

// Every route a mux of the repository registers (a pattern literal given to
// Handle or HandleFunc in non-test code) is an operation of the document,
// and every operation is such a route: a handler added, removed or moved
// without the document fails here.
func TestRoutesDocumented(t *testing.T) {
	registered := map[string]string{} // "METHOD path" → where
	fset := token.NewFileSet()
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) && path != ".." {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok || len(call.Args) != 2 {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok || (sel.Sel.Name != "Handle" && sel.Sel.Name != "HandleFunc") {
				return true
			}
			if _, ok := call.Args[0].(*ast.BinaryExpr); ok {
				t.Errorf("%s: a route whose pattern is not a literal; write it as one so this test can read it", fset.Position(call.Pos()))
				return true
			}
			lit, ok := call.Args[0].(*ast.BasicLit)
			if !ok || lit.Kind != token.STRING {
				return true // not a route (slog's Handle(ctx, record))
			}
			pattern, _ := strconv.Unquote(lit.Value)
			if !strings.HasPrefix(pattern, "/") && !strings.Contains(pattern, " /") {
				return true
			}
			for _, op := range operationsOf(pattern) {
				registered[op] = fset.Position(call.Pos()).String()
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(registered) < 10 {
		t.Fatalf("found only %d routes: %v", len(registered), registered)
	}
	documented := map[string]bool{}
	for path, item := range get(t, raw(t), "paths").(map[string]any) {
		for m := range item.(map[string]any) {
			if slices.Contains(methods, strings.ToUpper(m)) {
				documented[strings.ToUpper(m)+" "+path] = true
			}
		}
	}
	for op, where := range registered {
		if !documented[op] {
			t.Errorf("%s registers %s; api/openapi.yaml does not describe it", where, op)
		}
	}
	for op := range documented {
		if _, ok := registered[op]; !ok {
			t.Errorf("api/openapi.yaml describes %s; no mux registers it", op)
		}
	}
}

// operationsOf returns the document's "METHOD path" of a ServeMux pattern:
// a pattern without a method stands for every method, and a subtree
// pattern ("/v1/check/") for the path with one more segment, {path}.
func operationsOf(pattern string) []string {
	method, path, ok := strings.Cut(pattern, " ")
	if !ok {
		method, path = "", pattern
	}
	if strings.HasSuffix(path, "/") {
		path += "{path}"
	}
	if method != "" {
		return []string{method + " " + path}
	}
	var ops []string
	for _, m := range methods {
		ops = append(ops, m+" "+path)
	}
	return ops
}

// The limits the document states are the code's (the Event schema's are
// checked with schemas/event.schema.json by TestEventSchema).
func TestLimits(t *testing.T) {
	doc := raw(t)
	s := func(path ...string) any { return get(t, doc, append([]string{"components"}, path...)...) }
	for _, c := range []struct {
		what string
		got  any
		want int
	}{
		{"X-Meter-Value maximum", s("parameters", "CheckValue", "schema", "maximum"), schemas.MaxValue},
		{"CloudEvent data.value maximum", s("schemas", "CloudEventData", "properties", "value", "maximum"), schemas.MaxValue},
		{"CloudEvent data members (value and the dimensions)", s("schemas", "CloudEventData", "maxProperties"), schemas.MaxDimensions + 1},
		{"CloudEvent dimension value length", s("schemas", "CloudEventData", "additionalProperties", "oneOf").([]any)[0].(map[string]any)["maxLength"], schemas.MaxDimensionValueLen},
		{"tenant name length", s("schemas", "TenantName", "maxLength"), schemas.MaxTenantLen},
		{"group_by dimensions", groupBy(t, doc)["maxItems"], schemas.MaxDimensions},
	} {
		if c.got != c.want {
			t.Errorf("%s: the document says %v, the code %d", c.what, c.got, c.want)
		}
	}
}

// groupBy returns the schema of GET /v1/usage's group_by parameter.
func groupBy(t *testing.T, doc map[string]any) map[string]any {
	for _, p := range get(t, doc, "paths", "/v1/usage", "get", "parameters").([]any) {
		if p := p.(map[string]any); p["name"] == "group_by" {
			return p["schema"].(map[string]any)
		}
	}
	t.Fatal("GET /v1/usage has no group_by parameter")
	return nil
}
