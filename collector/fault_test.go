package collector

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meterd/meterd/internal/tcpproxy"
)

// Fault tests of exactness (docs/architecture.md#exactly-once): whatever fails, every event answered 202 is in
// METERD_USAGE exactly once. The oracle is the set of (tenant, id) the
// clients got 202 for against the events decoded from the stream.

// faultConfig makes the collector fail over fast: a batch is sealed 5ms after
// its first event, and a publish attempt gives up after 500ms; PublishRetry
// (300ms) then allows no second attempt, so the batch goes to the spool.
func faultConfig(cfg Config) Config {
	cfg.BatchMaxWait = 5 * time.Millisecond
	cfg.PublishRetry = 300 * time.Millisecond
	cfg.PublishTimeout = 500 * time.Millisecond
	return cfg
}

// Shape of the load of the fault tests.
const (
	faultClients         = 4
	faultEventsPerPost   = 50
	faultTenants         = 8 // a request spans up to 8 partitions, so several batches
	faultRequestDeadline = 30 * time.Second
)

// faultLedger records what the clients were told: the events answered 202,
// and the events of requests that got another answer or none, which may or
// may not have been made durable.
type faultLedger struct {
	next atomic.Int64 // event id sequence

	mu        sync.Mutex
	accepted  map[eventKey]struct{}
	unknown   map[eventKey]struct{}
	statuses  map[int]int // answers other than 202, by status
	transport int         // requests that ended without an answer
}

func newFaultLedger() *faultLedger {
	return &faultLedger{accepted: map[eventKey]struct{}{}, unknown: map[eventKey]struct{}{}, statuses: map[int]int{}}
}

// Accepted is the number of events answered 202.
func (l *faultLedger) Accepted() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.accepted)
}

// Failures is the number of requests not answered 202.
func (l *faultLedger) Failures() (statuses map[int]int, transport int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := make(map[int]int, len(l.statuses))
	for k, v := range l.statuses {
		s[k] = v
	}
	return s, l.transport
}

// faultEvent is the wire form of a test event.
type faultEvent struct {
	ID     string `json:"id"`
	Tenant string `json:"tenant"`
	Meter  string `json:"meter"`
	Value  int64  `json:"value"`
}

// newEvents makes n events with ids unique in the ledger, over tenants
// tenants ("tenant-0", …).
func (l *faultLedger) newEvents(n, tenants int) []faultEvent {
	evs := make([]faultEvent, n)
	for i := range evs {
		seq := l.next.Add(1)
		evs[i] = faultEvent{ID: fmt.Sprintf("ev-%08d", seq), Tenant: fmt.Sprintf("tenant-%d", seq%int64(tenants)), Meter: "api_calls", Value: 1 + seq%7}
	}
	return evs
}

// post sends events as one JSON array to url and records the outcome. It
// returns the error of a request that got no answer.
func (l *faultLedger) post(client *http.Client, url string, evs []faultEvent) error {
	body, err := json.Marshal(evs)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), faultRequestDeadline)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
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
		l.transport++
	case resp.StatusCode == http.StatusAccepted && string(answer) == fmt.Sprintf(`{"accepted":%d,"duplicates":0}`+"\n", len(evs)):
		into = l.accepted
	default:
		l.statuses[resp.StatusCode]++
	}
	for _, e := range evs {
		into[eventKey{e.Tenant, e.ID}] = struct{}{}
	}
	return err
}

// faultLoad is a set of clients sending events to a collector.
type faultLoad struct {
	stop chan struct{}
	once sync.Once
	wg   sync.WaitGroup
}

// startFaultLoad runs faultClients clients, each POSTing arrays of
// faultEventsPerPost events to url in a loop until it sent perClient
// requests (0: no bound), Stop is called, or a request gets no answer.
func startFaultLoad(t *testing.T, l *faultLedger, url string, perClient int) *faultLoad {
	t.Helper()
	tr := &http.Transport{MaxIdleConnsPerHost: faultClients}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr}
	ld := &faultLoad{stop: make(chan struct{})}
	for range faultClients {
		ld.wg.Add(1)
		go func() {
			defer ld.wg.Done()
			for n := 0; perClient == 0 || n < perClient; n++ {
				select {
				case <-ld.stop:
					return
				default:
				}
				if err := l.post(client, url, l.newEvents(faultEventsPerPost, faultTenants)); err != nil {
					return
				}
			}
		}()
	}
	t.Cleanup(ld.Stop)
	return ld
}

// Stop tells the clients to stop and waits for them.
func (ld *faultLoad) Stop() {
	ld.once.Do(func() { close(ld.stop) })
	ld.wg.Wait()
}

