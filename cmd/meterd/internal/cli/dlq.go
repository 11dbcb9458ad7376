package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/broker"
	"github.com/meterd/meterd/internal/config"
	"github.com/meterd/meterd/internal/dlq"
	"github.com/meterd/meterd/internal/redact"
	"github.com/meterd/meterd/schemas"
)

const dlqHelp = `Usage:
  meterd dlq list [flags]             the batches the aggregator could never process (METERD_DLQ)
  meterd dlq show <seq> [flags]       one of them: why, where from, and its events
  meterd dlq replay <seq> [flags]     republish it to METERD_USAGE, then delete it from the DLQ
  meterd dlq replay --all [flags]     replay every one

A replay is counted exactly once, however often it is run. It talks to NATS
directly (the DLQ is a JetStream stream): pass the aggregator's --nats-url and
--nats-creds; for meterd dev, start it with --nats-listen 127.0.0.1:4222.

Examples:
  meterd dlq list
  meterd dlq show 3 --format json
  meterd dlq replay --all

Flags:
`

// dlqCmd is what the dlq commands share: how to reach NATS and how to print.
type dlqCmd struct {
	nats    config.NATS
	format  string
	timeout time.Duration
	all     bool
	from    uint64
	limit   int
}

// DLQ runs `meterd dlq list|show|replay`.
func DLQ(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	verb, err := verbOf(args, "dlq", dlqHelp, []string{"list", "show", "replay"}, stdout, stderr)
	if err != nil {
		return err
	}
	var c dlqCmd
	fs := flag.NewFlagSet("meterd dlq "+verb, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(fs.Output(), dlqHelp); fs.PrintDefaults() }
	NATSConnFlags(fs, &c.nats)
	formatFlag(fs, &c.format)
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "give up after this long")
	var maxArgs int
	switch verb {
	case "list":
		fs.Uint64Var(&c.from, "from", 1, "first DLQ sequence to list")
		fs.IntVar(&c.limit, "limit", 1000, "list at most this many (0: all)")
	case "show":
		maxArgs = 1
	case "replay":
		maxArgs = 1
		fs.BoolVar(&c.all, "all", false, "replay every message of the DLQ")
	}
	pos, err := ParseArgs(fs, args[1:], maxArgs)
	if err != nil {
		return err
	}
	if err := checkFormat(c.format); err != nil {
		return err
	}
	var seq uint64
	switch {
	case verb == "list":
	case verb == "replay" && c.all:
		if len(pos) > 0 {
			return Mistake(errors.New("dlq replay: give a sequence or --all, not both"))
		}
	case len(pos) == 0:
		return Mistakef("dlq %s: which message? give its sequence (see meterd dlq list)", verb)
	default:
		if seq, err = strconv.ParseUint(pos[0], 10, 64); err != nil || seq == 0 {
			return Mistakef("dlq %s: %q is not a DLQ sequence (a positive number, see meterd dlq list)", verb, pos[0])
		}
	}

	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	q, closeConn, err := c.connect()
	if err != nil {
		return err
	}
	defer closeConn()
	switch verb {
	case "list":
		letters, err := q.List(ctx, c.from, c.limit)
		if err != nil {
			return c.explain(err)
		}
		if err := printLetters(stdout, c.format, letters); err != nil {
			return err
		}
		if c.limit > 0 && len(letters) == c.limit {
			fmt.Fprintf(stderr, "meterd: the first %d letters; more with --from %d (or --limit 0 for all)\n", c.limit, letters[len(letters)-1].Seq+1)
		}
		return nil
	case "show":
		l, err := q.Get(ctx, seq)
		if err != nil {
			return c.explain(err)
		}
		return printLetter(stdout, c.format, l)
	}
	seqs := []uint64{seq}
	if c.all {
		letters, err := q.List(ctx, 1, 0)
		if err != nil {
			return c.explain(err)
		}
		seqs = seqs[:0]
		for _, l := range letters {
			seqs = append(seqs, l.Seq)
		}
	}
	var results []ReplayResult
	var failed int
	for _, s := range seqs {
		r, err := q.Replay(ctx, s)
		res := ReplayResult{Seq: s, BatchID: r.Letter.BatchID, Subject: r.Letter.Subject, MsgID: r.MsgID, UsageSeq: r.UsageSeq, Duplicate: r.Duplicate}
		if r.Letter.Batch != nil {
			res.Events = len(r.Letter.Batch.Events)
		}
		if err != nil {
			failed++
			res.Error = c.explain(err).Error()
		}
		results = append(results, res)
	}
	if err := printReplays(stdout, c.format, results); err != nil {
		return err
	}
	switch {
	case failed == 1 && len(results) == 1:
		return errors.New(results[0].Error)
	case failed > 0:
		return fmt.Errorf("dlq replay: %d of %d messages not replayed", failed, len(results))
	}
	return nil
}

