package schemas

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// Media types POST /v1/events accepts (DESIGN §3.4).
const (
	MediaJSON               = "application/json"
	MediaNDJSON             = "application/x-ndjson"
	MediaJSONLines          = "application/jsonl"
	MediaCloudEvent         = "application/cloudevents+json"
	MediaCloudEventsBatch   = "application/cloudevents-batch+json"
	cloudEventsSpecVersion  = "1.0"
	maxCloudEventsDataValue = 256
)

// ErrUnsupportedMediaType is returned by DecodeEvents for a media type it
// does not read.
var ErrUnsupportedMediaType = errors.New("schemas: unsupported media type")

// ErrNoEvents is returned by DecodeEvents for a well-formed body without events.
var ErrNoEvents = errors.New("schemas: body holds no events")

// SyntaxError is a body that is not well-formed for its media type; the
// request is answered 400.
type SyntaxError struct{ Msg string }

func (e *SyntaxError) Error() string { return "schemas: malformed body: " + e.Msg }

// Decoded is the outcome of decoding a request body: the events in order, and
// the per-event errors found while decoding (wrong types, unknown fields).
// Events[i] is only meaningful when no error names index i.
type Decoded struct {
	Events []Event
	Errors []FieldError
}

// DecodeEvents reads the events of a POST /v1/events body of the given media
// type (parameters such as charset are ignored). Events without a value get 1.
// It returns a *SyntaxError for a malformed body, ErrNoEvents for none, and
// ErrUnsupportedMediaType for a media type it does not read.
func DecodeEvents(mediaType string, body []byte) (Decoded, error) {
	if i := strings.IndexByte(mediaType, ';'); i >= 0 {
		mediaType = mediaType[:i]
	}
	mediaType = strings.ToLower(strings.TrimSpace(mediaType))
	var d Decoded
	var err error
	switch mediaType {
	case MediaJSON, "":
		err = decodeJSON(body, &d, decodeEvent)
	case MediaNDJSON, MediaJSONLines:
		err = decodeStream(body, &d, decodeEvent)
	case MediaCloudEvent:
		err = decodeOne(body, &d, decodeCloudEvent)
	case MediaCloudEventsBatch:
		err = decodeArray(body, &d, decodeCloudEvent)
	default:
		return d, fmt.Errorf("%w %q", ErrUnsupportedMediaType, mediaType)
	}
	if err == nil && len(d.Events) == 0 {
		err = ErrNoEvents
	}
	return d, err
}

// elementDecoder decodes the next JSON value of dec as an event of index i.
// It returns a field error (nil event) for a well-formed value of the wrong
// shape, and a *SyntaxError for a malformed one.
type elementDecoder func(dec *json.Decoder, i int, d *Decoded) error

// decodeJSON reads one event object or an array of them.
func decodeJSON(body []byte, d *Decoded, el elementDecoder) error {
	switch firstByte(body) {
	case '[':
		return decodeArray(body, d, el)
	case '{':
		return decodeOne(body, d, el)
	case 0:
		return ErrNoEvents
	default:
		return &SyntaxError{Msg: "expected a JSON object or array"}
	}
}

