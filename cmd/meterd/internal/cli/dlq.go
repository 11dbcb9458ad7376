package cli

import (
	"cmp"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"text/tabwriter"
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
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help") {
			fmt.Fprint(stdout, dlqHelp)
			return nil
		}
		fmt.Fprint(stderr, dlqHelp)
		return Mistake(errors.New("dlq: name a command: list, show or replay"))
	}
	verb := args[0]
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
	default:
		return Mistakef("dlq: unknown command %q: use list, show or replay", verb)
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
	rows := make([]letterRow, 0, len(letters))
	for _, l := range letters {
		rows = append(rows, rowOf(l))
	}
	if done, err := printList(w, format, rows, []string{"seq", "time", "subject", "batch_id", "stream_seq", "events", "bytes", "reason"}, func(r letterRow) []string {
		return []string{u64(r.Seq), r.Time.Format(time.RFC3339), r.Subject, r.BatchID, u64(r.StreamSeq), strconv.Itoa(r.Events), strconv.Itoa(r.Bytes), csvSafe(r.Reason)}
	}); done {
		return err
	}
	if len(rows) == 0 {
		fmt.Fprintln(w, "the DLQ is empty")
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tDEAD-LETTERED\tSUBJECT\tBATCH\tEVENTS\tBYTES\tREASON")
	for _, r := range rows {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Seq, r.Time.Format(time.RFC3339), r.Subject, cmp.Or(r.BatchID, "-"),
			Group(int64(r.Events)), Group(int64(r.Bytes)), shorten(r.Reason, 80))
	}
	return tw.Flush()
}

func printLetter(w io.Writer, format string, l dlq.Letter) error {
	switch format {
	case "json":
		v := struct {
			letterRow
			Headers     nats.Header    `json:"headers"`
			Batch       *schemas.Batch `json:"batch,omitempty"`
			Data        string         `json:"data,omitempty"`
			DecodeError string         `json:"decode_error,omitempty"`
		}{letterRow: rowOf(l), Headers: l.Header, Batch: l.Batch}
		if l.DecodeErr != nil {
			v.Data, v.DecodeError = string(l.Data), l.DecodeErr.Error()
		}
		return writeJSON(w, v)
	case "csv": // the events, for a spreadsheet
		return writeCSV(w, []string{"tenant", "id", "meter", "value", "time", "dimensions"}, func(write func(...string)) {
			if l.Batch == nil {
				return
			}
			for _, e := range l.Batch.Events {
				dims, _ := json.Marshal(e.Dimensions)
				write(csvSafe(e.Tenant), csvSafe(e.ID), csvSafe(e.Meter), strconv.FormatInt(e.Value, 10), e.Time.UTC().Format(time.RFC3339Nano), csvSafe(string(dims)))
			}
		})
	}
	r := rowOf(l)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, kv := range [][2]string{
		{"Sequence", u64(r.Seq)}, {"Dead-lettered", r.Time.Format(time.RFC3339)}, {"Subject", r.Subject},
		{"Batch", cmp.Or(r.BatchID, "-")}, {"Usage seq", cmp.Or(u64(r.StreamSeq), "-")}, {"Bytes", Group(int64(r.Bytes))}, {"Reason", r.Reason},
	} {
		fmt.Fprintf(tw, "%s:\t%s\n", kv[0], kv[1])
	}
	if l.DecodeErr != nil {
		fmt.Fprintf(tw, "Undecodable:\t%v\n", l.DecodeErr)
		tw.Flush()
		fmt.Fprintf(w, "\n%s\n", shorten(string(l.Data), 2000))
		return nil
	}
	fmt.Fprintf(tw, "Collector:\t%s\nSealed:\t%s\nEvents:\t%s\n\n", l.Batch.Collector, l.Batch.SealedAt.UTC().Format(time.RFC3339), Group(int64(len(l.Batch.Events))))
	fmt.Fprintln(tw, "TENANT\tID\tMETER\tVALUE\tTIME")
	for _, e := range l.Batch.Events {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", e.Tenant, e.ID, e.Meter, Group(e.Value), e.Time.UTC().Format(time.RFC3339))
	}
	return tw.Flush()
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
	if done, err := printList(w, format, results, []string{"seq", "batch_id", "subject", "events", "msg_id", "usage_seq", "duplicate", "error"}, func(r ReplayResult) []string {
		return []string{u64(r.Seq), r.BatchID, r.Subject, strconv.Itoa(r.Events), r.MsgID, u64(r.UsageSeq), strconv.FormatBool(r.Duplicate), csvSafe(r.Error)}
	}); done {
		return err
	}
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

// printList prints rows as JSON, or as CSV (header, then the record of each
// row), when format names one of them; done is false for the table format,
// which the caller prints.
func printList[T any](w io.Writer, format string, rows []T, header []string, record func(T) []string) (done bool, err error) {
	switch format {
	case "json":
		return true, writeJSON(w, rows)
	case "csv":
		return true, writeCSV(w, header, func(write func(...string)) {
			for _, r := range rows {
				write(record(r)...)
			}
		})
	}
	return false, nil
}

// writeCSV writes the record header and then those rows writes, and
// returns the first error of writing.
func writeCSV(w io.Writer, header []string, rows func(write func(record ...string))) error {
	cw := csv.NewWriter(w)
	cw.Write(header)
	rows(func(record ...string) { cw.Write(record) })
	cw.Flush()
	return cw.Error()
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func u64(v uint64) string {
	if v == 0 {
		return ""
	}
	return strconv.FormatUint(v, 10)
}

// shorten cuts s to n bytes on a character boundary, on one line.
func shorten(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}

// csvSafe keeps a spreadsheet from reading a cell as a formula (OWASP CSV
// injection): a cell starting with = + - @ tab or CR gets a leading quote.
func csvSafe(s string) string {
	if s != "" && strings.ContainsRune("=+-@\t\r", rune(s[0])) {
		return "'" + s
	}
	return s
}
