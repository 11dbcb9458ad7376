package serve

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/meterd/meterd/api"
	"github.com/meterd/meterd/api/apitest"
)

// The endpoints every process shares answer as api/openapi.yaml says:
// /healthz, /readyz ready, degraded and not ready (503 not-ready), /metrics,
// and /openapi.yaml, which serves the embedded document itself.
func TestOpenAPIServe(t *testing.T) {
	v := apitest.New(t)
	down := false
	mux := NewMux(NewRegistry(), map[string]ReadyFunc{
		"nats": func(context.Context) error { return Degraded("nats: reconnecting, spooling") },
		"store": func(context.Context) error {
			if down {
				return errors.New("store: connection refused")
			}
			return nil
		},
	})
	srv := httptest.NewServer(NotFound(mux))
	t.Cleanup(srv.Close)
	get := func(name, path string, status int, problem string) apitest.Answer {
		return v.Do(t, srv.Client(), apitest.Exchange{Name: name, Method: http.MethodGet, URL: srv.URL + path, Status: status, Problem: problem, Conforms: true})
	}
	get("healthz", "/healthz", 200, "")
	get("readyz, degraded", "/readyz", 200, "")
	down = true
	get("readyz, not ready", "/readyz", 503, "not-ready")
	get("metrics", "/metrics", 200, "")
	a := get("the document", "/openapi.yaml", 200, "")
	if !bytes.Equal(a.Body, api.Document()) || a.Header.Get("Content-Type") != api.MediaYAML {
		t.Errorf("GET /openapi.yaml: %s, %d bytes; want %s and the embedded document", a.Header.Get("Content-Type"), len(a.Body), api.MediaYAML)
	}
}