func decodeOne(body []byte, d *Decoded, el elementDecoder) error {
	if firstByte(body) != '{' {
		return &SyntaxError{Msg: "expected a JSON object"}
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := el(dec, 0, d); err != nil {
		return err
	}
	return expectEOF(dec)
}

func decodeArray(body []byte, d *Decoded, el elementDecoder) error {
	if firstByte(body) != '[' {
		return &SyntaxError{Msg: "expected a JSON array"}
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if _, err := dec.Token(); err != nil {
		return syntaxError(err)
	}
	d.Events = make([]Event, 0, bytes.Count(body, []byte(`"id"`)))
	for i := 0; dec.More(); i++ {
		if err := el(dec, i, d); err != nil {
			return err
		}
	}
	if _, err := dec.Token(); err != nil {
		return syntaxError(err)
	}
	return expectEOF(dec)
}

// decodeStream reads newline-delimited (or any whitespace-separated) objects.
func decodeStream(body []byte, d *Decoded, el elementDecoder) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	d.Events = make([]Event, 0, bytes.Count(body, []byte{'\n'})+1)
	for i := 0; ; i++ {
		if err := el(dec, i, d); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}

func expectEOF(dec *json.Decoder) error {
	if _, err := dec.Token(); err != io.EOF {
		return &SyntaxError{Msg: "unexpected data after the JSON value"}
	}
	return nil
}

func firstByte(b []byte) byte {
	for _, c := range b {
		switch c {
		case ' ', '\t', '\r', '\n':
			continue
		}
		return c
	}
	return 0
}

// syntaxError turns a json decoding failure into a *SyntaxError (io.EOF is
// passed through to end a stream).
func syntaxError(err error) error {
	if err == io.EOF {
		return err
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return &SyntaxError{Msg: "unexpected end of body"}
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return &SyntaxError{Msg: fmt.Sprintf("%s at byte %d", se.Error(), se.Offset)}
	}
	return &SyntaxError{Msg: err.Error()}
}

// fieldError classifies an error of json.Decoder.Decode: shape errors become a
// FieldError of event i (the decoder stays usable), anything else is returned.
func fieldError(err error, i int, prefix string) (FieldError, error) {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		field := te.Field
		if field == "" {
			return FieldError{Index: i, Field: prefix, Message: "must be a JSON object"}, nil
		}
		return FieldError{Index: i, Field: prefix + field, Message: "must be " + jsonKind(te.Type.Kind().String())}, nil
	}
	if msg := err.Error(); strings.HasPrefix(msg, "json: unknown field ") {
		name, _ := strconv.Unquote(strings.TrimPrefix(msg, "json: unknown field "))
		return FieldError{Index: i, Field: prefix + name, Message: "is not a known field"}, nil
	}
	return FieldError{}, syntaxError(err)
}

func jsonKind(goKind string) string {
	switch goKind {
	case "string":
		return "a string"
	case "map", "struct":
		return "an object"
	case "slice":
		return "a byte string"
	default:
		return "a " + goKind
	}
}

// wireEvent is the JSON shape of an incoming event. Value stays raw so an
// absent value (default 1), a fraction and a string are told apart.
type wireEvent struct {
	ID         string            `json:"id"`
	Tenant     string            `json:"tenant"`
	Meter      string            `json:"meter"`
	Value      json.RawMessage   `json:"value"`
	Time       string            `json:"time"`
	Dimensions map[string]string `json:"dimensions"`
}

func decodeEvent(dec *json.Decoder, i int, d *Decoded) error {
	dec.DisallowUnknownFields()
	var w wireEvent
	if err := dec.Decode(&w); err != nil {
		fe, err := fieldError(err, i, "")
		if err != nil {
			return err
		}
		d.Errors = append(d.Errors, fe)
		d.Events = append(d.Events, Event{})
		return nil
	}
	e := Event{ID: w.ID, Tenant: w.Tenant, Meter: w.Meter, Dimensions: w.Dimensions}
	var ok bool
	if e.Value, ok = parseValue(w.Value); !ok {
		d.Errors = append(d.Errors, FieldError{Index: i, Field: "value", Message: "must be a non-negative integer"})
	}
	if w.Time != "" {
		t, err := time.Parse(time.RFC3339Nano, w.Time)
		if err != nil {
			d.Errors = append(d.Errors, FieldError{Index: i, Field: "time", Message: "must be an RFC 3339 timestamp"})
		}
		e.Time = t.UTC()
	}
	d.Events = append(d.Events, e)
	return nil
}

// parseValue reads an event value: absent means 1; otherwise a JSON number
// ≥ 0 with an integral value that fits int64. As in JSON Schema, 2.0 and 1e3
// are integers; 1.5, a string and null are not. The arithmetic is exact.
func parseValue(raw json.RawMessage) (int64, bool) {
	if len(raw) == 0 {
		return 1, true
	}
	s := string(raw)
	neg := strings.HasPrefix(s, "-")
	if neg {
		s = s[1:]
	}
	mant, exp := s, 0
	if i := strings.IndexAny(s, "eE"); i >= 0 {
		e, err := strconv.Atoi(s[i+1:])
		if err != nil || e > 64 || e < -400 {
			return 0, false
		}
		mant, exp = s[:i], e
	}
	intPart, frac := mant, ""
	if i := strings.IndexByte(mant, '.'); i >= 0 {
		intPart, frac = mant[:i], mant[i+1:]
	}
	if intPart == "" || !allDigits(intPart) || !allDigits(frac) || (len(intPart) > 1 && intPart[0] == '0') {
		return 0, false
	}
	digits := strings.TrimLeft(intPart+frac, "0")
	exp -= len(frac)
	for exp < 0 && strings.HasSuffix(digits, "0") {
		digits, exp = digits[:len(digits)-1], exp+1
	}
	if digits == "" {
		return 0, true // zero, also written -0 or 0.0e5
	}
	if neg || exp < 0 || len(digits)+exp > 19 {
		return 0, false
	}
	v, err := strconv.ParseInt(digits+strings.Repeat("0", exp), 10, 64)
	return v, err == nil
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// wireCloudEvent is a CloudEvents 1.0 structured-mode event. Extension
// attributes are ignored.
type wireCloudEvent struct {
	SpecVersion     string                     `json:"specversion"`
	ID              string                     `json:"id"`
	Source          string                     `json:"source"`
	Type            string                     `json:"type"`
	Subject         string                     `json:"subject"`
	Time            string                     `json:"time"`
	DataContentType string                     `json:"datacontenttype"`
	Data            map[string]json.RawMessage `json:"data"`
}

// decodeCloudEvent maps id, subject→tenant, type→meter, time, data.value and
// the other data keys → dimensions (DESIGN §3.1).
func decodeCloudEvent(dec *json.Decoder, i int, d *Decoded) error {
	var w wireCloudEvent
	if err := dec.Decode(&w); err != nil {
		fe, err := fieldError(err, i, "")
		if err != nil {
			return err
		}
		d.Errors = append(d.Errors, fe)
		d.Events = append(d.Events, Event{})
		return nil
	}
	bad := func(field, msg string) {
		d.Errors = append(d.Errors, FieldError{Index: i, Field: field, Message: msg})
	}
	if w.SpecVersion != cloudEventsSpecVersion {
		bad("specversion", `must be "1.0"`)
	}
	if w.Source == "" {
		bad("source", "is required")
	}
	if ct := w.DataContentType; ct != "" && !strings.HasPrefix(ct, MediaJSON) {
		bad("datacontenttype", "must be application/json")
	}
	e := Event{ID: w.ID, Tenant: w.Subject, Meter: w.Type, Value: 1}
	if w.Time != "" {
		t, err := time.Parse(time.RFC3339Nano, w.Time)
		if err != nil {
			bad("time", "must be an RFC 3339 timestamp")
		}
		e.Time = t.UTC()
	}
	for k, raw := range w.Data {
		if k == "value" {
			var ok bool
			if e.Value, ok = parseValue(raw); !ok {
				bad("data.value", "must be a non-negative integer")
			}
			continue
		}
		v, ok := dimensionValue(raw)
		if !ok {
			bad("data."+k, "must be a string, number or boolean")
			continue
		}
		if e.Dimensions == nil {
			e.Dimensions = make(map[string]string, len(w.Data))
		}
		e.Dimensions[k] = v
	}
	d.Events = append(d.Events, e)
	return nil
}

// dimensionValue renders a CloudEvents data value as a dimension string.
func dimensionValue(raw json.RawMessage) (string, bool) {
	switch c := firstByte(raw); {
	case c == '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", false
		}
		return s, true
	case c == 't' || c == 'f' || c == '-' || (c >= '0' && c <= '9'):
		return string(bytes.TrimSpace(raw)), len(raw) <= maxCloudEventsDataValue
	default:
		return "", false
	}
}