// connect dials NATS once, without the retries a server keeps up: a
// command must fail at once when NATS is not there.
func (c *dlqCmd) connect() (*dlq.DLQ, func(), error) {
	nc, err := broker.Connect(broker.ConnConfig{
		URL: c.nats.URL, Creds: c.nats.Creds, TLSCA: c.nats.TLSCA, TLSCert: c.nats.TLSCert, TLSKey: c.nats.TLSKey,
		Name: "meterd dlq", Logger: slog.New(slog.DiscardHandler),
		Options: []nats.Option{nats.RetryOnFailedConnect(false), nats.MaxReconnects(0), nats.Timeout(min(c.timeout, 10*time.Second))},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("%w; is NATS running at --nats-url? (for meterd dev, start it with --nats-listen)", err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return dlq.New(js), nc.Close, nil
}

// explain adds what the operator can do to the errors they can act on.
func (c *dlqCmd) explain(err error) error {
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		return fmt.Errorf("%w (at %s): no aggregator has declared the streams on this NATS yet", err, redact.Userinfo(c.nats.URL))
	case errors.Is(err, dlq.ErrNotFound):
		return fmt.Errorf("%w (see meterd dlq list)", err)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%w (--timeout %s)", err, c.timeout)
	}
	return err
}

// letterRow is a letter as list prints it.
type letterRow struct {
	Seq       uint64    `json:"seq"`
	Time      time.Time `json:"time"`
	Subject   string    `json:"subject"`
	BatchID   string    `json:"batch_id"`
	StreamSeq uint64    `json:"stream_seq,omitempty"`
	Events    int       `json:"events"`
	Bytes     int       `json:"bytes"`
	Reason    string    `json:"reason"`
}

func rowOf(l dlq.Letter) letterRow {
	r := letterRow{Seq: l.Seq, Time: l.Time.UTC(), Subject: l.Subject, BatchID: l.BatchID, StreamSeq: l.StreamSeq, Bytes: len(l.Data), Reason: l.Reason}
	if l.Batch != nil {
		r.Events = len(l.Batch.Events)
	}
	return r
}

func printLetters(w io.Writer, format string, letters []dlq.Letter) error {
	t := Table{
		Columns: []Column{Col("seq"), {"time", "DEAD-LETTERED"}, Col("subject"), {"batch_id", "BATCH"}, {"stream_seq", ""},
			Col("events"), Col("bytes"), Col("reason")},
		Empty: "the DLQ is empty",
	}
	rows := make([]letterRow, 0, len(letters))
	for _, l := range letters {
		r := rowOf(l)
		rows = append(rows, r)
		t.Add(r.Seq, r.Time, r.Subject, r.BatchID, r.StreamSeq, r.Events, r.Bytes, Long(r.Reason))
	}
	t.JSON = rows
	return t.Print(w, format)
}

func printLetter(w io.Writer, format string, l dlq.Letter) error {
	r := rowOf(l)
	if format == "json" {
		v := struct {
			letterRow
			Headers     nats.Header    `json:"headers"`
			Batch       *schemas.Batch `json:"batch,omitempty"`
			Data        string         `json:"data,omitempty"`
			DecodeError string         `json:"decode_error,omitempty"`
		}{letterRow: r, Headers: l.Header, Batch: l.Batch}
		if l.DecodeErr != nil {
			v.Data, v.DecodeError = string(l.Data), l.DecodeErr.Error()
		}
		return writeJSON(w, v)
	}
	// The events, in CSV for a spreadsheet.
	events := Table{Columns: []Column{Col("tenant"), Col("id"), Col("meter"), Col("value"), Col("time"), {"dimensions", ""}}}
	if l.Batch != nil {
		for _, e := range l.Batch.Events {
			dims, _ := json.Marshal(e.Dimensions)
			events.Add(e.Tenant, e.ID, e.Meter, e.Value, e.Time, string(dims))
		}
	}
	if format == "csv" {
		return events.Print(w, format)
	}
	fields := []Field{{"Sequence", r.Seq}, {"Dead-lettered", r.Time}, {"Subject", r.Subject}, {"Batch", r.BatchID},
		{"Usage seq", r.StreamSeq}, {"Bytes", r.Bytes}, {"Reason", r.Reason}}
	if l.DecodeErr != nil {
		if err := PrintFields(w, append(fields, Field{"Undecodable", l.DecodeErr.Error()})); err != nil {
			return err
		}
		_, err := fmt.Fprintf(w, "\n%s\n", shorten(string(l.Data), 2000))
		return err
	}
	fields = append(fields, Field{"Collector", l.Batch.Collector}, Field{"Sealed", l.Batch.SealedAt}, Field{"Events", len(l.Batch.Events)})
	if err := PrintFields(w, fields); err != nil {
		return err
	}
	fmt.Fprintln(w)
	return events.Print(w, format)
}

// ReplayResult is the outcome of one replay as printed; --format json
// prints a list of them.
type ReplayResult struct {
	Seq       uint64 `json:"seq"`
	BatchID   string `json:"batch_id"`
	Subject   string `json:"subject"`
	Events    int    `json:"events"`
	MsgID     string `json:"msg_id,omitempty"`
	UsageSeq  uint64 `json:"usage_seq,omitempty"`
	Duplicate bool   `json:"duplicate,omitempty"`
	Error     string `json:"error,omitempty"`
}

func printReplays(w io.Writer, format string, results []ReplayResult) error {
	if format != "table" {
		t := Table{Columns: []Column{Col("seq"), Col("batch_id"), Col("subject"), Col("events"), Col("msg_id"), Col("usage_seq"), Col("duplicate"), Col("error")}, JSON: results}
		for _, r := range results {
			t.Add(r.Seq, r.BatchID, r.Subject, r.Events, r.MsgID, r.UsageSeq, r.Duplicate, r.Error)
		}
		return t.Print(w, format)
	}
	// For people, a replay is an action: a sentence says what it did.
	if len(results) == 0 {
		fmt.Fprintln(w, "the DLQ is empty: nothing to replay")
		return nil
	}
	for _, r := range results {
		switch {
		case r.Error != "":
			fmt.Fprintf(w, "%d: not replayed: %s\n", r.Seq, r.Error)
		case r.Duplicate:
			fmt.Fprintf(w, "%d: batch %s had been replayed already (METERD_USAGE seq %d); removed from the DLQ\n", r.Seq, r.BatchID, r.UsageSeq)
		default:
			fmt.Fprintf(w, "%d: batch %s (%s events) replayed to %s as METERD_USAGE seq %d; removed from the DLQ\n",
				r.Seq, r.BatchID, Group(int64(r.Events)), r.Subject, r.UsageSeq)
		}
	}
	return nil
}
