package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/clickhouse"
	"github.com/meterd/meterd/aggregator/sqlite"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/schemas"
)

func TestMain(m *testing.M) { chtest.Main(m) }

// The aggregator process killed with SIGKILL while it writes, then started
// again: every batch is committed and each distinct event counted once, on
// both stores.
func TestKillAggregator(t *testing.T) {
	bin := buildMeterd(t)
	for _, kind := range []string{"sqlite", "clickhouse"} {
		t.Run(kind, func(t *testing.T) {
			b := startKillBroker(t)
			var storeFlag []string
			var open func() aggregator.Store
			switch kind {
			case "sqlite":
				path := filepath.Join(t.TempDir(), "meterd.db")
				storeFlag = []string{"--sqlite-path", path}
				open = func() aggregator.Store {
					st, err := sqlite.New(sqlite.Config{Path: path})
					if err != nil {
						t.Fatal(err)
					}
					return st
				}
			case "clickhouse":
				dsn := chtest.DSN(t)
				storeFlag = []string{"--clickhouse", dsn}
				open = func() aggregator.Store {
					st, err := clickhouse.New(t.Context(), clickhouse.Config{DSN: dsn})
					if err != nil {
						t.Fatal(err)
					}
					return st
				}
			}

			// The oracle: 300 batches of 200 events whose ids repeat across
			// batches, as client retries do.
			const batches, perBatch = 300, 200
			t0 := time.Date(2026, 11, 21, 8, 0, 0, 0, time.UTC)
			want := map[string]int64{}
			seen := map[string]bool{}
			for i := range batches {
				events := make([]schemas.Event, perBatch)
				for j := range events {
					n := i*perBatch + j
					e := schemas.Event{ID: "e" + strconv.Itoa(n%41000), Tenant: "t" + strconv.Itoa(n%9), Meter: "api_calls",
						Value: int64(n%5 + 1), Time: t0.Add(time.Duration(n%7200) * time.Second)}
					if k := e.Tenant + "/" + e.ID; !seen[k] {
						seen[k] = true
						want[e.Tenant] += e.Value
					}
					events[j] = e
				}
				data, err := schemas.EncodeBatch(&schemas.Batch{ID: fmt.Sprintf("k%d", i), Collector: "test", SealedAt: t0, Events: events})
				if err != nil {
					t.Fatal(err)
				}
				msg := &nats.Msg{Subject: schemas.UsageSubject(i % 16), Data: data, Header: nats.Header{}}
				msg.Header.Set(schemas.HeaderContentType, schemas.BatchContentType)
				if _, err := b.js.PublishMsgAsync(msg, jetstream.WithMsgID(fmt.Sprintf("k%d", i))); err != nil {
					t.Fatal(err)
				}
			}
			<-b.js.PublishAsyncComplete()

			args := func(addr string) []string {
				return append([]string{"aggregator", "--nats-url", b.URL(), "--nats-replicas", "1", "--listen", addr,
					"--log-format", "text", "--insecure", "--fetch-batch", "10", "--fetch-wait", "20ms", "--ack-wait", "2s"}, storeFlag...)
			}
			addr := "127.0.0.1:" + strconv.Itoa(killFreePort(t))
			p := startKillProc(t, bin, addr, args(addr)...)
			deadline := time.Now().Add(30 * time.Second)
			for p.metric(t, "meterd_aggregator_batches_committed_total") < 30 {
				if time.Now().After(deadline) {
					t.Fatal("no progress before the kill")
				}
				time.Sleep(5 * time.Millisecond)
			}
			p.kill(t)

			addr = "127.0.0.1:" + strconv.Itoa(killFreePort(t))
			p = startKillProc(t, bin, addr, args(addr)...)
			cons, err := b.js.Consumer(t.Context(), schemas.UsageStream, aggregator.DefaultDurable)
			if err != nil {
				t.Fatal(err)
			}
			deadline = time.Now().Add(90 * time.Second)
			for {
				info, err := cons.Info(t.Context())
				if err == nil && info.NumPending == 0 && info.NumAckPending == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("consumer not drained after restart: %+v %v", info, err)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if d := p.metric(t, "meterd_aggregator_dead_lettered_total"); d != 0 {
				t.Fatalf("%v batches dead-lettered", d)
			}
			if err := p.terminate(); err != nil {
				t.Fatalf("SIGTERM: %v", err)
			}

			store := open()
			defer store.Close()
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			for tenant, v := range want {
				got, err := store.Total(ctx, tenant, "api_calls", t0, t0.Add(3*time.Hour))
				if err != nil {
					t.Fatal(err)
				}
				if got != v {
					t.Errorf("%s: total %d, want %d", tenant, got, v)
				}
			}
			if n, err := store.Reconcile(ctx, t0, t0.Add(3*time.Hour)); err != nil || n != 0 {
				t.Errorf("rollups differ from raw events after the kill: %d rows (%v)", n, err)
			}
		})
	}
}
