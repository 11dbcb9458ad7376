package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meterd/meterd/internal/jstest"
)

// memLimit is the memory limit of the collector sidecar in deploy/ (its
// GOMEMLIMIT is the container's limit).
const memLimit = 256 << 20

// TestCollectorMemoryUnderAbuse runs the meterd binary as a collector with
// GOMEMLIMIT=256MiB, as the gateway pod's sidecar runs, and abuses it the
// way issue 10 reproduced: 120 connections that each declare a 5 MiB body
// and trickle it a byte a second, then 40 clients posting ~4.5 MB at once
// (over ten times the bodies the default in-flight bound of 16 MiB admits)
// and again after each Retry-After until accepted. The process's peak RSS
// (VmHWM) must stay under 256 MiB; the requests past the bound must be
// answered 503 with Retry-After and a problem body, the slow ones cut by
// --read-timeout, and every post accepted in the end. Figures are in
// BENCHMARKS.md.
func TestCollectorMemoryUnderAbuse(t *testing.T) {
	if testing.Short() {
		t.Skip("drives ~400 MB through a collector process")
	}
	bin := buildMeterd(t)
	ns := startKillBroker(t)
	t.Setenv("GOMEMLIMIT", "256MiB") // the child's; this process read its own at start
	addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
	const readTimeout = 10 * time.Second
	col := startKillProc(t, bin, addr, "collector", "--insecure", "--nats-url", ns.URL(), "--spool-dir", t.TempDir(),
		"--listen", addr, "--log-format", "text", "--read-timeout", readTimeout.String())
	base := vmKB(t, col.cmd.Process.Pid, "VmRSS")
	budget := col.metric(t, "meterd_collector_inflight_body_limit_bytes")
	t.Logf("collector started: RSS %d MiB, in-flight body bound %.0f MiB", base>>10, budget/(1<<20))

	// 1. Slow clients: each declares 5 MiB and sends a byte a second.
	const slowConns, declared = 120, 5 << 20
	slow := make([]slowAnswer, slowConns)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range slow {
		wg.Add(1)
		go func() {
			defer wg.Done()
			slow[i] = trickle(addr, declared, readTimeout+10*time.Second)
		}()
	}
	wg.Wait()
	slowHWM := vmKB(t, col.cmd.Process.Pid, "VmHWM")
	counts := map[string]int{}
	for i, a := range slow {
		counts[a.String()]++
		switch {
		case a.err != nil:
			t.Errorf("slow client %d: %v", i, a.err)
		case a.status == http.StatusServiceUnavailable:
			if a.retryAfter == "" || !strings.Contains(a.body, "/problems/overloaded") || a.after > 5*time.Second {
				t.Errorf("slow client %d: 503 after %s, Retry-After %q: %s; want an overloaded problem with Retry-After, at once", i, a.after, a.retryAfter, a.body)
			}
		case a.status == http.StatusRequestTimeout:
			if a.after < readTimeout-time.Second || a.after > readTimeout+9*time.Second {
				t.Errorf("slow client %d: 408 after %s, want after the %s read timeout", i, a.after, readTimeout)
			}
		default:
			t.Errorf("slow client %d: %s, want 503 (over the bound) or 408 (read timeout)", i, a)
		}
	}
	admitted := counts["408"]
	if want := int(budget) / declared; admitted != want {
		t.Errorf("%d slow clients were read until the timeout, want %d (the bound / 5 MiB)", admitted, want)
	}
	t.Logf("%d slow clients in %s: %v; peak RSS %d MiB", slowConns, time.Since(start).Round(time.Millisecond), counts, slowHWM>>10)

	// 2. Over ten times the maximum-size bodies the bound admits at once,
	// each client retrying after Retry-After until it is accepted.
	// 40 bodies of 4.5 MB: more than 10× what the in-flight bound (16 MiB
	// under GOMEMLIMIT=256MiB) lets in at once. The collector sheds without
	// fairness, so a client retries until a deadline rather than a count.
	const bigPosts, bodySize, patience = 40, 4_500_000, 4 * time.Minute
	bodies := make([][]byte, 20) // each sent by 2 clients at once: the collector keeps repeats apart only within a request
	for i := range bodies {
		bodies[i] = abuseBody(fmt.Sprintf("big-%02d", i), bodySize)
	}
	var mu sync.Mutex
	answers := map[string]int{}
	accepted, done := 0, 0
	start = time.Now()
	for i := range bigPosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for giveUp := time.Now().Add(patience); time.Now().Before(giveUp); {
				a := postAbuse(addr, bodies[i%len(bodies)])
				mu.Lock()
				answers[a.String()]++
				mu.Unlock()
				switch {
				case a.err != nil:
					t.Errorf("post %d: %v", i, a.err)
					return
				case a.status == http.StatusAccepted:
					var n int
					fmt.Sscanf(a.body, `{"accepted":%d`, &n)
					mu.Lock()
					accepted, done = accepted+n, done+1
					mu.Unlock()
					return
				case a.status == http.StatusServiceUnavailable:
					secs, err := strconv.Atoi(a.retryAfter)
					if err != nil || secs < 1 || !strings.Contains(a.body, "/problems/overloaded") {
						t.Errorf("post %d: 503, Retry-After %q: %s; want an overloaded problem with Retry-After", i, a.retryAfter, a.body)
						return
					}
					time.Sleep(time.Duration(secs) * time.Second)
				default:
					t.Errorf("post %d: %s, want 202 or 503", i, a)
					return
				}
			}
			t.Errorf("post %d: not accepted in %s", i, patience)
		}()
	}
	wg.Wait()
	hwm := vmKB(t, col.cmd.Process.Pid, "VmHWM")
	t.Logf("%d clients posting %.1f MB until accepted: %d accepted in %s, answers %v, %d events accepted; peak RSS %d MiB",
		bigPosts, float64(bodySize)/1e6, done, time.Since(start).Round(time.Millisecond), answers, accepted, hwm>>10)
	if done != bigPosts || answers["503"] == 0 {
		t.Errorf("%d of %d posts accepted, answers %v: want every post accepted in the end and the excess shed with 503 meanwhile", done, bigPosts, answers)
	}
	if got := col.metric(t, "meterd_collector_events_accepted_total"); int(got) != accepted {
		t.Errorf("collector counted %v events accepted, the 202 answers %d", got, accepted)
	}
	if hwm<<10 >= memLimit {
		t.Errorf("peak RSS %d MiB, want under %d MiB", hwm>>10, memLimit>>20)
	}
	if err := col.terminate(); err != nil {
		t.Errorf("collector after SIGTERM: %v", err)
	}
}

