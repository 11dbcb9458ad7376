package schemas

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Batch is what travels on NATS: events sealed together by one collector.
// ID is fixed when the batch is sealed and is the Nats-Msg-Id of every
// publish attempt, so JetStream drops retried copies.
type Batch struct {
	ID        string    `json:"batch_id"`
	Collector string    `json:"collector"`
	SealedAt  time.Time `json:"sealed_at"`
	Events    []Event   `json:"events"`
}

// BatchContentType is the Content-Type header value of an encoded Batch. The
// version changes whenever the encoding changes incompatibly.
const BatchContentType = "application/vnd.meterd.batch.v1+json"

// HeaderContentType is the NATS header that names the encoding of a message.
const HeaderContentType = "Content-Type"

// ErrUnknownContentType is returned by DecodeBatch for an encoding it does not read.
var ErrUnknownContentType = errors.New("schemas: unknown batch content type")

// EncodeBatch encodes b for publishing with Content-Type BatchContentType,
// as AppendBatch does, into a new slice.
func EncodeBatch(b *Batch) ([]byte, error) {
	buf := encodeBuffers.Get().(*[]byte)
	data, err := AppendBatch((*buf)[:0], b)
	var out []byte
	if err == nil {
		out = bytes.Clone(data)
	}
	if cap(data) <= maxPooledBuffer {
		*buf = data[:0]
		encodeBuffers.Put(buf)
	}
	return out, err
}

// encodeBuffers holds the buffers of EncodeBatch, up to maxPooledBuffer
// bytes each. To encode into memory in use and copy the result out costs
// less than to grow a new buffer, which the allocator clears (and the kernel
// faults in when the heap grew), and leaves the result little spare capacity.
var encodeBuffers = sync.Pool{New: func() any { return new([]byte) }}

const maxPooledBuffer = 4 << 20

// DecodeBatch decodes a published batch. It fails for an unknown content type,
// malformed JSON (a *SyntaxError), a member that is unknown or of the wrong
// type, a missing batch_id, or an event that breaks the schema (times are
// not checked against the late-event bound: that applied at ingest).
// Member names are matched exactly; times come back in UTC.
func DecodeBatch(contentType string, data []byte) (*Batch, error) {
	if contentType != BatchContentType {
		return nil, fmt.Errorf("%w %q", ErrUnknownContentType, contentType)
	}
	b := new(Batch)
	bad, err := decodeBatch(&scanner{data: data}, b)
	if err != nil {
		return nil, fmt.Errorf("decode batch: %w", err)
	}
	if bad == nil && b.ID == "" {
		bad = errors.New("batch_id is missing")
	}
	for i := 0; bad == nil && i < len(b.Events); i++ {
		e := &b.Events[i]
		if e.Time.IsZero() {
			bad = FieldError{Index: i, Field: "time", Message: "is required in a batch"}
		} else if errs := e.Validate(i, Window{}, nil); len(errs) > 0 {
			bad = errs[0]
		}
	}
	switch {
	case bad == nil:
		return b, nil
	case b.ID == "":
		return nil, fmt.Errorf("decode batch: %w", bad)
	default:
		return nil, fmt.Errorf("decode batch %s: %w", b.ID, bad)
	}
}

// decodeBatch reads the batch object at s into b. A malformed body is err;
// bad is the first member of the wrong type or an unknown name, in the batch
// or (a FieldError) in an event.
func decodeBatch(s *scanner, b *Batch) (bad, err error) {
	if s.peek() != '{' {
		return nil, &SyntaxError{Msg: "expected a JSON object"}
	}
	fail := func(member, msg string) {
		if bad == nil {
			bad = errors.New(member + ": " + msg)
		}
	}
	s.pos++
	for first := true; ; first = false {
		key, more, err := s.nextMember(first)
		if err != nil {
			return nil, err
		}
		if !more {
			return bad, s.expectEnd()
		}
		st := strOK
		switch string(key) {
		case "batch_id":
			b.ID, st, err = s.stringValue(notInterned)
		case "collector":
			b.Collector, st, err = s.stringValue(notInterned)
		case "sealed_at":
			var raw []byte
			if raw, st, err = s.stringBytes(); st == strOK {
				var valid bool
				// AppendBatch writes years 0000 to 9999 in UTC only.
				if b.SealedAt, valid = parseTime(raw, nil); !valid || b.SealedAt.Before(minBatchTime) || !b.SealedAt.Before(endBatchTime) {
					fail("sealed_at", "must be an RFC 3339 timestamp in the years 0000 to 9999 in UTC")
				}
			}
		case "events":
			switch s.peek() {
			case 'n':
				b.Events, err = nil, s.literal("null") // as encoding/json
			case '[':
				var d Decoded
				err = s.elements(&d, decodeBatchEvent)
				b.Events = d.Events
				if bad == nil && len(d.Errors) > 0 {
					bad = d.Errors[0]
				}
			default:
				fail("events", "must be an array")
				err = s.skipValue(0)
			}
		default:
			fail(string(key), "is not a known field")
			err = s.skipValue(0)
		}
		if err != nil {
			return nil, err
		}
		if st != strOK {
			fail(string(key), st.problem())
		}
	}
}

// decodeBatchEvent reads event i of a batch, as AppendBatch writes it; the
// value is read as DecodeEvents reads it, and is 0 when absent.
func decodeBatchEvent(s *scanner, i int, d *Decoded) error {
	if s.peek() != '{' {
		return notObject(s, i, d)
	}
	d.Events = append(d.Events, Event{})
	e := &d.Events[len(d.Events)-1]
	var m eventMembers
	sh := shape{i: i}
	if err := s.event(e, &m, &sh); err != nil {
		return err
	}
	if m.value != nil {
		var ok bool
		if e.Value, ok = parseValue(m.value); !ok {
			sh.fail("value", "must be a non-negative integer")
		}
	}
	if m.hasTime && !sh.failed("time") {
		var ok bool
		if e.Time, ok = parseTime(m.time, &s.lastSecond); !ok {
			sh.fail("time", "must be an RFC 3339 timestamp")
		}
	}
	d.Errors = append(d.Errors, sh.errs...)
	return nil
}
