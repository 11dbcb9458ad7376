package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/schemas"
)

// TestKillCollectorWithSpool runs the meterd binary as a collector, stops
// NATS, lets the collector answer 202 from its spool under load, SIGKILLs
// it, starts NATS and a new collector on the same spool directory, and
// checks that every event answered 202 is in METERD_USAGE exactly once.
func TestKillCollectorWithSpool(t *testing.T) {
	bin := buildMeterd(t)
	ns := startKillBroker(t)
	spoolDir := t.TempDir()
	led := &killLedger{accepted: map[killKey]bool{}, unknown: map[killKey]bool{}}

	first := startKillCollector(t, bin, ns.URL(), spoolDir)
	for range 10 { // NATS up: published directly
		if err := led.post(first.eventsURL(), led.newEvents(50)); err != nil {
			t.Fatal(err)
		}
	}
	if got := first.metric(t, `meterd_collector_batches_total{outcome="published"}`); got == 0 {
		t.Fatal("no batch published while NATS was up")
	}

	ns.Stop()
	load := led.startLoad(first.eventsURL(), 4)
	before := led.acceptedCount()
	deadline := time.Now().Add(20 * time.Second)
	var spooled float64
	for {
		spooled = first.metric(t, "meterd_collector_spool_batches")
		if led.acceptedCount()-before >= 2000 && spooled > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("without NATS: %d events accepted, %v batches in the spool; want the spool to take the load",
				led.acceptedCount()-before, spooled)
		}
		time.Sleep(10 * time.Millisecond)
	}
	first.kill(t) // under load: requests in flight get no answer
	load.stop()
	if st := led.statusCount(); st > 0 {
		t.Fatalf("%d requests got an answer other than 202 or none", st)
	}
	t.Logf("killed the collector with ≥ %v batches in the spool; %d events accepted, %d with no answer",
		spooled, led.acceptedCount(), len(led.unknown))

	ns.Start()
	second := startKillCollector(t, bin, ns.URL(), spoolDir)
	deadline = time.Now().Add(30 * time.Second)
	for second.metric(t, "meterd_collector_spool_batches") > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the restarted collector's spool still holds %v batches after 30s", second.metric(t, "meterd_collector_spool_batches"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if replayed := second.metric(t, `meterd_collector_batches_total{outcome="replayed"}`); replayed < spooled {
		t.Errorf("the restarted collector replayed %v batches, want ≥ %v (the spool at the kill)", replayed, spooled)
	}
	led.check(t, ns.js)
	if err := second.terminate(); err != nil {
		t.Errorf("collector after SIGTERM: %v", err)
	}
}

// buildMeterd builds this command into a temporary directory.
func buildMeterd(t *testing.T) string {
	t.Helper()
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build meterd: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "meterd")
	cmd := exec.CommandContext(t.Context(), gobin, "build", "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// killBroker is the shared restartable JetStream of internal/jstest, with
// the streams created: the collector subcommand does not create them; an
// operator (here the test) does.
type killBroker struct {
	*jstest.Server
	js jetstream.JetStream // the test's own connection
}

func startKillBroker(t *testing.T) *killBroker {
	t.Helper()
	s := jstest.Start(t, jstest.Config{Streams: true})
	return &killBroker{Server: s, js: s.JetStream()}
}

// killProc is a running `meterd collector`.
type killProc struct {
	cmd  *exec.Cmd
	addr string
	done chan struct{}
	err  error // of Wait, once done is closed
	log  *lockedBuffer
}

func startKillCollector(t *testing.T, bin, natsURL, spoolDir string) *killProc {
	t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
	return startKillProc(t, bin, addr, "collector", "--insecure", "--nats-url", natsURL,
		"--spool-dir", spoolDir, "--listen", addr, "--log-format", "text")
}

// startKillProc runs the meterd binary with args, serving on addr, and
// waits until its /healthz answers.
func startKillProc(t *testing.T, bin, addr string, args ...string) *killProc {
	t.Helper()
	p := &killProc{addr: addr, done: make(chan struct{}), log: &lockedBuffer{}}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Env = withoutMeterdEnv(os.Environ())
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("meterd %s (%s) log:\n%s", args[0], addr, p.log.String())
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-p.done:
			t.Fatalf("meterd %s exited at start: %v\n%s", args[0], p.err, p.log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("meterd %s not healthy after 15s: %v\n%s", args[0], err, p.log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func withoutMeterdEnv(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, "METERD_") {
			out = append(out, kv)
		}
	}
	return out
}

func (p *killProc) eventsURL() string { return "http://" + p.addr + "/v1/events" }

// metric scrapes /metrics and returns the value of series, written as in
// the exposition format (name or name{label="value",…}).
func (p *killProc) metric(t *testing.T, series string) float64 {
	t.Helper()
	return metricAt(t, "http://"+p.addr, series)
}

// metricAt scrapes base/metrics (base is http://host:port) and returns the
// value of series, as killProc.metric.
func metricAt(t *testing.T, base, series string) float64 {
	t.Helper()
	all, err := seriesAt(base)
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	v, ok := all[series]
	if !ok {
		t.Fatalf("no series %s in /metrics", series)
	}
	return v
}

// kill sends SIGKILL and waits until the process is gone.
func (p *killProc) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.done
	var ee *exec.ExitError
	if !errors.As(p.err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("collector ended with %v, want killed by SIGKILL", p.err)
	}
}

// terminate sends SIGTERM and returns the exit error (nil for status 0).
func (p *killProc) terminate() error {
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-p.done:
		return p.err
	case <-time.After(20 * time.Second):
		return errors.New("still running 20s after SIGTERM")
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// killKey is the idempotency key of a usage event.
type killKey struct{ tenant, id string }

// killLedger records what clients were told: events answered 202, and
// events of requests that got no answer (they may or may not be durable).
type killLedger struct {
	next atomic.Int64

	mu       sync.Mutex
	accepted map[killKey]bool
	unknown  map[killKey]bool
	statuses int // answers other than 202
}

type killEvent struct {
	ID     string `json:"id"`
	Tenant string `json:"tenant"`
	Meter  string `json:"meter"`
	Value  int64  `json:"value"`
}

func (l *killLedger) newEvents(n int) []killEvent {
	evs := make([]killEvent, n)
	for i := range evs {
		seq := l.next.Add(1)
		evs[i] = killEvent{ID: fmt.Sprintf("ev-%08d", seq), Tenant: fmt.Sprintf("tenant-%d", seq%8), Meter: "api_calls", Value: 1}
	}
	return evs
}

func (l *killLedger) acceptedCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.accepted)
}

