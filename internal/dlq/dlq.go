// Package dlq lists, shows and replays the messages of METERD_DLQ, the
// batches the aggregator could never process (docs/architecture.md#money-safety).
//
// A replay republishes the original batch on its original subject
// (meterd.usage.<partition>) and deletes the dead letter only after
// JetStream acknowledged the republish, so a crash in between leaves the
// dead letter in place and never loses the batch. It is counted exactly
// once however often it is replayed: the republish carries a Nats-Msg-Id
// unique to the dead letter (so JetStream drops a second replay of it within
// the duplicate window), and the store counts a batch_id, and each event
// (tenant, id), once whenever it arrives.
package dlq

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/aggregator/rollup"
	"github.com/meterd/meterd/schemas"
)

// ErrNotFound is returned for a sequence that holds no dead letter.
var ErrNotFound = errors.New("dlq: no such message in " + schemas.DLQStream)

// Letter is one message of METERD_DLQ.
type Letter struct {
	// Seq is the letter's sequence in METERD_DLQ: what show and replay take.
	Seq uint64
	// Time is when it was dead-lettered.
	Time time.Time
	// Subject is the original subject, meterd.usage.<partition>.
	Subject string
	// BatchID is the original Nats-Msg-Id, or the batch's own id when the
	// header is missing; "" if neither is known.
	BatchID string
	// StreamSeq is the original sequence in METERD_USAGE, 0 if unknown.
	StreamSeq uint64
	// Reason says why it was dead-lettered.
	Reason string
	// Header and Data are the message as dead-lettered.
	Header nats.Header
	Data   []byte
	// Batch is the decoded batch, nil if it cannot be decoded (DecodeErr).
	Batch     *schemas.Batch
	DecodeErr error
}

// DLQ reads and replays METERD_DLQ over a JetStream connection.
type DLQ struct {
	js jetstream.JetStream
}

// New returns a DLQ on js.
func New(js jetstream.JetStream) *DLQ { return &DLQ{js: js} }

func (d *DLQ) stream(ctx context.Context) (jetstream.Stream, error) {
	s, err := d.js.Stream(ctx, schemas.DLQStream)
	if err != nil {
		return nil, fmt.Errorf("dlq: stream %s: %w", schemas.DLQStream, err)
	}
	return s, nil
}

// List returns up to limit letters (0: all), oldest first, from sequence
// from on.
func (d *DLQ) List(ctx context.Context, from uint64, limit int) ([]Letter, error) {
	s, err := d.stream(ctx)
	if err != nil {
		return nil, err
	}
	var out []Letter
	for seq := max(from, 1); limit <= 0 || len(out) < limit; {
		// The next message at or after seq: deleted ones are skipped.
		raw, err := s.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(schemas.DLQSubjects))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		if err != nil {
			return out, fmt.Errorf("dlq: read %s from %d: %w", schemas.DLQStream, seq, err)
		}
		out = append(out, letter(raw))
		seq = raw.Sequence + 1
	}
	return out, nil
}

// Get returns the letter at seq, or ErrNotFound.
func (d *DLQ) Get(ctx context.Context, seq uint64) (Letter, error) {
	s, err := d.stream(ctx)
	if err != nil {
		return Letter{}, err
	}
	return get(ctx, s, seq)
}

func get(ctx context.Context, s jetstream.Stream, seq uint64) (Letter, error) {
	raw, err := s.GetMsg(ctx, seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return Letter{}, fmt.Errorf("%w: %d", ErrNotFound, seq)
	}
	if err != nil {
		return Letter{}, fmt.Errorf("dlq: read %s %d: %w", schemas.DLQStream, seq, err)
	}
	return letter(raw), nil
}

