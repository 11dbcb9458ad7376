package schemas

import (
	"encoding/json"
	"errors"
	"fmt"
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

// EncodeBatch encodes b for publishing with Content-Type BatchContentType.
func EncodeBatch(b *Batch) ([]byte, error) {
	return json.Marshal(b)
}

// DecodeBatch decodes a published batch. It fails for an unknown content type,
// malformed JSON, a missing batch_id, or an event that breaks the schema
// (times are not checked against the late-event bound: that applied at ingest).
func DecodeBatch(contentType string, data []byte) (*Batch, error) {
	if contentType != BatchContentType {
		return nil, fmt.Errorf("%w %q", ErrUnknownContentType, contentType)
	}
	var b Batch
	if err := json.Unmarshal(data, &b); err != nil {
		return nil, fmt.Errorf("decode batch: %w", err)
	}
	if b.ID == "" {
		return nil, errors.New("decode batch: batch_id is missing")
	}
	var errs []FieldError
	for i := range b.Events {
		e := &b.Events[i]
		if e.Time.IsZero() {
			errs = append(errs, FieldError{Index: i, Field: "time", Message: "is required in a batch"})
		}
		errs = e.Validate(i, Window{}, errs)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("decode batch %s: %w", b.ID, errs[0])
	}
	return &b, nil
}
