package schemas

import (
	"encoding/json"
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

// Block is the machine-readable part of a 402 answer.
type Block struct {
	Reason     Reason     `json:"reason"`
	Tenant     string     `json:"tenant"`
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
	p := NewProblem(http.StatusBadRequest, "invalid-parameter", "invalid parameters: "+strings.Join(parts, "; "))
	p.InvalidParams = bad
	return p
}

// NewProblem returns a problem of type ProblemBase+slug with the status's text
// as title.
func NewProblem(status int, slug, detail string) *Problem {
	return &Problem{Type: ProblemBase + slug, Title: http.StatusText(status), Status: status, Detail: detail}
}

// Write sends p as the response with Content-Type application/problem+json.
// Headers the caller set on w (Retry-After, Link, …) are kept.
func (p *Problem) Write(w http.ResponseWriter) {
	body, err := json.Marshal(p)
	if err != nil { // cannot happen for these field types; keep the status anyway
		body = []byte(`{"title":"` + http.StatusText(p.Status) + `"}`)
	}
	h := w.Header()
	h.Set("Content-Type", MediaProblem)
	h.Set("X-Content-Type-Options", "nosniff")
	// A known length lets the client read the whole answer while the
	// handler still runs (the collector discards an unread body after it).
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(p.Status)
	w.Write(body)
}
