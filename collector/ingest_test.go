package collector

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/schemas"
)

// Keys of the ingest tests.
const (
	ingestAdminKey = "admin-key-0123456789"
	ingestAcmeKey  = "acme-key-0123456789ab"
)

// ingestEnv is a collector on a real embedded JetStream behind a real HTTP
// server.
type ingestEnv struct {
	ns  *jstest.Server
	nc  *nats.Conn
	js  jetstream.JetStream
	col *Collector
	srv *httptest.Server
}

func newIngestEnv(t testing.TB, mutate func(*Config)) *ingestEnv {
	return newIngestEnvSync(t, true, mutate)
}

// newIngestEnvSync is newIngestEnv with JetStream fsyncing every write
// (fsync) or on its default interval.
func newIngestEnvSync(t testing.TB, fsync bool, mutate func(*Config)) *ingestEnv {
	t.Helper()
	ns := jstest.Start(t, jstest.Config{NoSync: !fsync, Streams: true})
	// In-process, as `meterd dev` connects.
	nc := ns.Connect("ingest-test", nats.InProcessServer(ns.Embedded()))
	keys, err := auth.NewKeys([]auth.Key{{Key: ingestAdminKey, Admin: true}, {Key: ingestAcmeKey, Tenant: "acme"}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Name: "test", NATS: nc, Keys: keys, SpoolDir: t.TempDir(),
		BatchMaxWait: 2 * time.Millisecond, PublishRetry: 200 * time.Millisecond, PublishTimeout: time.Second,
		Now: func() time.Time { return time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC) },
	}
	if mutate != nil {
		mutate(&cfg)
	}
	col, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- col.Run(ctx) }()
	mux := http.NewServeMux()
	col.Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(func() {
		srv.Close()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		col.Close()
	})
	return &ingestEnv{ns: ns, nc: nc, js: ns.JetStream(), col: col, srv: srv}
}

type ingestReq struct {
	contentType string
	encoding    string
	key         string
	body        string
}

