package cli

import (
	"bytes"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestUsageTableSaturated: a row whose sums went beyond int64 reads
// math.MaxInt64 with "saturated" in the answer; the table says that the
// usage is at least that, for the sum that saturated only.
func TestUsageTableSaturated(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"window":"day","from":"2026-01-01T00:00:00Z","to":"2026-01-02T00:00:00Z","group_by":[],"rows":[
{"tenant":"acme","meter":"tokens","window_start":"2026-01-01T00:00:00Z","window_end":"2026-01-02T00:00:00Z","value":9223372036854775807,"events":3,"saturated":true,"dimensions":{}},
{"tenant":"globex","meter":"tokens","window_start":"2026-01-01T00:00:00Z","window_end":"2026-01-02T00:00:00Z","value":9223372036854775807,"events":4,"dimensions":{}}]}
`))
	}))
	defer srv.Close()
	var out, errOut bytes.Buffer
	if err := Usage(t.Context(), []string{"--url", srv.URL, "--api-key", "k"}, &out, &errOut); err != nil {
		t.Fatalf("%v: %s", err, errOut.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines, want a header and 2 rows:\n%s", len(lines), out.String())
	}
	if f := strings.Fields(lines[1]); f[0] != "acme" || strings.Join(f[4:], " ") != "≥ 9,223,372,036,854,775,807 3" {
		t.Errorf("saturated row = %q, want its value at least 9,223,372,036,854,775,807 and 3 events", lines[1])
	}
	if f := strings.Fields(lines[2]); f[0] != "globex" || strings.Join(f[4:], " ") != "9,223,372,036,854,775,807 4" {
		t.Errorf("exact row = %q, want 9,223,372,036,854,775,807 and 4 events", lines[2])
	}
}

// TestAtLeastCell: the table marks a saturated sum, CSV keeps the number a
// script reads, and meterd usage summary marks a saturated meter's usage.
func TestAtLeastCell(t *testing.T) {
	tbl := Table{Columns: []Column{Col("used")}}
	tbl.Add(AtLeast(math.MaxInt64))
	for format, want := range map[string]string{
		"table": "USED\n≥ 9,223,372,036,854,775,807\n",
		"csv":   "used\n9223372036854775807\n",
	} {
		var b strings.Builder
		if err := tbl.Print(&b, format); err != nil || b.String() != want {
			t.Errorf("%s: %q, %v; want %q", format, b.String(), err, want)
		}
	}

	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"tenants":[{"tenant":"acme","plan":"pro","period_start":"2026-01-01T00:00:00Z","period_end":"2026-02-01T00:00:00Z",
"billing_status":"active","status":"ok","usage_seeded":true,"meters":[
{"meter":"tokens","used":9223372036854775807,"saturated":true,"status":"ok"},{"meter":"calls","used":12,"status":"ok"}]}]}
`))
	}))
	defer srv.Close()
	for format, want := range map[string][]string{
		"table": {"≥ 9,223,372,036,854,775,807", " 12 "},
		"csv":   {",tokens,9223372036854775807,", ",calls,12,"},
	} {
		var out, errOut bytes.Buffer
		if err := Summary(t.Context(), []string{"--url", srv.URL, "--api-key", "k", "--format", format}, &out, &errOut); err != nil {
			t.Fatalf("%v: %s", err, errOut.String())
		}
		for _, w := range want {
			if !strings.Contains(out.String(), w) {
				t.Errorf("summary as %s lacks %q:\n%s", format, w, out.String())
			}
		}
	}
}
