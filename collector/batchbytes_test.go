package collector

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/meterd/meterd/collector/spool"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/internal/serve"
	"github.com/meterd/meterd/schemas"
)

// Tests of docs/architecture.md#money-safety "Batches are bounded by bytes" and "A request is all or
// nothing", on a real embedded JetStream (issue 10, items 1 and 6).

// lineSep is U+2028: 3 bytes in a request, 6 ("\u2028") in a batch.
const lineSep = "\u2028"

// bigConfig seals batches 5ms after their first event and keeps the default
// publish timeouts: batches of megabytes take a loaded machine (and -race)
// longer than faultConfig's 500ms to store.
func bigConfig(cfg Config) Config {
	cfg.BatchMaxWait = 5 * time.Millisecond
	return cfg
}

// bigEvent is a valid event of about 12 KB in a request (25 KB in a batch):
// 16 dimensions of 256 U+2028 each.
func bigEvent(tenant, id string) map[string]any {
	dims := make(map[string]string, schemas.MaxDimensions)
	value := strings.Repeat(lineSep, schemas.MaxDimensionValueLen)
	for d := range schemas.MaxDimensions {
		dims[fmt.Sprintf("dim_%02d", d)] = value
	}
	return map[string]any{"id": id, "tenant": tenant, "meter": "api_calls", "value": 1, "dimensions": dims}
}

// bigRequest is a JSON array of n bigEvents of tenant, ids prefix-0, ….
func bigRequest(t testing.TB, tenant, prefix string, n int) ([]byte, []eventKey) {
	t.Helper()
	evs := make([]map[string]any, n)
	keys := make([]eventKey, n)
	for i := range evs {
		id := fmt.Sprintf("%s-%04d", prefix, i)
		evs[i] = bigEvent(tenant, id)
		keys[i] = eventKey{tenant, id}
	}
	body, err := json.Marshal(evs)
	if err != nil {
		t.Fatal(err)
	}
	// encoding/json escapes U+2028 too; send the 3-byte form as a gateway
	// writing raw UTF-8 would.
	return bytes.ReplaceAll(body, []byte(`\u2028`), []byte(lineSep)), keys
}

// postBody POSTs a JSON body to url and returns the status and the answer.
func postJSONBody(t testing.TB, client *http.Client, url string, body []byte) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(answer)
}

// streamMsgSizes returns the size (data and headers) of every message in
// METERD_USAGE.
func streamMsgSizes(t testing.TB, js jetstream.JetStream) []int {
	t.Helper()
	var sizes []int
	jstest.Messages(t, js, schemas.UsageStream, func(m jetstream.Msg) {
		hdr := 0
		for k, vs := range m.Headers() {
			for _, v := range vs {
				hdr += len(k) + len(v) + 4
			}
		}
		sizes = append(sizes, len(m.Data())+hdr)
	})
	return sizes
}

// requireStored fails unless the events in METERD_USAGE are exactly want,
// each once.
func requireStored(t testing.TB, b *testBroker, want []eventKey) {
	t.Helper()
	stored, batches := readUsageStream(t, b.js)
	wantSet := make(map[eventKey]bool, len(want))
	for _, k := range want {
		wantSet[k] = true
	}
	var missing, extra, twice int
	for _, k := range want {
		if stored[k] == 0 {
			if missing++; missing <= 3 {
				t.Errorf("accepted event %v is not in the stream", k)
			}
		}
	}
	for k, n := range stored {
		if !wantSet[k] {
			if extra++; extra <= 3 {
				t.Errorf("event %v is in the stream but was not accepted", k)
			}
		}
		if n > 1 {
			twice++
		}
	}
	if missing+extra+twice > 0 {
		t.Fatalf("oracle: %d accepted events missing, %d stored that were not accepted, %d stored twice (%d batches, %d events stored, %d accepted)",
			missing, extra, twice, batches, len(stored), len(want))
	}
}

// requireNoneSetAside fails when a batch was set aside or spool room is
// still reserved.
func requireNoneSetAside(t testing.TB, col *testCollector) {
	t.Helper()
	for _, r := range []string{setAsideTooLarge, setAsideUnreadable} {
		if n := col.Metric(t, "meterd_collector_spool_set_aside_total", "reason", r); n != 0 {
			t.Errorf("%v batches set aside (%s); a collector sealing by bytes makes none", n, r)
		}
	}
	if r := col.Metric(t, "meterd_collector_spool_reserved_bytes"); r != 0 {
		t.Errorf("%v bytes of spool room still reserved with no request in flight", r)
	}
}

