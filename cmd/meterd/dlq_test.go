package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/sqlite"
	"github.com/meterd/meterd/cmd/meterd/internal/cli"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/schemas"
)

// dlqEnv is an aggregator over SQLite on an embedded JetStream that listens,
// as `meterd dev --nats-listen` does, so that the CLI can reach it.
type dlqEnv struct {
	url   string
	js    jetstream.JetStream
	store *sqlite.Store
	t0    time.Time
}

func newDLQEnv(t *testing.T) *dlqEnv {
	t.Helper()
	ns := jstest.Start(t, jstest.Config{Streams: true})
	nc, js := ns.Conn(), ns.JetStream()
	store, err := sqlite.New(sqlite.Config{Path: filepath.Join(t.TempDir(), "meterd.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	agg, err := aggregator.New(aggregator.Config{NATS: nc, Store: store, FetchWait: 20 * time.Millisecond, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- agg.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("aggregator: %v", err)
		}
	})
	return &dlqEnv{url: ns.URL(), js: js, store: store, t0: time.Now().UTC().Truncate(time.Hour)}
}

func (e *dlqEnv) batch(t *testing.T, id string, events ...schemas.Event) []byte {
	t.Helper()
	data, err := schemas.EncodeBatch(&schemas.Batch{ID: id, Collector: "test", SealedAt: e.t0, Events: events})
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func (e *dlqEnv) event(id string, value int64) schemas.Event {
	return schemas.Event{ID: id, Tenant: "acme", Meter: "api_calls", Value: value, Time: e.t0}
}

// publish sends data on usage partition 3 with batch id as Nats-Msg-Id.
func (e *dlqEnv) publish(t *testing.T, id, contentType string, data []byte) {
	t.Helper()
	msg := &nats.Msg{Subject: schemas.UsageSubject(3), Data: data, Header: nats.Header{schemas.HeaderContentType: {contentType}}}
	if _, err := e.js.PublishMsg(t.Context(), msg, jetstream.WithMsgID(id)); err != nil {
		t.Fatal(err)
	}
}

// deadLetter puts data on the DLQ as the aggregator does with a batch it
// could not process.
func (e *dlqEnv) deadLetter(t *testing.T, id string, data []byte) {
	t.Helper()
	msg := &nats.Msg{Subject: schemas.DLQSubjectPrefix + schemas.UsageSubject(3), Data: data, Header: nats.Header{}}
	msg.Header.Set(schemas.HeaderContentType, schemas.BatchContentType)
	msg.Header.Set(schemas.HeaderDLQReason, "store rejected the batch: a lock (before store errors were retried)")
	msg.Header.Set(schemas.HeaderDLQStreamSeq, "17")
	msg.Header.Set(schemas.HeaderDLQBatchID, id)
	if _, err := e.js.PublishMsg(t.Context(), msg); err != nil {
		t.Fatal(err)
	}
}

// settle waits until the aggregator has committed everything in
// METERD_USAGE, and returns acme's total.
func (e *dlqEnv) settle(t *testing.T) int64 {
	t.Helper()
	// The consumer's pending count follows a publish asynchronously, so
	// wait for its ack floor to reach the stream's last message instead.
	st, err := e.js.Stream(t.Context(), schemas.UsageStream)
	if err != nil {
		t.Fatal(err)
	}
	last := st.CachedInfo().State.LastSeq
	deadline := time.Now().Add(10 * time.Second)
	for {
		info, err := e.js.Consumer(t.Context(), schemas.UsageStream, aggregator.DefaultDurable)
		if err == nil {
			ci := info.CachedInfo()
			if ci.AckFloor.Stream >= last && ci.NumAckPending == 0 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the aggregator did not drain METERD_USAGE: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	v, err := e.store.Total(t.Context(), "acme", "api_calls", e.t0, e.t0.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return v
}

type dlqListed struct {
	Seq     uint64 `json:"seq"`
	Subject string `json:"subject"`
	BatchID string `json:"batch_id"`
	Events  int    `json:"events"`
	Reason  string `json:"reason"`
}

func (e *dlqEnv) list(t *testing.T) []dlqListed {
	t.Helper()
	code, out, errOut := meterd(t, "dlq", "list", "--nats-url", e.url, "--format", "json")
	if code != 0 {
		t.Fatalf("dlq list: exit %d: %s", code, errOut)
	}
	var rows []dlqListed
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("dlq list --format json: %v\n%s", err, out)
	}
	return rows
}

// End to end on embedded NATS and SQLite: batches on the DLQ are listed,
// shown and replayed to their original subject; a replay is counted exactly
// once however often the batch is replayed or dead-lettered, and events
// already counted are not counted again; a batch that cannot be decoded is
// not replayed; mistakes on the command line exit 2.
func TestDLQReplayExactlyOnce(t *testing.T) {
	e := newDLQEnv(t)
	e.publish(t, "g1", schemas.BatchContentType, e.batch(t, "g1", e.event("e1", 5), e.event("e2", 7)))
	if got := e.settle(t); got != 12 {
		t.Fatalf("acme total %d before any replay, want 12", got)
	}
	// b1 repeats e2 (counted with g1) and adds e3; it is dead-lettered
	// twice (two deliveries of an older aggregator).
	b1 := e.batch(t, "b1", e.event("e2", 7), e.event("e3", 11))
	e.deadLetter(t, "b1", b1)
	e.deadLetter(t, "b1", b1)
	// An undecodable batch, dead-lettered by the aggregator itself.
	e.publish(t, "junk", schemas.BatchContentType, []byte(`{"batch_id":"junk","events":[{`))
	var rows []dlqListed
	for deadline := time.Now().Add(10 * time.Second); len(rows) < 3; time.Sleep(20 * time.Millisecond) {
		if rows = e.list(t); time.Now().After(deadline) {
			t.Fatalf("DLQ holds %d letters, want 3: %+v", len(rows), rows)
		}
	}
	if rows[0].Subject != schemas.UsageSubject(3) || rows[0].BatchID != "b1" || rows[0].Events != 2 || rows[0].Reason == "" ||
		rows[2].BatchID != "junk" || rows[2].Events != 0 {
		t.Fatalf("dlq list: %+v", rows)
	}
	first, junk := strconv.FormatUint(rows[0].Seq, 10), strconv.FormatUint(rows[2].Seq, 10)

	code, out, errOut := meterd(t, "dlq", "list", "--nats-url", e.url)
	if code != 0 || !strings.Contains(out, "SEQ") || !strings.Contains(out, "b1") || strings.Count(out, "\n") != 4 {
		t.Fatalf("dlq list (table): exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = meterd(t, "dlq", "list", "--nats-url", e.url, "--format", "csv")
	if code != 0 || !strings.HasPrefix(out, "seq,time,subject,batch_id,stream_seq,events,bytes,reason\n") || strings.Count(out, "\n") != 4 {
		t.Fatalf("dlq list --format csv: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = meterd(t, "dlq", "list", "--nats-url", e.url)
	t.Log(out)
	code, out, errOut = meterd(t, "dlq", "show", first, "--nats-url", e.url)
	t.Log(out)
	if code != 0 || !strings.Contains(out, "e3") || !strings.Contains(out, "a lock") {
		t.Fatalf("dlq show: exit %d\n%s%s", code, out, errOut)
	}
	code, out, _ = meterd(t, "dlq", "show", "--format", "json", "--nats-url", e.url, first)
	var shown struct {
		Batch schemas.Batch `json:"batch"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &shown) != nil || len(shown.Batch.Events) != 2 || shown.Batch.Events[1].ID != "e3" {
		t.Fatalf("dlq show --format json: exit %d\n%s", code, out)
	}

	// Replay the first copy: e3 is counted, e2 is not counted again.
	code, out, errOut = meterd(t, "dlq", "replay", first, "--nats-url", e.url)
	if code != 0 || !strings.Contains(out, "replayed to meterd.usage.3") {
		t.Fatalf("dlq replay: exit %d\n%s%s", code, out, errOut)
	}
	if got := e.settle(t); got != 23 {
		t.Fatalf("acme total %d after the replay, want 23", got)
	}
	// The same letter again: it is gone from the DLQ.
	code, _, errOut = meterd(t, "dlq", "replay", first, "--nats-url", e.url)
	if code != 1 || !strings.Contains(errOut, "no such message") {
		t.Fatalf("replaying a replayed letter: exit %d, %s", code, errOut)
	}
	// Everything else: the second copy of b1 is replayed and counted
	// once, the undecodable batch is refused and stays.
	code, out, errOut = meterd(t, "dlq", "replay", "--all", "--nats-url", e.url, "--format", "json")
	var replays []cli.ReplayResult
	if code != 1 || json.Unmarshal([]byte(out), &replays) != nil || len(replays) != 2 ||
		replays[0].Seq != rows[1].Seq || replays[0].Error != "" || replays[0].UsageSeq == 0 ||
		replays[1].Seq != rows[2].Seq || !strings.Contains(replays[1].Error, "cannot be decoded") ||
		!strings.Contains(errOut, "1 of 2 messages not replayed") {
		t.Fatalf("dlq replay --all: exit %d\n%s%s", code, out, errOut)
	}
	if got := e.settle(t); got != 23 {
		t.Fatalf("acme total %d after replaying b1 twice, want 23", got)
	}
	if rows := e.list(t); len(rows) != 1 || strconv.FormatUint(rows[0].Seq, 10) != junk {
		t.Fatalf("DLQ after the replays: %+v, want only the undecodable letter %s", rows, junk)
	}

	// A batch that is still invalid (an event time no store can hold) is
	// refused, and stays.
	e.deadLetter(t, "bad", e.batch(t, "bad", schemas.Event{ID: "x", Tenant: "acme", Meter: "api_calls", Value: 1, Time: time.Date(1969, 7, 20, 20, 17, 0, 0, time.UTC)}))
	rows = e.list(t)
	if len(rows) != 2 {
		t.Fatalf("DLQ: %+v, want the undecodable and the invalid letter", rows)
	}
	code, _, errOut = meterd(t, "dlq", "replay", strconv.FormatUint(rows[1].Seq, 10), "--nats-url", e.url)
	if code != 1 || !strings.Contains(errOut, "still invalid") || len(e.list(t)) != 2 {
		t.Fatalf("replaying an invalid batch: exit %d, %s", code, errOut)
	}

	for _, args := range [][]string{
		{"dlq"},
		{"dlq", "frob"},
		{"dlq", "show"},
		{"dlq", "show", "abc"},
		{"dlq", "show", "0"},
		{"dlq", "show", "1", "2"},
		{"dlq", "replay", "1", "--all"},
		{"dlq", "list", "--format", "xml"},
	} {
		if code, _, errOut := meterd(t, append(args, "--nats-url", e.url)...); code != 2 || errOut == "" {
			t.Errorf("meterd %s: exit %d (%q), want 2 with a message", strings.Join(args, " "), code, errOut)
		}
	}
	code, _, errOut = meterd(t, "dlq", "list", "--nats-url", "nats://127.0.0.1:1", "--timeout", "2s")
	if code != 1 || !strings.Contains(errOut, "is NATS running") {
		t.Errorf("dlq list without NATS: exit %d, %q", code, errOut)
	}
}
