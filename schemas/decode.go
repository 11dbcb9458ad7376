package schemas

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/bits"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf16"
	"unicode/utf8"
)

// Media types POST /v1/events accepts (docs/architecture.md#http-apis).
const (
	MediaJSON               = "application/json"
	MediaNDJSON             = "application/x-ndjson"
	MediaJSONLines          = "application/jsonl"
	MediaCloudEvent         = "application/cloudevents+json"
	MediaCloudEventsBatch   = "application/cloudevents-batch+json"
	cloudEventsSpecVersion  = "1.0"
	maxCloudEventsDataValue = 256
	// maxDepth bounds the nesting of values the decoder skips, as encoding/json does.
	maxDepth = 10000
	// maxInternLen and maxInterned bound the strings a scanner shares.
	maxInternLen = 64
	maxInterned  = 1024
	// minElementLen is the least size scanner.elements assumes of an element.
	minElementLen = 64
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
// the per-event errors found while decoding (wrong types, strings that are not
// valid UTF-8, unknown fields). An event named by an error holds the members
// that did decode; the fields the errors name are zero (or, for a member
// repeated after its failure, the last value read) and are not to be used.
type Decoded struct {
	Events []Event
	Errors []FieldError
	// Cut is true when reading stopped at MaxFieldErrors errors: the
	// events after those read are not in Events, and the body is refused
	// anyway.
	Cut bool
	// bounded makes reading stop there (DecodeEvents; a batch, which a
	// collector wrote, is read whole).
	bounded bool
}

// MaxFieldErrors bounds the field errors a request gets back, and what a
// body of many invalid events costs to read: DecodeEvents stops reading once
// it found that many.
const MaxFieldErrors = 1000

// DecodeEvents reads the events of a POST /v1/events body of the given media
// type (parameters such as charset are ignored). Events without a value get 1.
// It returns a *SyntaxError for a malformed body, ErrNoEvents for none (an
// empty body included), and ErrUnsupportedMediaType for a media type it does
// not read.
//
// Member names are matched exactly, as JSON Schema does (encoding/json would
// take "ID" for "id"), and null is not a string: event.schema.json and
// DecodeEvents+Validate accept the same documents, except for strings that are
// not valid UTF-8: they are refused here, never replaced by U+FFFD as
// encoding/json (and so a validator) would, since that made distinct ids one,
// and the time 0001-01-01T00:00:00Z (zeroTime).
func DecodeEvents(mediaType string, body []byte) (Decoded, error) {
	if i := strings.IndexByte(mediaType, ';'); i >= 0 {
		mediaType = mediaType[:i]
	}
	mediaType = strings.ToLower(strings.TrimSpace(mediaType))
	var layout func(*scanner, *Decoded, elementDecoder) error
	var el elementDecoder
	switch mediaType {
	case MediaJSON, "":
		layout, el = decodeJSON, decodeEvent
	case MediaNDJSON, MediaJSONLines:
		layout, el = decodeStream, decodeEvent
	case MediaCloudEvent:
		layout, el = decodeOne, decodeCloudEvent
	case MediaCloudEventsBatch:
		layout, el = decodeArray, decodeCloudEvent
	default:
		return Decoded{}, fmt.Errorf("%w %q", ErrUnsupportedMediaType, mediaType)
	}
	d := Decoded{bounded: true}
	s := &scanner{data: body}
	if s.peek() == eof {
		return Decoded{}, ErrNoEvents
	}
	err := layout(s, &d, el)
	if err == nil && len(d.Events) == 0 {
		err = ErrNoEvents
	}
	d.bounded = false
	return d, err
}

// elementDecoder decodes the next JSON value of s as the event of index i and
// appends it to d.Events. A well-formed value of the wrong shape appends what
// of it decoded and a FieldError per failure (see shape); a malformed one
// returns a *SyntaxError.
type elementDecoder func(s *scanner, i int, d *Decoded) error

// decodeJSON reads one event object or an array of them.
func decodeJSON(s *scanner, d *Decoded, el elementDecoder) error {
	switch s.peek() {
	case '[':
		return decodeArray(s, d, el)
	case '{':
		return decodeOne(s, d, el)
	default:
		return &SyntaxError{Msg: "expected a JSON object or array"}
	}
}

func decodeOne(s *scanner, d *Decoded, el elementDecoder) error {
	if s.peek() != '{' {
		return &SyntaxError{Msg: "expected a JSON object"}
	}
	if err := el(s, 0, d); err != nil {
		return err
	}
	return s.expectEnd()
}

func decodeArray(s *scanner, d *Decoded, el elementDecoder) error {
	if s.peek() != '[' {
		return &SyntaxError{Msg: "expected a JSON array"}
	}
	if err := s.elements(d, el); err != nil || d.Cut {
		return err
	}
	return s.expectEnd()
}

// elements reads the array at s (a '['), each element with el. An empty
// array gives empty, non-nil d.Events, as encoding/json does.
func (s *scanner) elements(d *Decoded, el elementDecoder) error {
	s.pos++
	d.Events = []Event{}
	if s.peek() == ']' {
		s.pos++
		return nil
	}
	for i := 0; ; i++ {
		if d.bounded && len(d.Errors) >= MaxFieldErrors {
			d.Cut = true
			return nil
		}
		start := s.pos
		if err := el(s, i, d); err != nil {
			return err
		}
		if i == 0 {
			// The elements of a body are much alike: make room for as
			// many more as fit the rest of the body, and an eighth. The
			// first counts as at least minElementLen bytes, so that a
			// small one cannot make the slice much larger than the body.
			n := (len(s.data) - s.pos) / max(s.pos-start, minElementLen)
			d.Events = slices.Grow(d.Events, n+n/8)
		}
		switch end, ok := s.afterElement(); {
		case !ok:
			return s.unexpected("after array element")
		case end:
			return nil
		}
	}
}

// afterElement reads what follows an array element: ',' (more follow) or
// the closing ']' (end); ok is false, and nothing is read, for anything
// else. It leaves the error to the caller so that it inlines: it runs once
// per event.
func (s *scanner) afterElement() (end, ok bool) {
	c := s.peek()
	if c != ',' && c != ']' {
		return false, false
	}
	s.pos++
	return c == ']', true
}

// decodeStream reads newline-delimited (or any whitespace-separated) values.
// Room is made for one event a line, but no more than the body could hold
// of elements of minElementLen bytes: blank lines cost nothing.
func decodeStream(s *scanner, d *Decoded, el elementDecoder) error {
	d.Events = make([]Event, 0, min(bytes.Count(s.data, []byte{'\n'}), len(s.data)/minElementLen)+1)
	for i := 0; s.peek() != eof; i++ {
		if d.bounded && len(d.Errors) >= MaxFieldErrors {
			d.Cut = true
			return nil
		}
		if err := el(s, i, d); err != nil {
			return err
		}
	}
	return nil
}

// notObject skips the well-formed non-object value at s as event i.
func notObject(s *scanner, i int, d *Decoded) error {
	if err := s.skipValue(0); err != nil {
		return err
	}
	d.Errors = append(d.Errors, FieldError{Index: i, Field: "", Message: "must be a JSON object"})
	d.Events = append(d.Events, Event{})
	return nil
}

// shape records the members of element i that failed to decode (of the
// wrong JSON type, not valid UTF-8, of an unknown name): each named member
// once, and of the others (unknown names, the members of dimensions or
// data) only the first, so that an element's errors stay few however many
// members it has. The element keeps every member that did decode, so that
// its validation afterwards speaks only of real faults: a FieldError for
// "region" must not come with "id is required" when id was given.
type shape struct {
	i     int
	errs  []FieldError
	other bool // one of the others is in errs
}

// maxElementErrors bounds the errors of one element: each is checked
// against those before it, and an element with none more to report is
// refused all the same.
const maxElementErrors = 64

// fail records that the named member field failed with msg.
func (sh *shape) fail(field, msg string) {
	if len(sh.errs) < maxElementErrors && !sh.failed(field) {
		sh.errs = append(sh.errs, FieldError{Index: sh.i, Field: field, Message: msg})
	}
}

// failOther records field, an unknown member or a member of an object
// member, unless one of those is already recorded.
func (sh *shape) failOther(field, msg string) {
	if !sh.other {
		sh.other = true
		sh.errs = append(sh.errs, FieldError{Index: sh.i, Field: field, Message: msg})
	}
}

// failed reports whether field failed to decode.
func (sh *shape) failed(field string) bool {
	for _, fe := range sh.errs {
		if fe.Field == field {
			return true
		}
	}
	return false
}

// zeroTime refuses a time given as 0001-01-01T00:00:00Z (in any offset), what
// a Go client sends for an unset time.Time: an event without a time gets the
// receive time, and this one must not pass for it (as the late-event bound
// would refuse it, dedup would hold it only for the horizon).
const zeroTime = "is 0001-01-01T00:00:00Z, an unset time: leave time out to use the receive time"

// decodeEvent reads one event object of the native shape (docs/architecture.md#usage-event).
func decodeEvent(s *scanner, i int, d *Decoded) error {
	if s.peek() != '{' {
		return notObject(s, i, d)
	}
	e := Event{Value: 1}
	var m eventMembers
	sh := shape{i: i}
	if err := s.event(&e, &m, &sh); err != nil {
		return err
	}
	d.Errors = append(d.Errors, sh.errs...)
	if m.hasTenant && e.Tenant == "" && !sh.failed("tenant") {
		d.Errors = append(d.Errors, FieldError{Index: i, Field: "tenant", Message: "must not be empty; leave it out to use the API key's tenant"})
	}
	if m.value != nil {
		var ok bool
		if e.Value, ok = parseValue(m.value); !ok {
			d.Errors = append(d.Errors, FieldError{Index: i, Field: "value", Message: "must be a non-negative integer"})
		}
	}
	if m.hasTime && !sh.failed("time") {
		var ok bool
		if e.Time, ok = parseTime(m.time, &s.lastSecond); !ok {
			d.Errors = append(d.Errors, FieldError{Index: i, Field: "time", Message: "must be an RFC 3339 timestamp"})
		} else if e.Time.IsZero() {
			d.Errors = append(d.Errors, FieldError{Index: i, Field: "time", Message: zeroTime})
		}
	}
	// Validate says these too; said here, they count towards
	// MaxFieldErrors, so a body of small objects without them stops being
	// read.
	if e.ID == "" && !sh.failed("id") {
		d.Errors = append(d.Errors, FieldError{Index: i, Field: "id", Message: "is required"})
	}
	if e.Meter == "" && !sh.failed("meter") {
		d.Errors = append(d.Errors, FieldError{Index: i, Field: "meter", Message: "is required"})
	}
	d.Events = append(d.Events, e)
	return nil
}

// eventMembers holds what event reads of an event object but leaves to its
// caller: the raw value and time, and which members were present.
type eventMembers struct {
	value, time        []byte // value: any JSON value; time: an unquoted string
	hasTenant, hasTime bool
}

// event reads the members of the native event object at s (a '{') into e
// and m. The members that fail to decode are recorded in sh and left zero
// in e. The raw bytes in m may alias s.data.
func (s *scanner) event(e *Event, m *eventMembers, sh *shape) error {
	s.pos++
	for first := true; ; first = false {
		key, more, err := s.nextMember(first)
		if err != nil || !more {
			return err
		}
		st := strOK
		switch string(key) {
		case "id":
			e.ID, st, err = s.stringValue(notInterned)
		case "tenant":
			e.Tenant, st, err = s.stringValue(slotTenant)
			m.hasTenant = true
		case "meter":
			e.Meter, st, err = s.stringValue(slotMeter)
		case "time":
			m.time, st, err = s.stringBytes()
			m.hasTime = true
		case "value":
			m.value, err = s.rawValue()
		case "dimensions":
			e.Dimensions, err = s.dimensions(sh)
		default:
			sh.failOther(string(key), "is not a known field")
			err = s.skipValue(0)
		}
		if err != nil {
			return err
		}
		if st != strOK {
			sh.fail(string(key), st.problem())
		}
	}
}

// dimensions reads the value of the dimensions member: an object of strings.
// An empty object gives nil, so an event encodes the same after a round trip.
// A dimension that fails to decode is recorded in sh and left out.
func (s *scanner) dimensions(sh *shape) (map[string]string, error) {
	if s.peek() != '{' {
		sh.fail("dimensions", "must be an object")
		return nil, s.skipValue(0)
	}
	s.pos++
	var dims map[string]string
	for j := 0; ; j++ {
		key, more, err := s.nextMember(j == 0)
		if err != nil || !more {
			return dims, err
		}
		keyOK := !s.keyNotUTF8
		slot := slotDimensions + 2*min(j, MaxDimensions)
		v, st, err := s.stringValue(slot + 1)
		switch {
		case err != nil:
			return nil, err
		case !keyOK:
			sh.failOther("dimensions."+string(key), "key "+notUTF8)
		case st != strOK:
			sh.failOther("dimensions."+string(key), st.problem())
		default:
			if dims == nil {
				dims = make(map[string]string, 4)
			}
			dims[s.intern(key, slot)] = v
		}
	}
}

// parseValue reads an event value, the raw JSON of the value member: nil
// (absent) means 1; otherwise a JSON number ≥ 0 with an integral value that
// fits int64. As in JSON Schema, 2.0, 1e3 and 0e999 are integers; 1.5, a
// string and null are not. The arithmetic is exact.
func parseValue(raw []byte) (int64, bool) {
	if raw == nil {
		return 1, true
	}
	s := raw
	neg := len(s) > 0 && s[0] == '-'
	if neg {
		s = s[1:]
	}
	mant, exp := s, int64(0)
	if i := bytes.IndexAny(s, "eE"); i >= 0 {
		var ok bool
		if exp, ok = parseExponent(s[i+1:]); !ok {
			return 0, false
		}
		mant = s[:i]
	}
	intPart, frac := mant, []byte(nil)
	if i := bytes.IndexByte(mant, '.'); i >= 0 {
		intPart, frac = mant[:i], mant[i+1:]
		if len(frac) == 0 {
			return 0, false
		}
	}
	if len(intPart) == 0 || !allDigits(intPart) || !allDigits(frac) || (len(intPart) > 1 && intPart[0] == '0') {
		return 0, false
	}
	// The value is the digits of intPart+frac times 10^exp. Trailing zeros
	// move into exp while it is negative, then leading zeros go.
	exp -= int64(len(frac))
	for exp < 0 && len(frac) > 0 && frac[len(frac)-1] == '0' {
		frac, exp = frac[:len(frac)-1], exp+1
	}
	if len(frac) == 0 {
		for exp < 0 && len(intPart) > 0 && intPart[len(intPart)-1] == '0' {
			intPart, exp = intPart[:len(intPart)-1], exp+1
		}
	}
	digits := bytes.TrimLeft(intPart, "0")
	if len(digits) == 0 {
		frac = bytes.TrimLeft(frac, "0")
	}
	n := int64(len(digits) + len(frac))
	if n == 0 {
		return 0, true // zero, also written -0, 0.0 or 0e999
	}
	if neg || exp < 0 || n+exp > 19 {
		return 0, false
	}
	var v uint64 // < 10^19 < 2^64: no overflow
	for _, c := range digits {
		v = v*10 + uint64(c-'0')
	}
	for _, c := range frac {
		v = v*10 + uint64(c-'0')
	}
	for ; exp > 0; exp-- {
		v *= 10
	}
	if v > 1<<63-1 {
		return 0, false
	}
	return int64(v), true
}

// parseExponent reads the exponent of a JSON number, saturated far beyond any
// exponent of an int64 value so that it cannot overflow.
func parseExponent(s []byte) (int64, bool) {
	neg := false
	if len(s) > 0 && (s[0] == '+' || s[0] == '-') {
		neg, s = s[0] == '-', s[1:]
	}
	if len(s) == 0 || !allDigits(s) {
		return 0, false
	}
	var e int64
	for _, c := range s {
		if e < 1<<40 {
			e = e*10 + int64(c-'0')
		}
	}
	if neg {
		e = -e
	}
	return e, true
}

func allDigits(s []byte) bool {
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// parseTime reads an RFC 3339 date-time (section 5.6): four-digit year, 'T'
// or 't', two-digit fields, an optional fraction after '.', then 'Z', 'z' or
// a ±hh:mm offset. time.Parse is laxer (one-digit hours, a comma before the
// fraction, offsets of 24 hours). A leap second is refused: time.Time cannot
// hold it. Digits past nanoseconds are dropped, as time.Parse does. The
// result is in UTC. last, if not nil, remembers the second read.
func parseTime[T string | []byte](s T, last *lastSecond) (time.Time, bool) {
	num := func(i, n int) int {
		v := 0
		for k := i; k < i+n; k++ {
			if s[k] < '0' || s[k] > '9' {
				return -1
			}
			v = v*10 + int(s[k]-'0')
		}
		return v
	}
	if len(s) < len("2006-01-02T15:04:05Z") {
		return time.Time{}, false
	}
	var at time.Time // the date and clock, as if in UTC
	if last != nil && string(s[:len(last.text)]) == string(last.text[:]) && !last.at.IsZero() {
		at = last.at
	} else {
		if s[4] != '-' || s[7] != '-' || (s[10] != 'T' && s[10] != 't') || s[13] != ':' || s[16] != ':' {
			return time.Time{}, false
		}
		year, month, day := num(0, 4), num(5, 2), num(8, 2)
		hour, minute, sec := num(11, 2), num(14, 2), num(17, 2)
		if year < 0 || month < 1 || month > 12 || day < 1 || day > daysIn(month, year) ||
			hour < 0 || hour > 23 || minute < 0 || minute > 59 || sec < 0 || sec > 59 {
			return time.Time{}, false
		}
		at = time.Date(year, time.Month(month), day, hour, minute, sec, 0, time.UTC)
		if last != nil {
			copy(last.text[:], s)
			last.at = at
		}
	}
	i, nsec := 19, 0
	if s[i] == '.' {
		i++
		n := 0
		for ; i < len(s) && s[i] >= '0' && s[i] <= '9'; i, n = i+1, n+1 {
			if n < 9 {
				nsec = nsec*10 + int(s[i]-'0')
			}
		}
		if n == 0 {
			return time.Time{}, false
		}
		for ; n < 9; n++ {
			nsec *= 10
		}
	}
	offset := 0
	switch zone := len(s) - i; {
	case zone == 1 && (s[i] == 'Z' || s[i] == 'z'):
	case zone == 6 && (s[i] == '+' || s[i] == '-') && s[i+3] == ':':
		oh, om := num(i+1, 2), num(i+4, 2)
		if oh < 0 || oh > 23 || om < 0 || om > 59 {
			return time.Time{}, false
		}
		offset = (oh*60 + om) * 60
		if s[i] == '-' {
			offset = -offset
		}
	default:
		return time.Time{}, false
	}
	return at.Add(time.Duration(nsec) - time.Duration(offset)*time.Second), true
}

// lastSecond is the date and clock parseTime read last: the times of a body
// mostly share their second, and working it out is most of the work.
type lastSecond struct {
	text [len("2006-01-02T15:04:05")]byte
	at   time.Time // zero: none
}

func daysIn(month, year int) int {
	switch month {
	case 2:
		if year%4 == 0 && (year%100 != 0 || year%400 == 0) {
			return 29
		}
		return 28
	case 4, 6, 9, 11:
		return 30
	}
	return 31
}

// cloudEvent holds the attributes of a CloudEvent, read from the members of
// a structured-mode event or the ce-* headers of a binary-mode one.
type cloudEvent struct {
	specVersion, id, source, typ, subject, time, dataContentType string
	hasSubject, hasTime                                          bool
	data                                                         []byte // a well-formed JSON object; nil: none
	// dataBase64 is the data_base64 member, read as data by append.
	dataBase64    string
	hasDataBase64 bool
}

// decodeCloudEvent reads a CloudEvents 1.0 structured-mode event and maps it
// as cloudEvent.append does. Extension attributes are ignored; an attribute
// set to null counts as absent; data_base64 is read as data.
func decodeCloudEvent(s *scanner, i int, d *Decoded) error {
	if s.peek() != '{' {
		return notObject(s, i, d)
	}
	s.pos++
	var ce cloudEvent
	sh := shape{i: i}
	for first := true; ; first = false {
		key, more, err := s.nextMember(first)
		if err != nil {
			return err
		}
		if !more {
			break
		}
		var dst *string
		switch string(key) {
		case "specversion":
			dst = &ce.specVersion
		case "id":
			dst = &ce.id
		case "source":
			dst = &ce.source
		case "type":
			dst = &ce.typ
		case "subject":
			dst, ce.hasSubject = &ce.subject, true
		case "time":
			dst, ce.hasTime = &ce.time, true
		case "datacontenttype":
			dst = &ce.dataContentType
		case "data":
			switch s.peek() {
			case '{':
				ce.data, err = s.rawValue()
			case 'n':
				ce.data, err = nil, s.skipValue(0)
			default:
				sh.fail("data", "must be an object")
				err = s.skipValue(0)
			}
		case "data_base64":
			// Data as bytes (CloudEvents JSON format §3.1): the official
			// SDKs send data given to them as bytes this way, JSON
			// included. append reads it; skipped, the event would be
			// billed the default instead of what it says.
			if s.peek() == 'n' {
				err = s.skipValue(0)
				break
			}
			var st strStatus
			ce.dataBase64, st, err = s.stringValue(notInterned)
			switch {
			case err != nil:
			case st != strOK:
				sh.fail("data_base64", st.problem())
			default:
				ce.hasDataBase64 = true
			}
		default:
			err = s.skipValue(0)
		}
		if dst != nil {
			if s.peek() == 'n' { // null: the attribute is absent
				err = s.skipValue(0)
				*dst = ""
				if dst == &ce.subject {
					ce.hasSubject = false
				} else if dst == &ce.time {
					ce.hasTime = false
				}
			} else {
				var st strStatus
				if *dst, st, err = s.stringValue(notInterned); st != strOK && err == nil {
					sh.fail(string(key), st.problem())
				}
			}
		}
		if err != nil {
			return err
		}
	}
	ce.append(&sh, d)
	return nil
}

// append maps the CloudEvent as event sh.i of d (docs/architecture.md#usage-event): (source, id)
// → id by CloudEventID, subject → tenant, type → meter, time, data.value →
// value and the other members of data → dimensions. The attributes that
// failed to decode are in sh already; sh.fail reports each field once, so an
// attribute of the wrong type is not also "required".
func (ce *cloudEvent) append(sh *shape, d *Decoded) {
	e := Event{Meter: ce.typ, Tenant: ce.subject, Value: 1}
	if ce.specVersion != cloudEventsSpecVersion {
		sh.fail("specversion", `must be "1.0"`)
	}
	if ce.source == "" {
		sh.fail("source", "is required")
	}
	if ce.dataContentType != "" && !strings.HasPrefix(ce.dataContentType, MediaJSON) {
		sh.fail("datacontenttype", "must be application/json")
	}
	if ce.id != "" {
		// Even without a source: the event is refused then, for its source
		// only, not for an id it has.
		e.ID = CloudEventID(ce.source, ce.id)
	} else {
		sh.fail("id", "is required")
	}
	if ce.hasSubject && ce.subject == "" {
		sh.fail("subject", "must not be empty; leave it out to use the API key's tenant")
	}
	if ce.hasTime && !sh.failed("time") {
		var ok bool
		if e.Time, ok = parseTime(ce.time, nil); !ok {
			sh.fail("time", "must be an RFC 3339 timestamp")
		} else if e.Time.IsZero() {
			sh.fail("time", zeroTime)
		}
	}
	if ce.hasDataBase64 {
		ce.readDataBase64(sh)
	}
	if ce.data != nil {
		ds := &scanner{data: ce.data, pos: 1} // a well-formed object
		for first := true; ; first = false {
			key, more, _ := ds.nextMember(first)
			if !more {
				break
			}
			keyOK := !ds.keyNotUTF8
			start := ds.peekPos()
			ds.skipValue(0)
			raw := ds.data[start:ds.pos]
			field := "data." + string(key)
			if !keyOK {
				sh.fail(field, "key "+notUTF8)
				continue
			}
			if string(key) == "value" {
				var ok bool
				if e.Value, ok = parseValue(raw); !ok {
					sh.fail(field, "must be a non-negative integer")
				}
				continue
			}
			v, st := dimensionValue(raw)
			if st != strOK {
				sh.fail(field, st.problem())
				continue
			}
			if e.Dimensions == nil {
				e.Dimensions = make(map[string]string, 4)
			}
			e.Dimensions[string(key)] = v
		}
	}
	d.Errors = append(d.Errors, sh.errs...)
	d.Events = append(d.Events, e)
}

// readDataBase64 sets the data from data_base64, which must hold a JSON
// object as data does (datacontenttype, checked by append, says JSON), and
// must not come with data: one event has one data.
func (ce *cloudEvent) readDataBase64(sh *shape) {
	if ce.data != nil {
		sh.fail("data_base64", "must not be given with data")
		return
	}
	data, err := base64.StdEncoding.DecodeString(ce.dataBase64)
	if err != nil {
		sh.fail("data_base64", "must be base64 (RFC 4648)")
		return
	}
	ds := &scanner{data: data}
	if ds.peek() == '{' {
		if obj, err := ds.rawValue(); err == nil && ds.expectEnd() == nil {
			ce.data = obj
			return
		}
	}
	sh.fail("data_base64", "must hold a JSON object, base64-encoded")
}

// dimensionValue renders a well-formed CloudEvents data value as a dimension
// string: a string as itself, a number or boolean as its JSON literal.
func dimensionValue(raw []byte) (string, strStatus) {
	switch c := raw[0]; {
	case c == '"':
		s := scanner{data: raw}
		v, st, _ := s.stringValue(notInterned)
		return v, st
	case (c == 't' || c == 'f' || c == '-' || (c >= '0' && c <= '9')) && len(raw) <= maxCloudEventsDataValue:
		return string(raw), strOK
	default:
		return "", strNotDimension
	}
}

// CloudEventID is the meterd event id of the CloudEvent with the given
// source and id, the pair that identifies it (CloudEvents 1.0, attribute
// id: "source + id is unique for each distinct event"): "ce:",
// the length of source in bytes, ":", source, ":", id — as in
// "ce:4:gw-1:42" — or, when that exceeds MaxIDLen characters, "ce:sha256:"
// and the hexadecimal SHA-256 of it. The length prefix makes the join
// unambiguous (no source and id can be read two ways), the two forms never
// meet ("sha256" is not a length), and the hashed form collides only where
// SHA-256 does. A plain JSON event's id is used as it is.
func CloudEventID(source, id string) string {
	joined := "ce:" + strconv.Itoa(len(source)) + ":" + source + ":" + id
	if len(joined) <= MaxIDLen || utf8.RuneCountInString(joined) <= MaxIDLen {
		return joined
	}
	sum := sha256.Sum256([]byte(joined))
	return "ce:sha256:" + hex.EncodeToString(sum[:])
}

// Binary content mode (CloudEvents HTTP binding 1.0 §3.1): the attributes
// are ce-* headers, percent-encoded, and the body is the data.
const headerSpecVersion = "Ce-Specversion"

// DecodeRequest reads the events of a POST /v1/events request from its
// header and body: a binary-mode CloudEvent when the header has
// ce-specversion and the Content-Type is not a CloudEvents one (as the
// CloudEvents HTTP binding tells the modes apart), else the body as
// DecodeEvents reads its Content-Type. Its errors are those of DecodeEvents.
func DecodeRequest(h http.Header, body []byte) (Decoded, error) {
	mediaType := h.Get("Content-Type")
	if h.Get(headerSpecVersion) == "" || isCloudEventsMedia(mediaType) {
		return DecodeEvents(mediaType, body)
	}
	return decodeBinaryCloudEvent(h, body)
}

// isCloudEventsMedia reports whether mediaType is application/cloudevents
// or one of its +json forms: a structured or batched mode.
func isCloudEventsMedia(mediaType string) bool {
	mt, _, _ := strings.Cut(mediaType, ";")
	mt = strings.ToLower(strings.TrimSpace(mt))
	return mt == "application/cloudevents" || strings.HasPrefix(mt, "application/cloudevents+") ||
		strings.HasPrefix(mt, "application/cloudevents-batch")
}

// decodeBinaryCloudEvent reads the binary-mode CloudEvent of header h and
// body, mapped as a structured one. The Content-Type is the data's: JSON
// (or none, read as JSON); the data may also be left out (an empty body).
func decodeBinaryCloudEvent(h http.Header, body []byte) (Decoded, error) {
	mediaType := h.Get("Content-Type")
	if mt, _, _ := strings.Cut(mediaType, ";"); mediaType != "" && strings.ToLower(strings.TrimSpace(mt)) != MediaJSON {
		return Decoded{}, fmt.Errorf("%w %q for the data of a binary-mode CloudEvent", ErrUnsupportedMediaType, mediaType)
	}
	sh := shape{i: 0}
	attr := func(name string) (string, bool) {
		values := h.Values("Ce-" + name)
		if len(values) == 0 {
			return "", false
		}
		if len(values) > 1 {
			// Reading one of them would pick an identity (or a tenant)
			// another reader of the request may not.
			sh.fail(strings.ToLower(name), "is given in more than one ce- header")
			return "", true
		}
		v, err := url.PathUnescape(values[0])
		if err != nil || !utf8.ValidString(v) {
			sh.fail(strings.ToLower(name), "must be percent-encoded UTF-8 in its ce- header")
			return "", true
		}
		return v, true
	}
	var ce cloudEvent
	ce.specVersion, _ = attr("Specversion")
	ce.id, _ = attr("Id")
	ce.source, _ = attr("Source")
	ce.typ, _ = attr("Type")
	ce.subject, ce.hasSubject = attr("Subject")
	ce.time, ce.hasTime = attr("Time")
	s := &scanner{data: body}
	switch s.peek() {
	case eof:
	case '{':
		data, err := s.rawValue()
		if err != nil {
			return Decoded{}, err
		}
		ce.data = data
	default:
		if err := s.skipValue(0); err != nil {
			return Decoded{}, err
		}
		sh.fail("data", "must be an object")
	}
	if err := s.expectEnd(); err != nil {
		return Decoded{}, err
	}
	var d Decoded
	ce.append(&sh, &d)
	return d, nil
}

// scanner reads JSON from data, checking well-formedness as encoding/json
// does, without reflection.
type scanner struct {
	data       []byte
	pos        int
	strs       map[string]string   // see intern
	recent     [recentSlots]string // see intern
	lastSecond lastSecond          // see parseTime
	keyNotUTF8 bool                // see nextMember
}

const eof = -1

// peek skips whitespace and returns the next byte, or eof.
func (s *scanner) peek() int {
	for ; s.pos < len(s.data); s.pos++ {
		switch c := s.data[s.pos]; c {
		case ' ', '\t', '\n', '\r':
		default:
			return int(c)
		}
	}
	return eof
}

// peekPos skips whitespace and returns the position of the next byte.
func (s *scanner) peekPos() int {
	s.peek()
	return s.pos
}

// unexpected reports the byte at s.pos (or the end of the body) as out of place.
func (s *scanner) unexpected(context string) error {
	if s.pos >= len(s.data) {
		return &SyntaxError{Msg: "unexpected end of body"}
	}
	return &SyntaxError{Msg: fmt.Sprintf("invalid character %s %s at byte %d", quoteByte(s.data[s.pos]), context, s.pos)}
}

func quoteByte(c byte) string {
	if c < utf8.RuneSelf {
		return strconv.QuoteRune(rune(c))
	}
	return fmt.Sprintf("0x%02x", c)
}

// expectEnd checks that only whitespace follows the value just read.
func (s *scanner) expectEnd() error {
	if s.peek() != eof {
		return &SyntaxError{Msg: fmt.Sprintf("unexpected data after the JSON value at byte %d", s.pos)}
	}
	return nil
}

// nextMember reads the next member name of an object whose '{' has been
// consumed, and the ':' after it. It returns more=false after the closing '}'.
// The name is unescaped; it may alias s.data. A name that is not valid UTF-8
// sets s.keyNotUTF8 and holds U+FFFD in place of the bad bytes.
func (s *scanner) nextMember(first bool) (key []byte, more bool, err error) {
	c := s.peek()
	switch {
	case c == '}':
		s.pos++
		return nil, false, nil
	case !first && c == ',':
		s.pos++
		c = s.peek()
	case !first:
		return nil, false, s.unexpected("after object key:value pair")
	}
	if c != '"' {
		return nil, false, s.unexpected("looking for beginning of object key string")
	}
	var st strStatus
	key, st, err = s.stringBytes()
	if err != nil {
		return nil, false, err
	}
	s.keyNotUTF8 = st == strNotUTF8
	if s.peek() != ':' {
		return nil, false, s.unexpected("after object key")
	}
	s.pos++
	return key, true, nil
}

// strStatus says what a member value read as a string held.
type strStatus uint8

const (
	strOK        strStatus = iota
	strNotString           // another JSON type, null included
	strNotUTF8             // invalid UTF-8 bytes or an unpaired surrogate escape
	// strNotDimension is a CloudEvents data value that makes no dimension.
	strNotDimension
)

// notUTF8 is the message of a string that is not valid UTF-8. Such a string
// is refused, never repaired: encoding/json would turn every bad byte into
// U+FFFD, and two distinct ids would become one.
const notUTF8 = `must be valid UTF-8 (no invalid bytes, no unpaired surrogate escape such as \ud800)`

// problem is the message of a FieldError for st (not strOK).
func (st strStatus) problem() string {
	switch st {
	case strNotUTF8:
		return notUTF8
	case strNotDimension:
		return "must be a string, number or boolean"
	}
	return "must be a string"
}

// stringValue reads a member value that must be a string, interned in slot
// unless that is notInterned. A value of another JSON type, null included,
// is skipped and reported as strNotString; a string that is not valid UTF-8
// gives "" and strNotUTF8.
func (s *scanner) stringValue(slot int) (string, strStatus, error) {
	if s.peek() != '"' {
		return "", strNotString, s.skipValue(0)
	}
	raw, plain, err := s.scanString()
	switch {
	case err != nil:
		return "", strNotString, err
	case !plain:
		v, ok := unquote(raw)
		if !ok {
			return "", strNotUTF8, nil
		}
		return v, strOK, nil
	case slot != notInterned:
		return s.intern(raw, slot), strOK, nil
	default:
		return string(raw), strOK, nil
	}
}

// stringBytes is stringValue without the copy: the bytes may alias s.data.
func (s *scanner) stringBytes() ([]byte, strStatus, error) {
	if s.peek() != '"' {
		return nil, strNotString, s.skipValue(0)
	}
	raw, plain, err := s.scanString()
	if err != nil {
		return nil, strNotString, err
	}
	if !plain {
		v, ok := unquote(raw)
		if !ok {
			return []byte(v), strNotUTF8, nil
		}
		raw = []byte(v)
	}
	return raw, strOK, nil
}

// Slots of scanner.recent: where in an event a string was read.
const (
	notInterned    = -1
	slotTenant     = 0
	slotMeter      = 1
	slotDimensions = 2 // then key and value of each dimension by position
	recentSlots    = slotDimensions + 2*(MaxDimensions+1)
)

// intern returns b as a string, one copy per distinct short value of the
// body: tenants, meters and dimensions repeat across events, and sharing them
// saves an allocation each and the memory of the events held in a batch.
// slot says where in an event b was read: the string last read there is
// tried first, as events next to each other tend to repeat it.
func (s *scanner) intern(b []byte, slot int) string {
	if v := s.recent[slot]; v == string(b) {
		return v
	}
	v, ok := "", false
	if len(b) <= maxInternLen {
		v, ok = s.strs[string(b)]
	}
	if !ok {
		v = string(b)
		if len(b) <= maxInternLen && len(s.strs) < maxInterned {
			if s.strs == nil {
				s.strs = make(map[string]string, 64)
			}
			s.strs[v] = v
		}
	}
	s.recent[slot] = v
	return v
}

// rawValue reads any value and returns its bytes.
func (s *scanner) rawValue() ([]byte, error) {
	start := s.peekPos()
	err := s.skipValue(0)
	return s.data[start:s.pos], err
}

// scanString reads the string literal at s.pos (a '"') and returns its bytes
// between the quotes. plain says they need no unescaping: no escape and valid
// UTF-8 (encoding/json turns invalid UTF-8 into U+FFFD).
func (s *scanner) scanString() (raw []byte, plain bool, err error) {
	d := s.data
	start := s.pos + 1
	plain = true
	ascii := true
	for i := start; i < len(d); i++ {
		if i+8 <= len(d) {
			m := jsonSpecial8(binary.LittleEndian.Uint64(d[i:]))
			if m == 0 {
				i += 7
				continue
			}
			i += bits.TrailingZeros64(m) / 8
		}
		switch c := d[i]; {
		case c == '"':
			s.pos = i + 1
			raw = d[start:i]
			if plain && !ascii {
				plain = utf8.Valid(raw)
			}
			return raw, plain, nil
		case c == '\\':
			plain = false
			i++
			if i >= len(d) {
				break
			}
			switch d[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				for k := 0; k < 4; k++ {
					if i++; i < len(d) && !isHex(d[i]) {
						s.pos = i
						return nil, false, s.unexpected("in \\u hexadecimal character escape")
					}
				}
			default:
				s.pos = i
				return nil, false, s.unexpected("in string escape code")
			}
		case c < 0x20:
			s.pos = i
			return nil, false, s.unexpected("in string literal")
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	s.pos = len(d)
	return nil, false, s.unexpected("")
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

// unquote decodes the contents of a well-formed string literal with escapes
// or non-ASCII bytes, as encoding/json does for valid UTF-8. ok is false for
// invalid UTF-8 bytes or an unpaired surrogate escape, which encoding/json
// would replace with U+FFFD; v then holds that replacement, for messages only.
func unquote(raw []byte) (v string, ok bool) {
	b := make([]byte, 0, len(raw))
	ok = true
	for i := 0; i < len(raw); {
		c := raw[i]
		switch {
		case c == '\\':
			c = raw[i+1]
			i += 2
			switch c {
			case 'b':
				b = append(b, '\b')
			case 'f':
				b = append(b, '\f')
			case 'n':
				b = append(b, '\n')
			case 'r':
				b = append(b, '\r')
			case 't':
				b = append(b, '\t')
			case 'u':
				r := hex4(raw[i:])
				i += 4
				if utf16.IsSurrogate(r) {
					r2 := rune(-1)
					if i+6 <= len(raw) && raw[i] == '\\' && raw[i+1] == 'u' {
						r2 = hex4(raw[i+2:])
					}
					if pair := utf16.DecodeRune(r, r2); pair != utf8.RuneError {
						r = pair
						i += 6
					} else {
						r, ok = utf8.RuneError, false
					}
				}
				b = utf8.AppendRune(b, r)
			default: // '"', '\\', '/'
				b = append(b, c)
			}
		case c < utf8.RuneSelf:
			b = append(b, c)
			i++
		default:
			r, size := utf8.DecodeRune(raw[i:])
			if r == utf8.RuneError && size == 1 {
				ok = false
			}
			b = utf8.AppendRune(b, r)
			i += size
		}
	}
	return string(b), ok
}

// hex4 reads the four hexadecimal digits of a checked \u escape.
func hex4(h []byte) rune {
	var r rune
	for _, c := range h[:4] {
		switch {
		case c <= '9':
			c -= '0'
		case c <= 'F':
			c -= 'A' - 10
		default:
			c -= 'a' - 10
		}
		r = r<<4 | rune(c)
	}
	return r
}

// skipValue reads one well-formed value of any type.
func (s *scanner) skipValue(depth int) error {
	switch c := s.peek(); c {
	case '"':
		_, _, err := s.scanString()
		return err
	case '{', '[':
		if depth >= maxDepth {
			return &SyntaxError{Msg: fmt.Sprintf("exceeded max depth at byte %d", s.pos)}
		}
		s.pos++
		if c == '{' {
			for first := true; ; first = false {
				_, more, err := s.nextMember(first)
				if err != nil || !more {
					return err
				}
				if err := s.skipValue(depth + 1); err != nil {
					return err
				}
			}
		}
		if s.peek() == ']' {
			s.pos++
			return nil
		}
		for {
			if err := s.skipValue(depth + 1); err != nil {
				return err
			}
			switch end, ok := s.afterElement(); {
			case !ok:
				return s.unexpected("after array element")
			case end:
				return nil
			}
		}
	case 't':
		return s.literal("true")
	case 'f':
		return s.literal("false")
	case 'n':
		return s.literal("null")
	default:
		if c == '-' || (c >= '0' && c <= '9') {
			return s.number()
		}
		return s.unexpected("looking for beginning of value")
	}
}

func (s *scanner) literal(word string) error {
	for k := 0; k < len(word); k, s.pos = k+1, s.pos+1 {
		if s.pos >= len(s.data) || s.data[s.pos] != word[k] {
			return s.unexpected("in literal " + word)
		}
	}
	return nil
}

// number reads a JSON number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func (s *scanner) number() error {
	d := s.data
	digits := func() bool {
		n := s.pos
		for s.pos < len(d) && d[s.pos] >= '0' && d[s.pos] <= '9' {
			s.pos++
		}
		return s.pos > n
	}
	if d[s.pos] == '-' {
		s.pos++
	}
	switch {
	case s.pos < len(d) && d[s.pos] == '0':
		s.pos++
	case !digits():
		return s.unexpected("in numeric literal")
	}
	if s.pos < len(d) && d[s.pos] == '.' {
		s.pos++
		if !digits() {
			return s.unexpected("after decimal point in numeric literal")
		}
	}
	if s.pos < len(d) && (d[s.pos] == 'e' || d[s.pos] == 'E') {
		s.pos++
		if s.pos < len(d) && (d[s.pos] == '+' || d[s.pos] == '-') {
			s.pos++
		}
		if !digits() {
			return s.unexpected("in exponent of numeric literal")
		}
	}
	return nil
}
