package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/schemas"
)

// readyz is one answer of GET /readyz.
type readyz struct {
	status int
	body   string
}

func getReadyz(t *testing.T, addr string) readyz {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return readyz{resp.StatusCode, string(body)}
}

// waitReadyz polls /readyz until ok says the answer is the one awaited.
func waitReadyz(t *testing.T, addr, what string, ok func(readyz) bool) readyz {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		r := getReadyz(t, addr)
		if ok(r) {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz not %s after 15s: %d %s", what, r.status, r.body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A `meterd collector` whose NATS server is shut down stays ready while its
// spool has room — its gateway stays in service (docs/architecture.md#money-safety) — and its
// /readyz says that it is spooling; it answers 503 only once the spool is
// full, and is plainly ready again once NATS is back and the spool replayed.
func TestCollectorReadyWhileNATSAway(t *testing.T) {
	bin := buildMeterd(t)
	ns := startKillBroker(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	// The enforcer creates the blocklist; the collector's gate watches it.
	if _, err := ns.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: schemas.BlocklistBucket, History: 1}); err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
	const spoolMax, maxBody = 256 << 10, 64 << 10
	col := startKillProc(t, bin, addr, "collector", "--insecure", "--nats-url", ns.URL(), "--max-body-bytes", strconv.Itoa(maxBody),
		"--spool-dir", t.TempDir(), "--spool-max-bytes", strconv.Itoa(spoolMax), "--listen", addr, "--log-format", "text")
	r := waitReadyz(t, addr, "ready", func(r readyz) bool { return r.status == http.StatusOK })
	var states map[string]string
	if err := json.Unmarshal([]byte(r.body), &states); err != nil || states["collector"] != "ok" || states["gate"] != "ok" {
		t.Fatalf("/readyz with NATS up: %s", r.body)
	}

	ns.Stop()
	r = waitReadyz(t, addr, "degraded", func(r readyz) bool { return strings.Contains(r.body, "spooling") })
	if r.status != http.StatusOK {
		t.Fatalf("/readyz with NATS away and room in the spool: %d %s, want 200", r.status, r.body)
	}
	if err := json.Unmarshal([]byte(r.body), &states); err != nil || !strings.HasPrefix(states["collector"], "nats: ") || states["gate"] != "ok" {
		t.Fatalf("/readyz with NATS away: %s, want the collector's state naming nats and spooling, the gate ok", r.body)
	}
	if _, ok := states["nats"]; ok {
		t.Errorf("/readyz has a separate nats check %q: the collector's own state covers NATS", states["nats"])
	}
	t.Logf("NATS away: /readyz %d %s", r.status, r.body)

	led := &killLedger{accepted: map[killKey]bool{}, unknown: map[killKey]bool{}}
	full := false
	for range 200 {
		if err := led.post(col.eventsURL(), led.newEvents(200)); err != nil {
			if !strings.Contains(err.Error(), "status 429") {
				t.Fatal(err)
			}
			full = true
			break
		}
	}
	if !full || led.acceptedCount() == 0 {
		t.Fatalf("%d events accepted into a %d-byte spool, full %v: want some accepted, then 429", led.acceptedCount(), spoolMax, full)
	}
	r = getReadyz(t, addr)
	if r.status != http.StatusServiceUnavailable || !strings.Contains(r.body, "spool is full") {
		t.Fatalf("/readyz with NATS away and the spool full: %d %s, want 503 naming the full spool", r.status, r.body)
	}

	ns.Start()
	waitReadyz(t, addr, "ok again", func(r readyz) bool {
		return r.status == http.StatusOK && json.Unmarshal([]byte(r.body), &states) == nil && states["collector"] == "ok"
	})
	for deadline := time.Now().Add(30 * time.Second); col.metric(t, "meterd_collector_spool_batches") > 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the spool still holds %v batches 30s after NATS came back", col.metric(t, "meterd_collector_spool_batches"))
		}
	}
	led.check(t, ns.js) // every event answered 202 was replayed, once
}

// --duplicate-window is a setting of METERD_USAGE: it takes effect where the
// stream is created (the aggregator), and the collector and the enforcer,
// which never create it, refuse it with a message naming where it belongs
// instead of ignoring it.
func TestDuplicateWindow(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  string
		args []string
	}{
		{"collector flag", "", []string{"collector", "--insecure", "--duplicate-window", "1h"}},
		{"enforcer flag", "", []string{"enforcer", "--insecure", "--sqlite-path", "x.db", "--duplicate-window=1h"}},
		{"collector env", "1h", []string{"collector", "--insecure"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("METERD_DUPLICATE_WINDOW", tc.env)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			var stderr bytes.Buffer
			args := append(tc.args, "--nats-url", "nats://127.0.0.1:1", "--listen", "127.0.0.1:0")
			if code := run(ctx, args, io.Discard, &stderr); code != 2 || !strings.Contains(stderr.String(), "`meterd aggregator`") {
				t.Fatalf("meterd %s: exit %d, %s; want 2 and a message naming the aggregator", strings.Join(args, " "), code, stderr.String())
			}
		})
	}

	t.Run("aggregator", func(t *testing.T) {
		ns := startKillBroker(t) // creates the streams with the default window
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		var stderr lockedBuffer
		code := make(chan int, 1)
		addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
		go func() {
			code <- run(ctx, []string{"aggregator", "--insecure", "--nats-url", ns.URL(), "--nats-replicas", "1",
				"--sqlite-path", filepath.Join(t.TempDir(), "meterd.db"), "--listen", addr, "--duplicate-window", "17m"}, io.Discard, &stderr)
		}()
		deadline := time.Now().Add(15 * time.Second)
		for {
			info, err := streamInfo(t, ns.js)
			if resp, herr := http.Get("http://" + addr + "/healthz"); herr == nil {
				resp.Body.Close()
				if err == nil && info.Config.Duplicates == 17*time.Minute {
					break
				}
			}
			select {
			case c := <-code:
				t.Fatalf("aggregator exited with %d: %s", c, stderr.String())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("METERD_USAGE duplicate window %v (err %v) 15s after the aggregator started with --duplicate-window 17m, or it is not serving", info.Config.Duplicates, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		cancel()
		if c := <-code; c != 0 {
			t.Errorf("aggregator exited with %d: %s", c, stderr.String())
		}
	})
}

func streamInfo(t *testing.T, js jetstream.JetStream) (*jetstream.StreamInfo, error) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, schemas.UsageStream)
	if err != nil {
		return &jetstream.StreamInfo{}, fmt.Errorf("stream: %w", err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return &jetstream.StreamInfo{}, err
	}
	return info, nil
}
