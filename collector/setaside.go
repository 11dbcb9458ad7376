package collector

import (
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Batches JetStream refuses for good are set aside (docs/architecture.md#money-safety): moved out of
// the spool, so that they no longer block the batches behind it, into
// spool.SetAsideDir inside the spool directory, as files an operator can
// replay.
//
// Why a file and not METERD_DLQ: the refusal that matters is "message too
// large", and the server's max_payload bounds every stream, the DLQ too, so
// such a batch cannot be published anywhere as it is; the spool directory is
// already durable, sized and mounted for batches. A collector sealing by
// bytes never makes such a batch: what gets set aside was written by an
// older or foreign version, or the server's limit was lowered since.
//
// Each set-aside batch is two files named after its spool sequence number
// and batch_id: <seq>-<batch_id>.json holds the batch exactly as it was to
// be published (its events keep their ids, so sending them again through
// POST /v1/events counts each once), <seq>-<batch_id>.reason says why and
// on which subject. An unreadable spool record is kept raw as
// <seq>-unreadable.record. Deleting the files after replaying them clears
// the condition.

// Reasons a batch is set aside (label values of
// meterd_collector_spool_set_aside_total).
const (
	setAsideTooLarge   = "too_large"
	setAsideUnreadable = "unreadable"
)

// setAsideReason classifies a publish error: a permanent refusal of this
// batch by JetStream gives its reason, anything else (a timeout, a
// disconnect, a stream that is missing or full) gives "" and is retried:
// setting aside every batch for a misconfigured stream would stop counting.
func setAsideReason(err error) string {
	if errors.Is(err, nats.ErrMaxPayload) {
		return setAsideTooLarge
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		switch apiErr.ErrorCode {
		case jsMessageTooLarge, jsHeaderTooLarge:
			return setAsideTooLarge
		}
	}
	return ""
}

// JetStream error codes (nats-server's errors.json) that refuse one message
// for what it is, so that publishing it again can never succeed.
const (
	jsMessageTooLarge = 10054 // JSStreamMessageExceedsMaximumErr
	jsHeaderTooLarge  = 10097 // JSStreamHeaderExceedsMaximumErr
)

// setAsideName names the files of spool record seq holding batch id ("" for
// an unreadable record).
func setAsideName(seq uint64, id string) string {
	if id == "" {
		return fmt.Sprintf("%020d-unreadable.record", seq)
	}
	return fmt.Sprintf("%020d-%s.json", seq, id)
}

// setAsideNote is the content of a .reason file.
func setAsideNote(id, subject, reason string, err error, at time.Time) string {
	return fmt.Sprintf("batch_id: %s\nsubject: %s\nreason: %s\nerror: %v\nset_aside_at: %s\n",
		id, subject, reason, err, at.UTC().Format(time.RFC3339))
}