// vmKB reads a field of /proc/<pid>/status, in KiB.
func vmKB(t *testing.T, pid int, field string) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Skipf("no /proc to measure RSS: %v", err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// slowAnswer is what a client of the abuse test got.
type slowAnswer struct {
	status     int
	retryAfter string
	body       string
	after      time.Duration
	err        error
}

func (a slowAnswer) String() string {
	if a.err != nil {
		return "error"
	}
	return strconv.Itoa(a.status)
}

// trickle opens a connection, sends headers declaring a body of declared
// bytes and then one byte a second until the server answers or within ends.
func trickle(addr string, declared int, within time.Duration) (a slowAnswer) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return slowAnswer{err: err}
	}
	defer conn.Close()
	start := time.Now()
	fmt.Fprintf(conn, "POST /v1/events HTTP/1.1\r\nHost: collector\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n[", declared)
	answered := make(chan struct{})
	go func() {
		defer close(answered)
		conn.SetReadDeadline(start.Add(within))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			a.err = err
			return
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		a.status, a.retryAfter, a.body, a.after = resp.StatusCode, resp.Header.Get("Retry-After"), string(body), time.Since(start)
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-answered:
			return a
		case <-tick.C:
			conn.Write([]byte(" ")) // fails once the server closed the connection; the answer tells
		}
	}
}

// abuseBody is a JSON array of valid events with ids prefix-i, 4 KB each
// (16 dimensions of 240 bytes, the most a dimension value may hold is 256),
// of about size bytes.
func abuseBody(prefix string, size int) []byte {
	pad := strings.Repeat("x", 240)
	var b bytes.Buffer
	b.Grow(size)
	b.WriteByte('[')
	for i := 0; b.Len() < size-4200; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"id":"%s-%d","tenant":"tenant-%d","meter":"api_calls","dimensions":{`, prefix, i, i%8)
		for d := range 16 {
			if d > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `"d%d":"%s"`, d, pad)
		}
		b.WriteString("}}")
	}
	b.WriteByte(']')
	return b.Bytes()
}

func postAbuse(addr string, body []byte) slowAnswer {
	start := time.Now()
	client := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Post("http://"+addr+"/v1/events", "application/json", bytes.NewReader(body))
	if err != nil {
		return slowAnswer{err: err}
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return slowAnswer{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After"), body: string(answer), after: time.Since(start)}
}
