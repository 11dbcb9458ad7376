package schemas

import (
	"errors"
	"math/bits"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// RFC 3339 writes four-digit years: the times a batch can carry.
var (
	minBatchTime = time.Date(0, 1, 1, 0, 0, 0, 0, time.UTC)
	endBatchTime = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)
)

const msgYearRange = "must lie in the years 0000 to 9999 in UTC"

// AppendBatch appends the encoding of b for publishing with Content-Type
// BatchContentType to dst and returns the extended buffer, so that a caller
// can reuse one. The encoding is what encoding/json writes for a Batch, times
// in UTC and without its HTML escaping of <, > and &; dimension keys are
// sorted, so equal batches encode to equal bytes. A time outside the years
// 0000 to 9999 in UTC fails (a FieldError for an event's time); dst is then
// returned with its original length.
func AppendBatch(dst []byte, b *Batch) ([]byte, error) {
	if b == nil {
		return append(dst, "null"...), nil // as json.Marshal
	}
	start := len(dst)
	dst, err := appendBatchHead(dst, b)
	if err != nil {
		return dst, err
	}
	if b.Events == nil {
		return append(dst, `,"events":null}`...), nil
	}
	dst = append(dst, `,"events":[`...)
	var tw timeWriter
	ok := true
	dims := make([]dimension, 0, MaxDimensions)
	for i := range b.Events {
		if i > 0 {
			dst = append(dst, ',')
		}
		mark := len(dst)
		if dst, dims, ok = appendEvent(dst, &b.Events[i], &tw, dims); !ok {
			return dst[:start], FieldError{Index: i, Field: "time", Message: msgYearRange}
		}
		if i == 0 {
			// The events of a batch are much alike: make room once for
			// the rest, each up to an eighth larger than the first.
			n := len(dst) - mark + len(",")
			dst = slices.Grow(dst, (len(b.Events)-1)*(n+n/8)+len("]}"))
		}
	}
	return append(dst, "]}"...), nil
}

// EventEncoder encodes events one at a time exactly as AppendBatch writes
// them inside a batch, so that a collector can measure each event's encoded
// size before it chooses a batch for it, and seal the batch from those bytes
// with AppendEncodedBatch instead of encoding the events again. The zero
// value is ready to use; it keeps scratch space between calls.
type EventEncoder struct {
	tw   timeWriter
	dims []dimension
}

// Append appends the encoding of e to dst. dst must be what the previous
// Append of enc returned, grown or not (the encoder copies the date of a time
// in the same second from it), or enc must be new or Reset. A time outside
// the years 0000 to 9999 in UTC fails; dst is then returned unchanged.
func (enc *EventEncoder) Append(dst []byte, e *Event) ([]byte, error) {
	if enc.dims == nil {
		enc.dims = make([]dimension, 0, MaxDimensions)
	}
	start := len(dst)
	dst, dims, ok := appendEvent(dst, e, &enc.tw, enc.dims)
	enc.dims = dims
	if !ok {
		enc.tw = timeWriter{}
		return dst[:start], FieldError{Field: "time", Message: msgYearRange}
	}
	return dst, nil
}

// Reset makes enc forget the buffer it last wrote to.
func (enc *EventEncoder) Reset() { enc.tw = timeWriter{} }

// appendBatchHead appends a batch's members before its events: the opening
// brace, batch_id, collector and sealed_at. A sealed_at outside the years
// 0000 to 9999 fails, and dst is returned with its original length.
func appendBatchHead(dst []byte, b *Batch) ([]byte, error) {
	start := len(dst)
	dst = append(dst, `{"batch_id":`...)
	dst = appendString(dst, b.ID)
	dst = append(dst, `,"collector":`...)
	dst = appendString(dst, b.Collector)
	dst = append(dst, `,"sealed_at":`...)
	var tw timeWriter
	dst, ok := tw.append(dst, b.SealedAt)
	if !ok {
		return dst[:start], errors.New("schemas: sealed_at " + msgYearRange)
	}
	return dst, nil
}

// AppendEncodedBatch appends the encoding of b to dst, as AppendBatch does,
// taking the events from events: their encodings by an EventEncoder joined
// by commas (b.Events is ignored). AppendBatch(dst, b) and AppendEncodedBatch
// of b's events so encoded give the same bytes.
func AppendEncodedBatch(dst []byte, b *Batch, events []byte) ([]byte, error) {
	dst, err := appendBatchHead(dst, b)
	if err != nil {
		return dst, err
	}
	dst = append(dst, `,"events":[`...)
	dst = append(dst, events...)
	return append(dst, "]}"...), nil
}

type dimension struct{ key, value string }

// sortDimensions sorts dims by key, as encoding/json sorts map keys.
func sortDimensions(dims []dimension) {
	if len(dims) > MaxDimensions {
		slices.SortFunc(dims, func(a, b dimension) int { return strings.Compare(a.key, b.key) })
		return
	}
	for i := 1; i < len(dims); i++ { // insertion sort: fastest for a few
		for j := i; j > 0 && dims[j].key < dims[j-1].key; j-- {
			dims[j], dims[j-1] = dims[j-1], dims[j]
		}
	}
}