// TestBatchBytesLineSeparators is the repro: one valid request of
// ~4.7 MiB, 380 events whose dimensions hold U+2028 (twice their size once
// escaped in a batch, ~9 MB), is answered 202 and every event is counted:
// the collector seals batches under the stream's 8 MiB limit instead of
// sealing one batch the server refuses forever.
func TestBatchBytesLineSeparators(t *testing.T) {
	b := startTestBroker(t)
	nc := connectTestNATS(t, b.URL(), "collector")
	col := startTestCollector(t, bigConfig(Config{NATS: nc}))

	body, keys := bigRequest(t, "acme", "ls", 380)
	if len(body) > DefaultMaxBodyBytes || len(body) < 4<<20 {
		t.Fatalf("request of %d bytes; want a valid request over 4 MiB", len(body))
	}
	status, answer := postJSONBody(t, &http.Client{}, col.URL(), body)
	if status != http.StatusAccepted || answer != `{"accepted":380,"duplicates":0}`+"\n" {
		t.Fatalf("%d %s", status, answer)
	}
	col.WaitSpoolEmpty(t, 60*time.Second)
	requireStored(t, b, keys)
	limit := 8<<20 - batchHeadroom
	if got := col.Metric(t, "meterd_collector_batch_max_bytes"); got != float64(limit) {
		t.Errorf("batch_max_bytes = %v, want %d (8 MiB − headroom)", got, limit)
	}
	sizes := streamMsgSizes(t, b.js)
	for _, n := range sizes {
		if n > limit+1024 {
			t.Errorf("a batch of %d bytes is over the limit %d", n, limit)
		}
	}
	if len(sizes) < 2 {
		t.Errorf("%d batches for ~9 MB of encoded events; want them split", len(sizes))
	}
	requireNoneSetAside(t, col)
	t.Logf("request of %d bytes → %d batches of %v bytes", len(body), len(sizes), sizes)
}