func (l *killLedger) statusCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.statuses
}

// post sends evs as one JSON array and records the answer. It returns the
// error of a request that got no answer.
func (l *killLedger) post(url string, evs []killEvent) error {
	body, err := json.Marshal(evs)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	var answer []byte
	if err == nil {
		answer, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	into := l.unknown
	switch {
	case err != nil:
	case resp.StatusCode == http.StatusAccepted && string(answer) == fmt.Sprintf(`{"accepted":%d,"duplicates":0}`+"\n", len(evs)):
		into = l.accepted
	default:
		l.statuses++
		err = fmt.Errorf("status %d: %s", resp.StatusCode, answer)
	}
	for _, e := range evs {
		into[killKey{e.Tenant, e.ID}] = true
	}
	return err
}

type killLoad struct {
	quit chan struct{}
	wg   sync.WaitGroup
}

// startLoad runs n clients POSTing 50 events at a time until stopped or a
// request fails.
func (l *killLedger) startLoad(url string, n int) *killLoad {
	ld := &killLoad{quit: make(chan struct{})}
	for range n {
		ld.wg.Add(1)
		go func() {
			defer ld.wg.Done()
			for {
				select {
				case <-ld.quit:
					return
				default:
				}
				if l.post(url, l.newEvents(50)) != nil {
					return
				}
			}
		}()
	}
	return ld
}

func (ld *killLoad) stop() {
	close(ld.quit)
	ld.wg.Wait()
}

// check is the oracle: every accepted event is in METERD_USAGE exactly once,
// no event twice, and nothing there that was not sent.
func (l *killLedger) check(t *testing.T, js jetstream.JetStream) {
	t.Helper()
	stored := map[killKey]int{}
	batchIDs := map[string]bool{}
	jstest.Messages(t, js, schemas.UsageStream, func(m jetstream.Msg) {
		b, err := schemas.DecodeBatch(m.Headers().Get(schemas.HeaderContentType), m.Data())
		if err != nil {
			t.Fatal(err)
		}
		if batchIDs[b.ID] {
			t.Errorf("batch %s stored twice", b.ID)
		}
		batchIDs[b.ID] = true
		for _, e := range b.Events {
			stored[killKey{e.Tenant, e.ID}]++
		}
	})

	l.mu.Lock()
	defer l.mu.Unlock()
	var missing, twice, foreign, unknownStored int
	for k := range l.accepted {
		if stored[k] == 0 {
			missing++
		}
	}
	for k, n := range stored {
		if n > 1 {
			twice++
		}
		switch {
		case l.unknown[k]:
			unknownStored++
		case !l.accepted[k]:
			foreign++
		}
	}
	if missing > 0 || twice > 0 || foreign > 0 {
		t.Errorf("oracle: %d accepted events missing, %d stored more than once, %d never sent", missing, twice, foreign)
	}
	if got, want := len(stored)-unknownStored, len(l.accepted); got != want {
		t.Errorf("stream holds %d accepted events, want %d", got, want)
	}
	t.Logf("oracle: %d events accepted, %d without an answer (%d of them stored), %d batches in the stream",
		len(l.accepted), len(l.unknown), unknownStored, len(batchIDs))
}
