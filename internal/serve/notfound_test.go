package serve

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/meterd/meterd/schemas"
)

// Every request no route takes is a problem whose type has its status: 405
// with Allow for a known path and another method, else 404 not-found — also
// for an unclean path, which the mux alone would redirect to a path that
// does not exist either.
func TestNotFoundProblems(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/x", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	h := NotFound(mux)
	for _, tc := range []struct {
		method, target string
		status         int
		typ            string
		allow          string
	}{
		{"GET", "/v1/x", http.StatusNoContent, "", ""},
		{"GET", "/nope", http.StatusNotFound, "https://meterd.dev/problems/not-found", ""},
		{"POST", "/v1/x", http.StatusMethodNotAllowed, "https://meterd.dev/problems/method-not-allowed", "GET, HEAD"},
		{"GET", "//nope", http.StatusNotFound, "https://meterd.dev/problems/not-found", ""},
		{"GET", "/a/../nope", http.StatusNotFound, "https://meterd.dev/problems/not-found", ""},
	} {
		rec := httptest.NewRecorder()
		r := httptest.NewRequest(tc.method, "http://meterd"+tc.target, nil)
		r.URL.Path, r.RequestURI = tc.target, tc.target // keep the path unclean
		h.ServeHTTP(rec, r)
		if rec.Code != tc.status || rec.Header().Get("Allow") != tc.allow || rec.Header().Get("Location") != "" {
			t.Errorf("%s %s: status %d, Allow %q, Location %q; want %d, %q, none",
				tc.method, tc.target, rec.Code, rec.Header().Get("Allow"), rec.Header().Get("Location"), tc.status, tc.allow)
		}
		if tc.typ == "" {
			continue
		}
		var p schemas.Problem
		if err := json.Unmarshal(rec.Body.Bytes(), &p); err != nil || p.Type != tc.typ || p.Status != tc.status ||
			rec.Header().Get("Content-Type") != schemas.MediaProblem {
			t.Errorf("%s %s: %v, body %s, Content-Type %q", tc.method, tc.target, err, rec.Body, rec.Header().Get("Content-Type"))
		}
	}
}
