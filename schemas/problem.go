package schemas

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// MediaProblem is the media type of every meterd HTTP error (RFC 9457).
const MediaProblem = "application/problem+json"

// ProblemBase prefixes every problem type URI.
const ProblemBase = "https://meterd.dev/problems/"

// Problem is an RFC 9457 problem details body. Errors lists per-event field
// errors (422); Block carries the 402 members of docs/architecture.md#http-apis.
type Problem struct {
	Type     string       `json:"type"`
	Title    string       `json:"title"`
	Status   int          `json:"status"`
	Detail   string       `json:"detail,omitempty"`
	Instance string       `json:"instance,omitempty"`
	Errors   []FieldError `json:"errors,omitempty"`
	// InvalidParams lists the query parameters of a 400 answer that are
	// wrong, each with why (the "invalid-params" extension of RFC 9457).
	InvalidParams []InvalidParam `json:"invalid_params,omitempty"`
	*Block
}

// Block is the machine-readable part of a 402 answer, and the reason of
// the gate's stale 503.
type Block struct {
	Reason Reason `json:"reason"`
	// Tenant is left out only by the gate's stale block (503), which is
	// for no tenant in particular; every 402 names its tenant.
	Tenant     string     `json:"tenant,omitempty"`
	Meter      string     `json:"meter,omitempty"`
	Limit      *int64     `json:"limit,omitempty"`
	Used       *int64     `json:"used,omitempty"`
	PeriodEnd  *time.Time `json:"period_end,omitempty"`
	BillingURL string     `json:"billing_url,omitempty"`
}

// InvalidParam names a wrong request parameter and says why it is wrong.
type InvalidParam struct {
	Name   string `json:"name"`
	Reason string `json:"reason"`
}

// ParseQuery parses a URL's raw query string as url.ParseQuery does, except
// that no parameter is dropped silently: a pair whose name or value is not
// valid percent-encoding, or that holds a semicolon, is returned in bad,
// named by its decoded name (by the name as sent when that cannot be
// decoded). (*url.URL).Query drops such a pair, so /v1/usage?tenant=%zz
// read as no tenant at all and gave an admin every tenant's report; a
// handler answers a non-empty bad with NewInvalidParams instead.
func ParseQuery(raw string) (v url.Values, bad []InvalidParam) {
	v = url.Values{}
	for raw != "" {
		var pair string
		pair, raw, _ = strings.Cut(raw, "&")
		if pair == "" {
			continue
		}
		rawName, rawValue, _ := strings.Cut(pair, "=")
		name, err := url.QueryUnescape(rawName)
		if err != nil {
			bad = append(bad, InvalidParam{Name: rawName, Reason: "the name is not valid percent-encoding (% must be followed by two hex digits)"})
			continue
		}
		if strings.Contains(pair, ";") {
			bad = append(bad, InvalidParam{Name: name, Reason: "holds a semicolon; separate parameters with & and send a ; in a value as %3B"})
			continue
		}
		value, err := url.QueryUnescape(rawValue)
		if err != nil {
			bad = append(bad, InvalidParam{Name: name, Reason: "the value is not valid percent-encoding (% must be followed by two hex digits)"})
			continue
		}
		v[name] = append(v[name], value)
	}
	return v, bad
}

// NewInvalidParams returns the 400 problem naming every wrong request
// parameter of bad, each with its reason, in the detail and in
// InvalidParams.
func NewInvalidParams(bad []InvalidParam) *Problem {
	parts := make([]string, len(bad))
	for i, b := range bad {
		parts[i] = b.Name + ": " + b.Reason
	}
	p := NewProblem(ProblemInvalidParameter, "invalid parameters: "+strings.Join(parts, "; "))
	p.InvalidParams = bad
	return p
}

// NewProblem returns a problem of type t: its URI, title and status from
// the table of problem types, and detail, the sentence a person reads.
func NewProblem(t ProblemType, detail string) *Problem {
	info := t.info()
	return &Problem{Type: ProblemBase + info.slug, Title: info.title, Status: info.status, Detail: detail}
}

// Write sends p as the response with Content-Type application/problem+json.
// Headers the caller set on w (Retry-After, Link, …) are kept.
func (p *Problem) Write(w http.ResponseWriter) {
	body, err := json.Marshal(p)
	if err != nil { // cannot happen for these field types; keep the status anyway
		body = []byte(`{"title":"` + http.StatusText(p.Status) + `"}`)
	}
	// A known length lets the client read the whole answer while the
	// handler still runs (the collector discards an unread body after it).
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	WriteRendered(w, p.Status, body)
}

// Render encodes p once, for an answer sent many times (the gate's 402s):
// without HTML escaping, so billing URLs stay readable in the body.
func (p *Problem) Render() ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(p); err != nil {
		return nil, fmt.Errorf("encode problem: %w", err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// WriteRendered sends body, a problem Render or Write encoded, with status
// and the problem headers. Headers the caller set on w are kept. It
// allocates nothing beyond what setting two headers costs, so a gate can
// answer a prerendered 402 on its hot path.
func WriteRendered(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h.Set("Content-Type", MediaProblem)
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	w.Write(body)
}