// Wait waits until the clients sent their requests.
func (ld *faultLoad) Wait() { ld.wg.Wait() }

// waitAccepted waits until at least n events were answered 202.
func (l *faultLedger) waitAccepted(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for l.Accepted() < n {
		if time.Now().After(deadline) {
			st, tr := l.Failures()
			t.Fatalf("only %d of %d events accepted after %v (other answers %v, no answer %d)", l.Accepted(), n, timeout, st, tr)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// requireAll202 fails the test when a request was not answered 202.
func (l *faultLedger) requireAll202(t *testing.T) {
	t.Helper()
	if st, tr := l.Failures(); len(st) > 0 || tr > 0 {
		t.Fatalf("requests not answered 202: by status %v, without an answer %d", st, tr)
	}
}

// check is the oracle: every accepted event is in the stream exactly once,
// no event is there twice, and every event there was sent. It returns how
// many events of requests with an unknown outcome are in the stream.
func (l *faultLedger) check(t *testing.T, b *testBroker) (unknownStored int) {
	t.Helper()
	stored, batches := readUsageStream(t, b.js)
	l.mu.Lock()
	defer l.mu.Unlock()
	var missing, twice, foreign int
	for k := range l.accepted {
		if stored[k] == 0 {
			if missing++; missing <= 5 {
				t.Errorf("accepted event %v is not in the stream", k)
			}
		}
	}
	for k, n := range stored {
		if n > 1 {
			if twice++; twice <= 5 {
				t.Errorf("event %v is in the stream %d times", k, n)
			}
		}
		_, acc := l.accepted[k]
		_, unk := l.unknown[k]
		switch {
		case unk:
			unknownStored++
		case !acc:
			foreign++
		}
	}
	if missing > 0 || twice > 0 || foreign > 0 {
		t.Errorf("oracle: %d accepted events missing, %d events stored more than once, %d events never sent", missing, twice, foreign)
	}
	if got, want := len(stored)-unknownStored, len(l.accepted); got != want {
		t.Errorf("stream holds %d accepted events, want %d", got, want)
	}
	t.Logf("oracle: %d events accepted, %d with an unknown outcome (%d of them stored), %d batches in the stream",
		len(l.accepted), len(l.unknown), unknownStored, batches)
	return unknownStored
}

// TestFaultNormalRun: 20 000 events from concurrent clients, NATS healthy.
func TestFaultNormalRun(t *testing.T) {
	b := startTestBroker(t)
	nc := connectTestNATS(t, b.URL(), "collector")
	col := startTestCollector(t, faultConfig(Config{NATS: nc}))
	led := newFaultLedger()

	const perClient = 100 // 4 × 100 × 50 = 20 000 events
	start := time.Now()
	startFaultLoad(t, led, col.URL(), perClient).Wait()
	t.Logf("%d events in %v", led.Accepted(), time.Since(start).Round(time.Millisecond))
	led.requireAll202(t)
	if got, want := led.Accepted(), faultClients*perClient*faultEventsPerPost; got != want {
		t.Fatalf("accepted %d events, want %d", got, want)
	}
	col.WaitSpoolEmpty(t, 20*time.Second)
	led.check(t, b)

	if got := col.Metric(t, "meterd_collector_events_accepted_total"); int(got) != led.Accepted() {
		t.Errorf("events_accepted_total = %v, want %d", got, led.Accepted())
	}
	published := col.Metric(t, "meterd_collector_batches_total", "outcome", "published")
	replayed := col.Metric(t, "meterd_collector_batches_total", "outcome", "replayed")
	if got := b.StreamMsgs(); float64(got) != published+replayed {
		t.Errorf("stream holds %d batches; the collector published %v and replayed %v", got, published, replayed)
	}
	// A duplicate ack needs an earlier attempt whose ack was lost: with
	// PublishRetry < PublishTimeout that is a publish that timed out (a slow
	// disk under JetStream's fsync) and went to the spool.
	spooled := col.Metric(t, "meterd_collector_batches_total", "outcome", "spooled")
	if dups := col.Metric(t, "meterd_collector_publish_duplicates_total"); dups > spooled {
		t.Errorf("publish_duplicates_total = %v, but only %v batches were spooled", dups, spooled)
	}
	t.Logf("%v batches published, %v spooled and replayed", published, spooled)
}

// TestFaultNATSOutage: NATS stops for 10s under load and comes back on the
// same port and store. Clients keep getting 202 from the spool; after the
// restart the spool drains and the oracle holds.
func TestFaultNATSOutage(t *testing.T) {
	b := startTestBroker(t)
	nc := connectTestNATS(t, b.URL(), "collector")
	col := startTestCollector(t, faultConfig(Config{NATS: nc}))
	led := newFaultLedger()

	load := startFaultLoad(t, led, col.URL(), 0)
	led.waitAccepted(t, 2000, 10*time.Second)
	before := led.Accepted()
	b.Stop()
	stoppedAt := time.Now()

	// Clients keep sending; their events must reach the spool.
	maxSpool := 0.0
	for time.Since(stoppedAt) < 10*time.Second {
		maxSpool = max(maxSpool, col.Metric(t, "meterd_collector_spool_batches"))
		time.Sleep(50 * time.Millisecond)
	}
	during := led.Accepted() - before
	spooled := col.Metric(t, "meterd_collector_batches_total", "outcome", "spooled")
	if during < 1000 || spooled == 0 || maxSpool == 0 {
		t.Fatalf("during the outage: %d events accepted, %v batches spooled, spool at most %v batches; want the spool to take the load",
			during, spooled, maxSpool)
	}

	b.Start()
	restartedAt := time.Now()
	led.waitAccepted(t, led.Accepted()+2000, 20*time.Second)
	load.Stop()
	led.requireAll202(t)
	col.WaitSpoolEmpty(t, 40*time.Second)
	t.Logf("outage: %d events accepted during 10s without NATS (%v batches spooled, spool peak %v); spool drained %v after the restart",
		during, spooled, maxSpool, time.Since(restartedAt).Round(time.Millisecond))

	if replayed := col.Metric(t, "meterd_collector_batches_total", "outcome", "replayed"); replayed == 0 {
		t.Error("no batch was replayed from the spool")
	}
	led.check(t, b)
}

// TestFaultLostAck: the collector talks to NATS through a proxy that drops
// everything the server sends back. A batch reaches the stream but its ack
// is lost; the collector spools it and replays it with the same batch_id,
// which JetStream reports as a duplicate once the acks flow again.
func TestFaultLostAck(t *testing.T) {
	b := startTestBroker(t)
	proxy, err := tcpproxy.New(b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	nc := connectTestNATS(t, "nats://"+proxy.Addr(), "collector")
	col := startTestCollector(t, faultConfig(Config{NATS: nc}))
	led := newFaultLedger()
	client := &http.Client{}

	// A first batch through the proxy while it forwards both ways.
	if err := led.post(client, col.URL(), led.newEvents(faultEventsPerPost, 1)); err != nil {
		t.Fatal(err)
	}
	led.requireAll202(t)
	col.WaitSpoolEmpty(t, 10*time.Second) // in case a slow disk made it time out
	acks := func() float64 {
		return col.Metric(t, "meterd_collector_batches_total", "outcome", "published") +
			col.Metric(t, "meterd_collector_batches_total", "outcome", "replayed")
	}
	msgs0, acks0, spooled0 := b.StreamMsgs(), acks(), col.Metric(t, "meterd_collector_batches_total", "outcome", "spooled")
	if msgs0 != 1 || acks0 != 1 {
		t.Fatalf("warm-up: %d batches in the stream, %v acknowledged; want 1 and 1", msgs0, acks0)
	}

	// One request of one tenant: one batch. The server stores it; its ack
	// is lost, so the collector spools it and answers 202.
	proxy.SetBlackholeServerToClient(true)
	answered := make(chan error, 1)
	go func() { answered <- led.post(client, col.URL(), led.newEvents(faultEventsPerPost, 1)) }()
	deadline := time.Now().Add(5 * time.Second)
	for b.StreamMsgs() == msgs0 {
		if time.Now().After(deadline) {
			t.Fatal("the blackholed publish never reached the stream")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if a := acks(); a != acks0 {
		t.Fatalf("acknowledged batches went from %v to %v while every ack is dropped", acks0, a)
	}
	if err := <-answered; err != nil {
		t.Fatal(err)
	}
	led.requireAll202(t) // from the spool
	if s := col.Metric(t, "meterd_collector_batches_total", "outcome", "spooled"); s != spooled0+1 {
		t.Fatalf("spooled batches went from %v to %v, want one more", spooled0, s)
	}
	if got := b.StreamMsgs(); got != msgs0+1 {
		t.Fatalf("stream holds %d batches, want %d", got, msgs0+1)
	}

	// More load while acks are lost: it is spooled, and every replay the
	// collector tries reaches the server, which keeps one copy per batch_id.
	load := startFaultLoad(t, led, col.URL(), 0)
	led.waitAccepted(t, led.Accepted()+1000, 15*time.Second)
	load.Stop()
	led.requireAll202(t)
	// Replays fail while acks are lost. The publishes a failed replay gave
	// up on must not stay pending in the client (each holds its batch)
	// until the connection happens to drop.
	deadline = time.Now().Add(5 * time.Second)
	for col.js.PublishAsyncPending() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d abandoned replay publishes still pending after 5s", col.js.PublishAsyncPending())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if d := col.Metric(t, "meterd_collector_publish_duplicates_total"); d != 0 || acks() != acks0 {
		t.Fatalf("while every ack is dropped: %v duplicates reported, acknowledged batches went from %v to %v", d, acks0, acks())
	}
	if n := col.Metric(t, "meterd_collector_spool_batches"); n == 0 {
		t.Fatal("the spool is empty while every ack is dropped")
	}
	if !nc.IsConnected() || nc.Stats().Reconnects != 0 {
		t.Fatalf("the collector's connection dropped during the blackhole (connected %v, %d reconnects); the scenario needs it open",
			nc.IsConnected(), nc.Stats().Reconnects)
	}

	proxy.SetBlackholeServerToClient(false)
	load = startFaultLoad(t, led, col.URL(), 0)
	led.waitAccepted(t, led.Accepted()+1000, 15*time.Second)
	load.Stop()
	led.requireAll202(t)
	col.WaitSpoolEmpty(t, 20*time.Second)

	if d := col.Metric(t, "meterd_collector_publish_duplicates_total"); d < 1 {
		t.Errorf("publish_duplicates_total = %v, want ≥ 1: the replay of the batch stored without an ack", d)
	}
	if p := col.Metric(t, "meterd_collector_batches_total", "outcome", "replayed"); p < 1 {
		t.Errorf("replayed batches = %v, want ≥ 1", p)
	}
	t.Logf("lost acks: %v batches spooled, %v replayed, %v duplicates reported by JetStream, %v reconnects",
		col.Metric(t, "meterd_collector_batches_total", "outcome", "spooled"),
		col.Metric(t, "meterd_collector_batches_total", "outcome", "replayed"),
		col.Metric(t, "meterd_collector_publish_duplicates_total"), nc.Stats().Reconnects)
	led.check(t, b)
}

// TestFaultGracefulShutdown: under load the HTTP server stops, then Run's
// context ends. Run returns nil and every request answered 202 is in the
// stream, or in the spool when NATS is away (or so slow that the last drain
// gave up): a collector started on that spool then replays it. Requests
// refused by the stopped server left nothing behind.
func TestFaultGracefulShutdown(t *testing.T) {
	for _, tc := range []struct {
		name     string
		natsDown bool // NATS stops under load before the shutdown
	}{
		{name: "nats_up"},
		{name: "nats_down", natsDown: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := startTestBroker(t)
			nc := connectTestNATS(t, b.URL(), "collector")
			cfg := faultConfig(Config{NATS: nc, SpoolDir: t.TempDir()})
			col := startTestCollector(t, cfg)
			led := newFaultLedger()

			load := startFaultLoad(t, led, col.URL(), 0)
			led.waitAccepted(t, 5000, 20*time.Second)
			if tc.natsDown {
				b.Stop()
				led.waitAccepted(t, led.Accepted()+2000, 20*time.Second)
			}
			if err := col.Shutdown(); err != nil {
				t.Fatalf("Run returned %v, want nil", err)
			}
			load.Stop()
			st, transport := led.Failures()
			if len(st) > 0 || transport > faultClients {
				t.Errorf("answers other than 202: by status %v, without an answer %d (want at most one per client, after the server stopped)", st, transport)
			}
			spooled := col.Metric(t, "meterd_collector_spool_batches")
			if tc.natsDown && spooled == 0 {
				t.Fatal("the spool is empty after a shutdown without NATS; the accepted events have nowhere else to be")
			}
			if spooled > 0 {
				t.Logf("%v batches stayed in the spool; replaying them with a new collector", spooled)
				if err := col.Close(); err != nil {
					t.Fatal(err)
				}
				if tc.natsDown {
					b.Start()
				}
				next := startTestCollector(t, cfg)
				next.WaitSpoolEmpty(t, 20*time.Second)
				if r := next.Metric(t, "meterd_collector_batches_total", "outcome", "replayed"); r < spooled {
					t.Errorf("the new collector replayed %v batches, want ≥ %v", r, spooled)
				}
			}
			if n := led.check(t, b); n != 0 {
				t.Errorf("%d events of requests the stopped server did not answer are in the stream", n)
			}
		})
	}
}
