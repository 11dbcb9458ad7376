package cli

import (
	"bytes"
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