func letter(raw *jetstream.RawStreamMsg) Letter {
	l := Letter{
		Seq: raw.Sequence, Time: raw.Time, Header: raw.Header, Data: raw.Data,
		Subject: strings.TrimPrefix(raw.Subject, schemas.DLQSubjectPrefix),
		Reason:  raw.Header.Get(schemas.HeaderDLQReason),
		BatchID: raw.Header.Get(schemas.HeaderDLQBatchID),
	}
	l.StreamSeq, _ = strconv.ParseUint(raw.Header.Get(schemas.HeaderDLQStreamSeq), 10, 64)
	l.Batch, l.DecodeErr = schemas.DecodeBatch(raw.Header.Get(schemas.HeaderContentType), raw.Data)
	if l.BatchID == "" && l.Batch != nil {
		l.BatchID = l.Batch.ID
	}
	return l
}

// Replayed is the outcome of one replay.
type Replayed struct {
	Letter Letter
	// MsgID is the Nats-Msg-Id the batch was republished with.
	MsgID string
	// UsageSeq is the batch's new sequence in METERD_USAGE.
	UsageSeq uint64
	// Duplicate is true when JetStream already held this replay (a replay
	// of the same letter within the duplicate window): nothing new was
	// published, and the letter is deleted all the same.
	Duplicate bool
}

// Replay republishes the letter at seq on its original subject and deletes
// it from METERD_DLQ once JetStream acknowledged the republish. A letter
// whose batch cannot be decoded, or holds an event no store can hold, is
// refused: the aggregator would only dead-letter it again.
func (d *DLQ) Replay(ctx context.Context, seq uint64) (Replayed, error) {
	s, err := d.stream(ctx)
	if err != nil {
		return Replayed{}, err
	}
	l, err := get(ctx, s, seq)
	if err != nil {
		return Replayed{}, err
	}
	if !strings.HasPrefix(l.Subject, schemas.UsageSubjectPrefix) {
		return Replayed{Letter: l}, fmt.Errorf("dlq: letter %d came from %s, not a usage subject: not replayed", seq, l.Subject)
	}
	if l.DecodeErr != nil {
		return Replayed{Letter: l}, fmt.Errorf("dlq: letter %d cannot be decoded (%v): replaying it would dead-letter it again", seq, l.DecodeErr)
	}
	// The stores' own check: a batch that still fails it would only come
	// back to the DLQ.
	if err := rollup.Check([]*schemas.Batch{l.Batch}); err != nil {
		return Replayed{Letter: l}, fmt.Errorf("dlq: letter %d is still invalid (%v): replaying it would dead-letter it again", seq, err)
	}
	msg := &nats.Msg{Subject: l.Subject, Data: l.Data, Header: nats.Header{}}
	for k, v := range l.Header {
		if !strings.HasPrefix(k, "Meterd-Dlq-") && k != jetstream.MsgIDHeader {
			msg.Header[k] = v
		}
	}
	// Unique to this letter of this DLQ stream: a second replay of it is a
	// duplicate for JetStream, a replay of another letter (the same batch
	// dead-lettered twice, or again after a replay) is not, and the store
	// counts the batch once either way. The original batch_id would be
	// dropped by JetStream as a duplicate of the original message if the
	// replay came within the duplicate window, losing the batch.
	created := s.CachedInfo().Created.UTC().Format("20060102T150405.000000000")
	r := Replayed{Letter: l, MsgID: fmt.Sprintf("%s.dlq.%s.%d", l.BatchID, created, seq)}
	ack, err := d.js.PublishMsg(ctx, msg, jetstream.WithMsgID(r.MsgID), jetstream.WithExpectStream(schemas.UsageStream))
	if err != nil {
		return r, fmt.Errorf("dlq: republish letter %d to %s: %w", seq, l.Subject, err)
	}
	r.UsageSeq, r.Duplicate = ack.Sequence, ack.Duplicate
	if err := s.DeleteMsg(ctx, seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		return r, fmt.Errorf("dlq: letter %d was republished (%s seq %d) but not deleted; replaying it again is safe: %w",
			seq, schemas.UsageStream, r.UsageSeq, err)
	}
	return r, nil
}