func (env *ingestEnv) post(t testing.TB, r ingestReq) (*http.Response, []byte) {
	t.Helper()
	var body io.Reader = strings.NewReader(r.body)
	if r.encoding == "gzip" {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		zw.Write([]byte(r.body))
		zw.Close()
		body = &buf
	}
	req, _ := http.NewRequest(http.MethodPost, env.srv.URL+"/v1/events", body)
	if r.contentType != "" {
		req.Header.Set("Content-Type", r.contentType)
	}
	if r.encoding != "" {
		// "gzip-raw" labels an uncompressed body as gzip.
		req.Header.Set("Content-Encoding", strings.TrimSuffix(r.encoding, "-raw"))
	}
	if r.key != "" {
		req.Header.Set("Authorization", "Bearer "+r.key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// streamEvents returns every event in METERD_USAGE, keyed tenant/id, with
// how often each appears.
func (env *ingestEnv) streamEvents(t testing.TB) map[string]int {
	seen := map[string]int{}
	env.eachStreamEvent(t, func(e schemas.Event) { seen[e.Tenant+"/"+e.ID]++ })
	return seen
}

// eachStreamEvent calls fn with every event in METERD_USAGE, in order.
func (env *ingestEnv) eachStreamEvent(t testing.TB, fn func(schemas.Event)) {
	t.Helper()
	ctx := context.Background()
	s, err := env.js.Stream(ctx, schemas.UsageStream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		b, err := schemas.DecodeBatch(m.Header.Get(schemas.HeaderContentType), m.Data)
		if err != nil {
			t.Fatalf("message %d: %v", seq, err)
		}
		for _, e := range b.Events {
			fn(e)
		}
	}
}

// waitStreamEvents waits, up to 5 s, until the events in METERD_USAGE are
// exactly want (tenant/id → how often), and fails with what is there
// otherwise.
func (env *ingestEnv) waitStreamEvents(t testing.TB, want map[string]int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		seen := env.streamEvents(t)
		if maps.Equal(seen, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stream holds %d events %v, want exactly %d: %v", len(seen), seen, len(want), want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestIngestStatusCodes(t *testing.T) {
	env := newIngestEnv(t, func(c *Config) { c.MaxBodyBytes = 4096 })
	ev := func(id string) string {
		return fmt.Sprintf(`{"id":%q,"tenant":"acme","meter":"api_calls","value":2,"time":"2026-11-21T11:00:00Z"}`, id)
	}
	big := `[` + strings.Repeat(ev("x")+",", 60) + ev("x") + `]`
	cases := []struct {
		name       string
		req        ingestReq
		status     int
		accepted   int
		duplicates int
		problem    string // problem type slug
		errFields  []string
	}{
		{"object", ingestReq{"application/json", "", ingestAdminKey, ev("o1")}, 202, 1, 0, "", nil},
		{"array with a repeat", ingestReq{"application/json", "", ingestAdminKey, `[` + ev("a1") + `,` + ev("a2") + `,` + ev("a1") + `]`}, 202, 2, 1, "", nil},
		{"ndjson", ingestReq{"application/x-ndjson", "", ingestAdminKey, ev("n1") + "\n" + ev("n2") + "\n"}, 202, 2, 0, "", nil},
		{"gzip", ingestReq{"application/json; charset=utf-8", "gzip", ingestAdminKey, `[` + ev("g1") + `]`}, 202, 1, 0, "", nil},
		{"cloudevent", ingestReq{"application/cloudevents+json", "", ingestAdminKey,
			`{"specversion":"1.0","id":"c1","source":"/gw","type":"api_calls","subject":"acme","data":{"value":3,"route":"/x"}}`}, 202, 1, 0, "", nil},
		{"cloudevents batch", ingestReq{"application/cloudevents-batch+json", "", ingestAdminKey,
			`[{"specversion":"1.0","id":"c2","source":"/gw","type":"api_calls","subject":"acme"},{"specversion":"1.0","id":"c3","source":"/gw","type":"tokens","subject":"acme","data":{"value":70}}]`}, 202, 2, 0, "", nil},
		{"tenant key fills tenant", ingestReq{"application/json", "", ingestAcmeKey, `{"id":"k1","meter":"api_calls"}`}, 202, 1, 0, "", nil},
		{"malformed", ingestReq{"application/json", "", ingestAdminKey, `[{"id":"m1",`}, 400, 0, 0, "malformed-body", nil},
		{"empty array", ingestReq{"application/json", "", ingestAdminKey, `[]`}, 400, 0, 0, "no-events", nil},
		{"bad gzip", ingestReq{"application/json", "gzip-raw", ingestAdminKey, ev("z")}, 400, 0, 0, "malformed-body", nil},
		{"invalid events keep nothing", ingestReq{"application/json", "", ingestAdminKey,
			`[` + ev("i1") + `,{"id":"i2","tenant":"acme","meter":"Bad"},{"id":"","tenant":"acme","meter":"api_calls","value":-1}]`},
			422, 0, 0, "invalid-events", []string{"meter", "value", "id"}},
		{"too old", ingestReq{"application/json", "", ingestAdminKey, `{"id":"t1","tenant":"acme","meter":"api_calls","time":"2026-01-01T00:00:00Z"}`}, 422, 0, 0, "invalid-events", []string{"time"}},
		{"admin key needs a tenant", ingestReq{"application/json", "", ingestAdminKey, `{"id":"t2","meter":"api_calls"}`}, 422, 0, 0, "invalid-events", []string{"tenant"}},
		{"too large", ingestReq{"application/json", "", ingestAdminKey, big}, 413, 0, 0, "body-too-large", nil},
		{"too large after gunzip", ingestReq{"application/json", "gzip", ingestAdminKey, big}, 413, 0, 0, "body-too-large", nil},
		{"unsupported type", ingestReq{"text/plain", "", ingestAdminKey, ev("u1")}, 415, 0, 0, "unsupported-media-type", nil},
		{"unsupported encoding", ingestReq{"application/json", "br", ingestAdminKey, ev("u2")}, 415, 0, 0, "unsupported-content-encoding", nil},
		{"no key", ingestReq{"application/json", "", "", ev("a")}, 401, 0, 0, "unauthorized", nil},
		{"bad key", ingestReq{"application/json", "", "nope-nope-nope-nope", ev("a")}, 401, 0, 0, "unauthorized", nil},
		{"another tenant's events", ingestReq{"application/json", "", ingestAcmeKey, `[{"id":"f1","meter":"api_calls"},{"id":"f2","tenant":"globex","meter":"api_calls"}]`}, 403, 0, 0, "forbidden-tenant", nil},
	}
	want := 0
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := env.post(t, tc.req)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, body)
			}
			if tc.status == 202 {
				var got struct{ Accepted, Duplicates int }
				if err := json.Unmarshal(body, &got); err != nil {
					t.Fatal(err)
				}
				if got.Accepted != tc.accepted || got.Duplicates != tc.duplicates {
					t.Fatalf("got %+v, want accepted %d duplicates %d", got, tc.accepted, tc.duplicates)
				}
				return
			}
			if ct := resp.Header.Get("Content-Type"); ct != schemas.MediaProblem {
				t.Fatalf("Content-Type %q", ct)
			}
			var p schemas.Problem
			if err := json.Unmarshal(body, &p); err != nil {
				t.Fatal(err)
			}
			if p.Status != tc.status || (tc.problem != "" && p.Type != schemas.ProblemBase+tc.problem) || p.Detail == "" {
				t.Fatalf("problem %+v", p)
			}
			if tc.status == 401 && resp.Header.Get("WWW-Authenticate") == "" {
				t.Fatal("401 without WWW-Authenticate")
			}
			var fields []string
			for _, e := range p.Errors {
				fields = append(fields, e.Field)
			}
			if strings.Join(fields, ",") != strings.Join(tc.errFields, ",") {
				t.Fatalf("error fields %v, want %v (%s)", fields, tc.errFields, body)
			}
		})
		want += tc.accepted
	}
	seen := env.streamEvents(t)
	total := 0
	for k, n := range seen {
		if n != 1 {
			t.Errorf("%s in the stream %d times", k, n)
		}
		total += n
	}
	if total != want {
		t.Fatalf("stream holds %d events, want %d: %v", total, want, seen)
	}
	for _, k := range []string{"acme/k1", "acme/ce:3:/gw:c3", "acme/a1", "acme/a2"} {
		if seen[k] != 1 {
			t.Errorf("%s missing", k)
		}
	}
	for _, k := range []string{"acme/i1", "acme/f1", "acme/t2"} {
		if seen[k] != 0 {
			t.Errorf("%s of a rejected request is in the stream", k)
		}
	}
}

