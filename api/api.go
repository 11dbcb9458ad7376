// Package api holds the OpenAPI 3.1 description of every meterd HTTP API
// (openapi.yaml), embedded so every process serves the document of the
// code it runs at GET /openapi.yaml, and clients can be generated from it.
// The tests of the handlers validate their real requests and answers
// against it (api/apitest), so it cannot drift from them.
package api

import (
	_ "embed"
	"net/http"
	"strconv"
)

// MediaYAML is the media type of the document (RFC 9512).
const MediaYAML = "application/yaml"

//go:embed openapi.yaml
var document []byte

// Document returns the OpenAPI document. The slice is shared: do not
// modify it.
func Document() []byte { return document }

// Handler serves the document.
func Handler() http.Handler {
	length := strconv.Itoa(len(document))
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		h := w.Header()
		h.Set("Content-Type", MediaYAML)
		h.Set("Content-Length", length)
		h.Set("Cache-Control", "no-cache")
		w.Write(document)
	})
}
