package collector

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Batches JetStream refuses for good are set aside (DESIGN §9): moved out of
// the spool, so that they no longer block the batches behind them, into
// SetAsideDir inside the spool directory, as files an operator can replay.
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
const SetAsideDir = "set-aside"

// Reasons a batch is set aside (label values of
// meterd_collector_spool_set_aside_total).
const (
	setAsideTooLarge   = "too_large"
	setAsideRefused    = "refused"
	setAsideUnreadable = "unreadable"
)

// setAsideReason classifies a publish error: a permanent refusal of this
// batch by JetStream gives its reason, anything else (a timeout, a
// disconnect, a stream that is missing or full) gives "" and is retried.
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

// setAside is the set-aside directory of a spool.
type setAside struct {
	dir string
	mu  sync.Mutex // serialises writers
}

// put durably writes the set-aside files of one spool record: data under
// name (written last, so a counted batch always has its reason).
func (sa *setAside) put(name string, data []byte, reason string) (string, error) {
	sa.mu.Lock()
	defer sa.mu.Unlock()
	if err := os.MkdirAll(sa.dir, 0o750); err != nil {
		return "", err
	}
	base := strings.TrimSuffix(name, filepath.Ext(name))
	if err := writeFileSync(filepath.Join(sa.dir, base+".reason"), []byte(reason)); err != nil {
		return "", err
	}
	path := filepath.Join(sa.dir, name)
	if err := writeFileSync(path, data); err != nil {
		return "", err
	}
	return path, syncDir(sa.dir)
}

// count is the number of batches set aside and not yet removed.
func (sa *setAside) count() int {
	entries, err := os.ReadDir(sa.dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		if name := e.Name(); strings.HasSuffix(name, ".json") || strings.HasSuffix(name, ".record") {
			n++
		}
	}
	return n
}

// setAsideName names the files of spool record seq holding batch id ("" for
// an unreadable record).
func setAsideName(seq uint64, id string) string {
	if id == "" {
		return fmt.Sprintf("%020d-unreadable.record", seq)
	}
	return fmt.Sprintf("%020d-%s.json", seq, id)
}

// setAsideText is the content of a .reason file.
func setAsideText(id, subject, reason string, err error, at time.Time) string {
	return fmt.Sprintf("batch_id: %s\nsubject: %s\nreason: %s\nerror: %v\nset_aside_at: %s\n",
		id, subject, reason, err, at.UTC().Format(time.RFC3339))
}

// writeFileSync writes data to path through a temporary file, fsync'd and
// renamed, so path is never seen half written.
func writeFileSync(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if err = errors.Join(err, f.Close()); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, path)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}