// A CloudEvent's fields land in the stream as the documented event.
func TestIngestCloudEventMapping(t *testing.T) {
	env := newIngestEnv(t, nil)
	resp, body := env.post(t, ingestReq{"application/cloudevents+json", "", ingestAdminKey,
		`{"specversion":"1.0","id":"ce-1","source":"/gw","type":"tokens","subject":"acme","time":"2026-11-21T10:30:00Z","data":{"value":1234,"model":"big","cached":false}}`})
	if resp.StatusCode != 202 {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	cons, err := env.js.OrderedConsumer(context.Background(), schemas.UsageStream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	m, err := cons.Next(jetstream.FetchMaxWait(2 * time.Second))
	if err != nil {
		t.Fatal(err)
	}
	b, err := schemas.DecodeBatch(m.Headers().Get(schemas.HeaderContentType), m.Data())
	if err != nil {
		t.Fatal(err)
	}
	if m.Headers().Get(jetstream.MsgIDHeader) != b.ID || b.Collector != "test" || len(b.Events) != 1 {
		t.Fatalf("batch %+v, msg id %q", b, m.Headers().Get(jetstream.MsgIDHeader))
	}
	if want := schemas.UsageSubject(schemas.Partition("acme", 16)); m.Subject() != want {
		t.Fatalf("subject %s, want %s", m.Subject(), want)
	}
	e := b.Events[0]
	if e.ID != "ce:3:/gw:ce-1" || e.Tenant != "acme" || e.Meter != "tokens" || e.Value != 1234 ||
		!e.Time.Equal(time.Date(2026, 11, 21, 10, 30, 0, 0, time.UTC)) ||
		e.Dimensions["model"] != "big" || e.Dimensions["cached"] != "false" || len(e.Dimensions) != 2 {
		t.Fatalf("event %+v", e)
	}
}

// With NATS away and the spool full, a request gets 429 with Retry-After,
// and a request that fits in the spool gets 202.
func TestIngestSpoolFull(t *testing.T) {
	env := newIngestEnv(t, func(c *Config) { c.SpoolMaxBytes = 600 })
	env.ns.Stop()
	deadline := time.Now().Add(5 * time.Second)
	for env.nc.IsConnected() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	small := `{"id":"s1","tenant":"acme","meter":"api_calls"}`
	resp, body := env.post(t, ingestReq{"application/json", "", ingestAdminKey, small})
	if resp.StatusCode != 202 {
		t.Fatalf("first request: %d %s", resp.StatusCode, body)
	}
	if n := env.col.spool.Len(); n != 1 {
		t.Fatalf("spool holds %d batches, want 1", n)
	}
	big := `[` + strings.Repeat(`{"id":"s2","tenant":"acme","meter":"api_calls","dimensions":{"route":"/a/long/route/name"}},`, 9) +
		`{"id":"s3","tenant":"acme","meter":"api_calls"}]`
	resp, body = env.post(t, ingestReq{"application/json", "", ingestAdminKey, big})
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("spool full: %d %q %s", resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}
	if n := env.col.spool.Len(); n != 1 {
		t.Fatalf("spool holds %d batches after a refused one, want 1", n)
	}
}

// Many clients at once: every 202 is in the stream exactly once.
func TestIngestConcurrentClients(t *testing.T) {
	env := newIngestEnv(t, func(c *Config) { c.BatchMaxEvents = 100 })
	const clients, requests, perRequest = 8, 25, 40
	var wg sync.WaitGroup
	errs := make(chan string, clients*requests)
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range requests {
				var sb strings.Builder
				sb.WriteByte('[')
				for i := range perRequest {
					if i > 0 {
						sb.WriteByte(',')
					}
					fmt.Fprintf(&sb, `{"id":"c%d-r%d-e%d","tenant":"t%d","meter":"api_calls"}`, c, r, i, (r*perRequest+i)%13)
				}
				sb.WriteByte(']')
				resp, body := env.post(t, ingestReq{"application/json", "", ingestAdminKey, sb.String()})
				if resp.StatusCode != 202 || !bytes.Contains(body, []byte(fmt.Sprintf(`"accepted":%d`, perRequest))) {
					errs <- fmt.Sprintf("%d %s", resp.StatusCode, body)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	seen := env.streamEvents(t)
	if len(seen) != clients*requests*perRequest {
		t.Fatalf("%d distinct events in the stream, want %d", len(seen), clients*requests*perRequest)
	}
	for k, n := range seen {
		if n != 1 {
			t.Fatalf("%s appears %d times", k, n)
		}
	}
}
