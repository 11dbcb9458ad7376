package collector

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// slowPost is a POST /v1/events whose headers declare a body of declared
// bytes and whose body arrives only as the test sends it.
type slowPost struct {
	conn net.Conn
}

func startSlowPost(t testing.TB, srvURL string, declared int, first []byte) *slowPost {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(srvURL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	fmt.Fprintf(conn, "POST /v1/events HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n",
		ingestAdminKey, declared)
	if _, err := conn.Write(first); err != nil {
		t.Fatal(err)
	}
	return &slowPost{conn: conn}
}

// finish sends rest and reads the answer.
func (p *slowPost) finish(t testing.TB, rest []byte) (*http.Response, []byte) {
	t.Helper()
	if _, err := p.conn.Write(rest); err != nil {
		t.Fatal(err)
	}
	p.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(p.conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, body
}

// eventsBody is a JSON array of events of tenant acme with ids prefix-i,
// about 4 KB each (16 dimensions of 240 bytes), of about size bytes in all.
func eventsBody(prefix string, size int) (body []byte, n int) {
	pad := strings.Repeat("x", 240)
	var b bytes.Buffer
	b.WriteByte('[')
	for ; b.Len() < size-4200; n++ {
		if n > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"id":"%s-%d","tenant":"acme","meter":"api_calls","dimensions":{`, prefix, n)
		for d := range 16 {
			if d > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `"d%d":"%s"`, d, pad)
		}
		b.WriteString("}}")
	}
	b.WriteByte(']')
	return b.Bytes(), n
}

func postBody(t testing.TB, url string, body []byte, gz bool) (*http.Response, []byte) {
	t.Helper()
	var r io.Reader = bytes.NewReader(body)
	if gz {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		zw.Write(body)
		zw.Close()
		r = &buf
	}
	req, _ := http.NewRequest(http.MethodPost, url, r)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+ingestAdminKey)
	if gz {
		req.Header.Set("Content-Encoding", "gzip")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(resp.Body)
	return resp, answer
}

func wantOverloaded(t testing.TB, what string, resp *http.Response, body []byte) {
	t.Helper()
	var p schemas.Problem
	json.Unmarshal(body, &p)
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") != "1" ||
		resp.Header.Get("Content-Type") != schemas.MediaProblem || p.Type != schemas.ProblemBase+"overloaded" {
		t.Fatalf("%s: status %d, Retry-After %q, Content-Type %q: %s, want a 503 overloaded problem with Retry-After",
			what, resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("Content-Type"), body)
	}
}

// budgetMaxBody is the largest body and the in-flight budget of
// newBudgetEnv's collector: one body fills it.
const budgetMaxBody = 1 << 20

// newBudgetEnv is an ingest env whose in-flight budget is one largest body,
// and a reader of its collector's metrics.
func newBudgetEnv(t *testing.T) (*ingestEnv, func(name string, labels ...string) float64) {
	t.Helper()
	env := newIngestEnv(t, func(c *Config) {
		c.MaxBodyBytes = budgetMaxBody
		c.MaxInflightBodyBytes = budgetMaxBody
		c.BatchMaxEvents = 5000
	})
	return env, func(name string, labels ...string) float64 {
		return metrictest.Value(t, env.col.cfg.Registerer.(prometheus.Gatherer), name, labels...)
	}
}

// startBudgetHog starts a request of about 600 KiB of events (n of them)
// that sends 10 bytes of body and then waits, and waits until its whole
// declared body is counted in flight.
func startBudgetHog(t *testing.T, env *ingestEnv, metric func(string, ...string) float64) (slow *slowPost, body []byte, n int) {
	t.Helper()
	body, n = eventsBody("slow", 600<<10)
	slow = startSlowPost(t, env.srv.URL, len(body), body[:10])
	for deadline := time.Now().Add(5 * time.Second); metric("meterd_collector_inflight_body_bytes") != float64(len(body)); {
		if time.Now().After(deadline) {
			t.Fatalf("in-flight body bytes %v, want the slow request's %d", metric("meterd_collector_inflight_body_bytes"), len(body))
		}
		time.Sleep(5 * time.Millisecond)
	}
	return slow, body, n
}

// The body bytes of requests in flight are bounded: a request that does not
// fit beside those being read is answered 503 + Retry-After before its body
// is read (identity with Content-Length), or as soon as its decompressed
// bytes outgrow the room left (gzip); nothing of a shed request is kept, and
// once the bytes are given back the same requests are accepted. Oracle: the
// stream holds exactly the events answered 202.
func TestIngestInflightBudget(t *testing.T) {
	env, metric := newBudgetEnv(t)

	slow, slowBody, nSlow := startBudgetHog(t, env, metric)

	plain, nPlain := eventsBody("plain", 500<<10)
	resp, body := postBody(t, env.srv.URL+"/v1/events", plain, false)
	wantOverloaded(t, "identity body past the bound", resp, body)
	zipped, nZipped := eventsBody("zipped", 900<<10)
	resp, body = postBody(t, env.srv.URL+"/v1/events", zipped, true)
	wantOverloaded(t, "gzip body whose decompressed bytes pass the bound", resp, body)
	if got := metric("meterd_collector_events_rejected_total", "reason", "overloaded"); got != 2 {
		t.Errorf("rejected{overloaded} = %v, want 2", got)
	}

	resp, body = slow.finish(t, slowBody[10:])
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("slow request: status %d: %s", resp.StatusCode, body)
	}
	for _, tc := range []struct {
		body []byte
		gz   bool
	}{{plain, false}, {zipped, true}} {
		if resp, body := postBody(t, env.srv.URL+"/v1/events", tc.body, tc.gz); resp.StatusCode != http.StatusAccepted {
			t.Fatalf("retry after the slow request (gzip %v): status %d: %s", tc.gz, resp.StatusCode, body)
		}
	}
	if got := metric("meterd_collector_inflight_body_bytes"); got != 0 {
		t.Errorf("in-flight body bytes %v after every request ended, want 0", got)
	}
	seen := env.streamEvents(t)
	for prefix, n := range map[string]int{"slow": nSlow, "plain": nPlain, "zipped": nZipped} {
		for i := range n {
			if got := seen[fmt.Sprintf("acme/%s-%d", prefix, i)]; got != 1 {
				t.Fatalf("acme/%s-%d in the stream %d times, want 1", prefix, i, got)
			}
		}
	}
	if want := nSlow + nPlain + nZipped; len(seen) != want {
		t.Fatalf("stream holds %d events, want the %d answered 202", len(seen), want)
	}
}

// A client's Content-Length is not an allocation: 20 connections that each
// declare a 5 MiB body and send one byte cost the collector next to nothing
// (on a collector that grew its buffer to the declared length, 100 MiB).
func TestIngestDeclaredLengthIsNotAllocated(t *testing.T) {
	env := newIngestEnv(t, func(c *Config) { c.MaxInflightBodyBytes = 1 << 30 })
	metric := func(name string) float64 {
		return metrictest.Value(t, env.col.cfg.Registerer.(prometheus.Gatherer), name)
	}
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	const conns = 20
	for range conns {
		startSlowPost(t, env.srv.URL, DefaultMaxBodyBytes, []byte("["))
	}
	for deadline := time.Now().Add(5 * time.Second); metric("meterd_collector_inflight_body_bytes") != conns*DefaultMaxBodyBytes; {
		if time.Now().After(deadline) {
			t.Fatalf("in-flight body bytes %v, want %d: not every request is being read", metric("meterd_collector_inflight_body_bytes"), conns*DefaultMaxBodyBytes)
		}
		time.Sleep(5 * time.Millisecond)
	}
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 16<<20 {
		t.Fatalf("%d connections declaring %d bytes each made the process allocate %d MiB", conns, DefaultMaxBodyBytes, grew>>20)
	}
}

// The default bound of body bytes in flight is a sixteenth of the memory
// limit (16 MiB under the sidecar's GOMEMLIMIT of 256 MiB), never below the
// largest body; a bound set below the largest body is refused.
func TestInflightBodyBytesDefault(t *testing.T) {
	old := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(old) })
	for _, tc := range []struct {
		memLimit int64
		want     int64
	}{{math.MaxInt64, DefaultMaxInflightBodyBytes}, {256 << 20, 16 << 20}, {1 << 30, 64 << 20}, {32 << 20, DefaultMaxBodyBytes}} {
		debug.SetMemoryLimit(tc.memLimit)
		if got := defaultMaxInflightBodyBytes(DefaultMaxBodyBytes); got != tc.want {
			t.Errorf("memory limit %d: default %d, want %d", tc.memLimit, got, tc.want)
		}
	}
	cfg := Config{NATS: &nats.Conn{}, Keys: auth.Open(), SpoolDir: t.TempDir(), MaxBodyBytes: 2 << 20, MaxInflightBodyBytes: 1 << 20}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "below the largest body") {
		t.Errorf("a bound below the largest body: %v", err)
	}
}

// A request shed for the budget after part of its (gzip) body was read is
// answered at once, while its client is still sending, and keeps none of
// what it read while its remaining body is discarded: 20 such requests held
// open cost next to nothing. (net/http consumes a small unread rest of the
// body before it writes an answer, unless the handler is full duplex: the
// 503 then waited for the client's last byte or the read timeout, and each
// request kept its half-read buffer all that time, outside the budget.)
func TestIngestShedRequestAnsweredAtOnceAndHoldsNothing(t *testing.T) {
	env, metric := newBudgetEnv(t)
	startBudgetHog(t, env, metric)

	plain, _ := eventsBody("zipped", 900<<10)
	var zipped bytes.Buffer
	zw := gzip.NewWriter(&zipped)
	zw.Write(plain)
	zw.Close()
	const held = 20
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := range held {
		conn, err := net.Dial("tcp", strings.TrimPrefix(env.srv.URL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		fmt.Fprintf(conn, "POST /v1/events HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n",
			ingestAdminKey, zipped.Len())
		// All but the last bytes: the client is still sending.
		if _, err := conn.Write(zipped.Bytes()[:zipped.Len()-64]); err != nil {
			t.Fatal(err)
		}
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("request %d: no answer while the client is still sending: %v", i, err)
		}
		answer, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		wantOverloaded(t, fmt.Sprintf("request %d", i), resp, answer)
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 4<<20 {
		t.Fatalf("%d shed requests held open keep %d KiB of heap, want next to nothing", held, grew>>10)
	}
}
