package serve

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// A degraded check is listed but keeps /readyz at 200; a failing one makes
// it 503.
func TestReadyzDegraded(t *testing.T) {
	for _, tc := range []struct {
		name   string
		err    error
		status int
		want   string
	}{
		{"ok", nil, http.StatusOK, "ok"},
		{"degraded", Degraded(errors.New("2 batches set aside")), http.StatusOK, "degraded: 2 batches set aside"},
		{"failing", errors.New("nats disconnected and spool full"), http.StatusServiceUnavailable, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mux := NewMux(prometheus.NewRegistry(), map[string]ReadyFunc{
				"collector": func(context.Context) error { return tc.err },
				"gate":      func(context.Context) error { return nil },
			})
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d: %s", rec.Code, tc.status, rec.Body)
			}
			if tc.want == "" {
				return
			}
			var status map[string]string
			if err := json.Unmarshal(rec.Body.Bytes(), &status); err != nil {
				t.Fatal(err)
			}
			if status["collector"] != tc.want || status["gate"] != "ok" {
				t.Fatalf("body %v, want collector %q", status, tc.want)
			}
		})
	}
}