// appendEvent appends e as a JSON object; dims is scratch space, returned for
// reuse. It fails for a time AppendBatch cannot write.
func appendEvent(dst []byte, e *Event, tw *timeWriter, dims []dimension) ([]byte, []dimension, bool) {
	dst = append(dst, `{"id":`...)
	dst = appendString(dst, e.ID)
	dst = append(dst, `,"tenant":`...)
	dst = appendString(dst, e.Tenant)
	dst = append(dst, `,"meter":`...)
	dst = appendString(dst, e.Meter)
	dst = append(dst, `,"value":`...)
	dst = strconv.AppendInt(dst, e.Value, 10)
	dst = append(dst, `,"time":`...)
	dst, ok := tw.append(dst, e.Time)
	if !ok {
		return dst, dims, false
	}
	if len(e.Dimensions) > 0 { // omitempty
		dims = dims[:0]
		for k, v := range e.Dimensions {
			dims = append(dims, dimension{k, v})
		}
		sortDimensions(dims)
		dst = append(dst, `,"dimensions":{`...)
		for j, d := range dims {
			if j > 0 {
				dst = append(dst, ',')
			}
			dst = appendString(dst, d.key)
			dst = append(dst, ':')
			dst = appendString(dst, d.value)
		}
		dst = append(dst, '}')
	}
	return append(dst, '}'), dims, true
}

// timeWriter appends times as RFC 3339 strings in UTC, as
// time.Time.MarshalJSON does for a UTC time. The times of a batch mostly
// share their second: its date and clock are copied from the last time
// written to the same buffer instead of formatted again.
type timeWriter struct {
	sec   int64 // Unix time of the second at dst[at:at+len(rfc3339Second)]
	at    int
	valid bool
}

// rfc3339Second is the layout of the part of a time before its fraction.
const rfc3339Second = "2006-01-02T15:04:05"

// append appends t to dst. It fails outside the years 0000 to 9999. dst is
// what the previous call of w returned, grown since.
func (w *timeWriter) append(dst []byte, t time.Time) ([]byte, bool) {
	if t.Before(minBatchTime) || !t.Before(endBatchTime) {
		return dst, false
	}
	dst = append(dst, '"')
	if sec := t.Unix(); w.valid && sec == w.sec {
		dst = append(dst, dst[w.at:w.at+len(rfc3339Second)]...)
		w.at = len(dst) - len(rfc3339Second)
	} else {
		w.sec, w.at, w.valid = sec, len(dst), true
		dst = t.UTC().AppendFormat(dst, time.RFC3339) // the fast path of AppendFormat
		dst = dst[:len(dst)-len("Z")]
	}
	if ns := t.Nanosecond(); ns != 0 { // as RFC3339Nano: trailing zeros dropped
		var frac [len(".999999999")]byte
		frac[0] = '.'
		for k := len(frac) - 1; k > 0; k-- {
			frac[k] = byte('0' + ns%10)
			ns /= 10
		}
		n := len(frac)
		for frac[n-1] == '0' {
			n--
		}
		dst = append(dst, frac[:n]...)
	}
	return append(dst, 'Z', '"'), true
}

// jsonSafe holds the ASCII bytes a JSON string literal holds unescaped.
var jsonSafe = func() (safe [utf8.RuneSelf]bool) {
	for c := ' '; c < utf8.RuneSelf; c++ {
		safe[c] = c != '"' && c != '\\'
	}
	return safe
}()

const hexDigits = "0123456789abcdef"

// AppendJSONString appends s as a JSON string, as encoding/json writes it
// without HTML escaping: invalid UTF-8 becomes U+FFFD, U+2028 and U+2029 are
// escaped. Rollup dimension keys use it too, so every canonical encoding of
// meterd agrees.
func AppendJSONString(dst []byte, s string) []byte { return appendString(dst, s) }

// appendString appends s as a JSON string literal, escaped as encoding/json
// escapes without SetEscapeHTML: quote, backslash and control characters,
// U+2028 and U+2029 (line ends in JavaScript), and each byte of invalid
// UTF-8 as \ufffd.
func appendString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		if i+8 <= len(s) {
			m := jsonSpecial8(load8(s[i : i+8]))
			if m == 0 {
				i += 8
				continue
			}
			i += bits.TrailingZeros64(m) / 8
		}
		c := s[i]
		if c < utf8.RuneSelf {
			if jsonSafe[c] {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\b':
				dst = append(dst, '\\', 'b')
			case '\f':
				dst = append(dst, '\\', 'f')
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// load8 returns the first 8 bytes of s as a little-endian word; the compiler
// makes it one load.
func load8(s string) uint64 {
	_ = s[7]
	return uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24 |
		uint64(s[4])<<32 | uint64(s[5])<<40 | uint64(s[6])<<48 | uint64(s[7])<<56
}

// jsonSpecial8 returns the high bit of each of the 8 bytes of x (first byte
// lowest) that a JSON string literal cannot hold as itself (a control
// character, quote or backslash) or that is not ASCII, to pass 8 plain bytes
// at once. A byte above a marked one may be marked wrongly (a borrow); the
// lowest mark is exact.
func jsonSpecial8(x uint64) uint64 {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	quote, backslash := x^(ones*'"'), x^(ones*'\\')
	// (v - ones) &^ v marks the zero bytes of v; v - ones*n &^ v those below n.
	control := (x - ones*' ') &^ x
	zero := (quote-ones)&^quote | (backslash-ones)&^backslash
	return (control | zero | x) & highs
}
