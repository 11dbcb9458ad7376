package collector

import (
	"net/http"
	"testing"
	"time"

	"github.com/meterd/meterd/internal/broker"
)

// TestFaultUsageStreamFull: METERD_USAGE is bounded by bytes with
// DiscardNew and no age limit (docs/architecture.md#money-safety). When it is full, publishes fail:
// the collector spools, and once the spool is full it answers 429 — no
// event answered 202 is dropped. When the stream has room again (the
// aggregator trimmed it, or the bound was raised), the spool drains and
// every accepted event is in the stream exactly once.
func TestFaultUsageStreamFull(t *testing.T) {
	b := startTestBroker(t)
	ensure := func(maxBytes int64) {
		t.Helper()
		if err := broker.EnsureStreams(t.Context(), b.js, broker.StreamsConfig{Replicas: 1, UsageMaxBytes: maxBytes}); err != nil {
			t.Fatal(err)
		}
	}
	ensure(256 << 10)
	nc := connectTestNATS(t, b.URL(), "collector")
	col := startTestCollector(t, faultConfig(Config{NATS: nc, SpoolMaxBytes: 512 << 10}))
	led := newFaultLedger()

	load := startFaultLoad(t, led, col.URL(), 0)
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, tr := led.Failures()
		if tr > 0 {
			t.Fatalf("%d requests got no answer", tr)
		}
		if st[http.StatusTooManyRequests] > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no 429 after 30 s with a full stream: answers %v, %d events accepted", st, led.Accepted())
		}
		time.Sleep(20 * time.Millisecond)
	}
	load.Stop()
	if spooled := col.Metric(t, "meterd_collector_batches_total", "outcome", "spooled"); spooled == 0 {
		t.Fatal("nothing spooled while the stream was full")
	}
	st, _ := led.Failures()
	for code := range st {
		if code != http.StatusTooManyRequests && code != http.StatusServiceUnavailable {
			t.Fatalf("answers other than 202 and 429/503: %v", st)
		}
	}
	accepted := led.Accepted()

	ensure(0) // the default bound: room again
	col.WaitSpoolEmpty(t, 30*time.Second)
	if led.check(t, b); t.Failed() {
		return
	}
	t.Logf("stream full at 256 KiB: %d events accepted, answers other than 202 %v; all accepted events stored once", accepted, st)
}