// TestBatchBytesConcurrentLargeRequests: three concurrent ~4.7 MiB requests
// of one tenant share that tenant's partition, whose open batch they fill
// together; every event is counted and no batch is over the limit.
func TestBatchBytesConcurrentLargeRequests(t *testing.T) {
	b := startTestBroker(t)
	nc := connectTestNATS(t, b.URL(), "collector")
	col := startTestCollector(t, bigConfig(Config{NATS: nc}))

	var wg sync.WaitGroup
	var mu sync.Mutex
	var accepted []eventKey
	for r := range 3 {
		body, keys := bigRequest(t, "acme", fmt.Sprintf("cc%d", r), 380)
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, answer := postJSONBody(t, &http.Client{}, col.URL(), body)
			if status != http.StatusAccepted {
				t.Errorf("request %d: %d %s", r, status, answer)
				return
			}
			mu.Lock()
			accepted = append(accepted, keys...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	col.WaitSpoolEmpty(t, 60*time.Second)
	requireStored(t, b, accepted)
	for _, n := range streamMsgSizes(t, b.js) {
		if n > 8<<20-batchHeadroom+1024 {
			t.Errorf("a batch of %d bytes is over the limit", n)
		}
	}
	requireNoneSetAside(t, col)
}

// TestBatchBytesStreamLimit: the bound is read from the server, here a
// stream MaxMsgSize of 256 KiB below the server's 8 MiB max_payload, and a
// configured BatchMaxBytes can only lower it. An event that cannot fit in a
// batch alone refuses its whole request with 413 naming it.
func TestBatchBytesStreamLimit(t *testing.T) {
	b := startTestBroker(t)
	b.SetMaxMsgSize(256 << 10)
	nc := connectTestNATS(t, b.URL(), "collector")
	// A larger BatchMaxBytes does not raise the server's bound.
	col := startTestCollector(t, bigConfig(Config{NATS: nc, BatchMaxBytes: 1 << 20}))
	limit := 256<<10 - batchHeadroom
	if got := col.Metric(t, "meterd_collector_batch_max_bytes"); got != float64(limit) {
		t.Fatalf("batch_max_bytes = %v, want %d (the stream's MaxMsgSize − headroom)", got, limit)
	}
	body, keys := bigRequest(t, "acme", "sl", 100)
	if status, answer := postJSONBody(t, &http.Client{}, col.URL(), body); status != http.StatusAccepted {
		t.Fatalf("%d %s", status, answer)
	}
	col.WaitSpoolEmpty(t, 60*time.Second)
	requireStored(t, b, keys)
	sizes := streamMsgSizes(t, b.js)
	for _, n := range sizes {
		if n > limit+1024 {
			t.Errorf("a batch of %d bytes is over the limit %d", n, limit)
		}
	}
	if len(sizes) < 8 {
		t.Errorf("%d batches for ~2.4 MB of encoded events under a 240 KiB bound", len(sizes))
	}

	// A collector configured lower refuses an event that cannot fit alone.
	nc2 := connectTestNATS(t, b.URL(), "collector-2")
	small := startTestCollector(t, bigConfig(Config{NATS: nc2, BatchMaxBytes: 16 << 10}))
	if got := small.Metric(t, "meterd_collector_batch_max_bytes"); got != 16<<10 {
		t.Fatalf("batch_max_bytes = %v, want the configured %d", got, 16<<10)
	}
	mixed := fmt.Sprintf(`[{"id":"ok-1","tenant":"acme","meter":"api_calls"},%s,{"id":"ok-2","tenant":"acme","meter":"api_calls"}]`,
		mustJSON(t, bigEvent("acme", "too-big")))
	mixed = strings.ReplaceAll(mixed, `\u2028`, lineSep)
	status, answer := postJSONBody(t, &http.Client{}, small.URL(), []byte(mixed))
	if status != http.StatusRequestEntityTooLarge || !strings.Contains(answer, `\"too-big\"`) {
		t.Fatalf("an event too large for a batch: %d %s; want 413 naming it", status, answer)
	}
	time.Sleep(100 * time.Millisecond) // longer than BatchMaxWait: a batch would be out
	small.WaitSpoolEmpty(t, 10*time.Second)
	requireStored(t, b, keys) // nothing of the refused request
	requireNoneSetAside(t, small)
}

func mustJSON(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestSpoolSetAside: a spool written by an older collector holds, oldest
// first, a batch over the server's max_payload, a batch under it but over
// the stream's MaxMsgSize, an unreadable record and an ordinary batch. The
// collector replays the ordinary batch, sets the three others aside (files
// in the spool directory, a metric, /readyz degraded but still 200) and
// keeps accepting; the set-aside batches' events, sent again, are counted.
func TestSpoolSetAside(t *testing.T) {
	b := startTestBroker(t)
	b.SetMaxMsgSize(4 << 20)

	dir := t.TempDir()
	sp, err := spool.Open(spool.Config{Dir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	at := time.Now().UTC().Truncate(time.Second)
	batch := func(prefix string, n int, big bool) (string, []byte, []eventKey) {
		b := schemas.Batch{ID: nuid.Next(), Collector: "old", SealedAt: at}
		var keys []eventKey
		for i := range n {
			e := schemas.Event{ID: fmt.Sprintf("%s-%04d", prefix, i), Tenant: "acme", Meter: "api_calls", Value: 1, Time: at}
			if big {
				e.Dimensions = map[string]string{}
				for k, v := range bigEvent("", "")["dimensions"].(map[string]string) {
					e.Dimensions[k] = v
				}
			}
			b.Events = append(b.Events, e)
			keys = append(keys, eventKey{e.Tenant, e.ID})
		}
		data, err := schemas.EncodeBatch(&b)
		if err != nil {
			t.Fatal(err)
		}
		return b.ID, data, keys
	}
	subject := schemas.UsageSubject(schemas.Partition("acme", schemas.DefaultPartitions))
	hugeID, huge, hugeKeys := batch("huge", 380, true) // ~9.3 MB: over max_payload
	largeID, large, largeKeys := batch("large", 200, true)
	if len(huge) <= 8<<20 || len(large) <= 4<<20 || len(large) >= 8<<20 {
		t.Fatalf("batches of %d and %d bytes; want > 8 MiB and between 4 and 8 MiB", len(huge), len(large))
	}
	ordinaryID, ordinary, ordinaryKeys := batch("ordinary", 50, false)
	for _, rec := range [][]byte{
		encodeSpoolRecord(hugeID, subject, huge),
		encodeSpoolRecord(largeID, subject, large),
		{99, 1, 2, 3}, // a record version this collector does not know
		encodeSpoolRecord(ordinaryID, subject, ordinary),
	} {
		if err := sp.Append(rec); err != nil {
			t.Fatal(err)
		}
	}
	if err := sp.Close(); err != nil {
		t.Fatal(err)
	}

	nc := connectTestNATS(t, b.URL(), "collector")
	col := startTestCollector(t, bigConfig(Config{NATS: nc, SpoolDir: dir}))
	col.WaitSpoolEmpty(t, 60*time.Second)
	requireStored(t, b, ordinaryKeys)
	if n := col.Metric(t, "meterd_collector_spool_set_aside_total", "reason", setAsideTooLarge); n != 2 {
		t.Errorf("set_aside_total{too_large} = %v, want 2", n)
	}
	if n := col.Metric(t, "meterd_collector_spool_set_aside_total", "reason", setAsideUnreadable); n != 1 {
		t.Errorf("set_aside_total{unreadable} = %v, want 1", n)
	}
	if n := col.Metric(t, "meterd_collector_spool_set_aside_batches"); n != 3 {
		t.Errorf("set_aside_batches = %v, want 3", n)
	}
	var degraded *serve.DegradedError
	if err := col.Ready(t.Context()); !errors.As(err, &degraded) {
		t.Errorf("Ready = %v, want degraded (set-aside batches) but in service", err)
	}
	for id, want := range map[string][]byte{hugeID: huge, largeID: large} {
		files, _ := filepath.Glob(filepath.Join(dir, spool.SetAsideDir, "*-"+id+".json"))
		if len(files) != 1 {
			t.Fatalf("set-aside files of batch %s: %v", id, files)
		}
		got, err := os.ReadFile(files[0])
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("set-aside batch %s: %d bytes (err %v), want the batch's %d", id, len(got), err, len(want))
		}
		reason, err := os.ReadFile(strings.TrimSuffix(files[0], ".json") + ".reason")
		if err != nil || !strings.Contains(string(reason), "reason: too_large") {
			t.Errorf("reason file of %s: %q %v", id, reason, err)
		}
	}

	// The collector still accepts, and the set-aside events are
	// recoverable: sent again through the API, each counts once.
	accepted := append([]eventKey(nil), ordinaryKeys...)
	for _, set := range [][]eventKey{hugeKeys, largeKeys} {
		for len(set) > 0 {
			n := min(len(set), 150)
			var sb strings.Builder
			sb.WriteByte('[')
			for i, k := range set[:n] {
				if i > 0 {
					sb.WriteByte(',')
				}
				ev := bigEvent(k.tenant, k.id)
				ev["time"] = at.Format(time.RFC3339)
				sb.WriteString(mustJSON(t, ev))
			}
			sb.WriteByte(']')
			if status, answer := postJSONBody(t, &http.Client{}, col.URL(), []byte(sb.String())); status != http.StatusAccepted {
				t.Fatalf("replaying set-aside events: %d %s", status, answer)
			}
			accepted = append(accepted, set[:n]...)
			set = set[n:]
		}
	}
	col.WaitSpoolEmpty(t, 60*time.Second)
	requireStored(t, b, accepted)

	// Removing the files clears the condition.
	if err := os.RemoveAll(filepath.Join(dir, spool.SetAsideDir)); err != nil {
		t.Fatal(err)
	}
	if err := col.Ready(t.Context()); err != nil {
		t.Errorf("Ready after the set-aside files were removed: %v", err)
	}
}

// TestSpoolFullAllOrNothing: with NATS away and a small spool, many
// concurrent requests each spanning several partitions (so several
// batches) fill the spool; some are answered 202, the rest 429. After NATS
// comes back and the spool drains, the stream holds exactly the events
// answered 202: nothing of a 429'd request, everything of a 202'd one.
func TestSpoolFullAllOrNothing(t *testing.T) {
	b := startTestBroker(t)
	nc := connectTestNATS(t, b.URL(), "collector")
	col := startTestCollector(t, faultConfig(Config{NATS: nc, SpoolMaxBytes: 256 << 10}))
	b.Stop()
	for deadline := time.Now().Add(5 * time.Second); nc.IsConnected(); {
		if time.Now().After(deadline) {
			t.Fatal("the collector's connection is still up after the server stopped")
		}
		time.Sleep(5 * time.Millisecond)
	}

	const clients = 16
	var (
		mu       sync.Mutex
		accepted []eventKey
		refused  []eventKey
		statuses = map[int]int{}
		seq      int
	)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	var wg sync.WaitGroup
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; ; r++ {
				mu.Lock()
				done := statuses[http.StatusTooManyRequests] >= 60 && statuses[http.StatusAccepted] >= 20 || r >= 200
				mu.Unlock()
				if done {
					return
				}
				n := 20 + (c*7+r*13)%60 // 20 to 79 events over 8 tenants
				evs := make([]faultEvent, n)
				keys := make([]eventKey, n)
				mu.Lock()
				for i := range evs {
					seq++
					evs[i] = faultEvent{ID: fmt.Sprintf("af-%07d", seq), Tenant: fmt.Sprintf("tenant-%d", seq%8), Meter: "api_calls", Value: 1}
					keys[i] = eventKey{evs[i].Tenant, evs[i].ID}
				}
				mu.Unlock()
				status, answer := postJSONBody(t, client, col.URL(), []byte(mustJSON(t, evs)))
				mu.Lock()
				statuses[status]++
				switch status {
				case http.StatusAccepted:
					if answer != fmt.Sprintf(`{"accepted":%d,"duplicates":0}`+"\n", n) {
						t.Errorf("202 %s for %d events", answer, n)
					}
					accepted = append(accepted, keys...)
				case http.StatusTooManyRequests:
					refused = append(refused, keys...)
				default:
					t.Errorf("answer %d %s; want 202 or 429", status, answer)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	if statuses[http.StatusTooManyRequests] == 0 || statuses[http.StatusAccepted] == 0 {
		t.Fatalf("answers %v; want both 202 and 429", statuses)
	}
	if got, max := col.Metric(t, "meterd_collector_spool_bytes"), float64(256<<10); got > max {
		t.Errorf("spool holds %v bytes, over its bound %v", got, max)
	}
	if got := col.Metric(t, "meterd_collector_events_rejected_total", "reason", "spool_full"); got != float64(len(refused)) {
		t.Errorf("events rejected for a full spool: %v, want the %d events of the requests answered 429", got, len(refused))
	}

	b.Start()
	col.WaitSpoolEmpty(t, 60*time.Second)
	requireStored(t, b, accepted)
	requireNoneSetAside(t, col)
	t.Logf("answers %v: %d events accepted, %d refused, none of them stored", statuses, len(accepted), len(refused))
}

// A BatchMaxBytes too small to hold a batch of one ordinary event is a
// configuration error, as is a negative one.
func TestBatchMaxBytesValidate(t *testing.T) {
	for _, tc := range []struct {
		max int
		ok  bool
	}{{0, true}, {MinBatchMaxBytes, true}, {MinBatchMaxBytes - 1, false}, {-1, false}} {
		cfg := Config{NATS: &nats.Conn{}, Keys: auth.Open(), SpoolDir: t.TempDir(), BatchMaxBytes: tc.max}
		if err := cfg.Validate(); (err == nil) != tc.ok {
			t.Errorf("BatchMaxBytes %d: Validate = %v, want ok %v", tc.max, err, tc.ok)
		}
	}
}

// A collector starting while NATS is away does not wait for it: it bounds
// batches by NATS's default max_payload (1 MiB) minus headroom.
func TestBatchBytesNATSAwayAtStart(t *testing.T) {
	b := startTestBroker(t)
	nc := connectTestNATS(t, b.URL(), "collector")
	b.Stop()
	for deadline := time.Now().Add(5 * time.Second); nc.IsConnected(); {
		if time.Now().After(deadline) {
			t.Fatal("still connected 5s after the server stopped")
		}
		time.Sleep(5 * time.Millisecond)
	}
	start := time.Now()
	col := startTestCollector(t, bigConfig(Config{NATS: nc}))
	if d := time.Since(start); d > time.Second {
		t.Errorf("the collector took %v to start without NATS", d)
	}
	if got, want := col.Metric(t, "meterd_collector_batch_max_bytes"), float64(fallbackMaxPayload-batchHeadroom); got != want {
		t.Errorf("batch_max_bytes = %v, want %v", got, want)
	}
}
