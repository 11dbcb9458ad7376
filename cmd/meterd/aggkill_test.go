package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/clickhouse"
	"github.com/meterd/meterd/aggregator/sqlite"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/internal/jstest"
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
				// The process restarted after the kill keeps its dedup
				// index: the events of the killed write are in ClickHouse
				// and not in the index, which catches up.
				storeFlag = []string{"--clickhouse", dsn, "--dedup-index-dir", t.TempDir()}
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
					"--log-format", "text", "--insecure", "--fetch-batch", "10", "--fetch-wait", "20ms", "--ack-wait", "2s",
					"--lease-duration", "2s"}, storeFlag...)
			}
			addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
			p := startKillProc(t, bin, addr, args(addr)...)
			deadline := time.Now().Add(30 * time.Second)
			for p.metric(t, "meterd_aggregator_batches_committed_total") < 30 {
				if time.Now().After(deadline) {
					t.Fatal("no progress before the kill")
				}
				time.Sleep(5 * time.Millisecond)
			}
			p.kill(t)

			addr = "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
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

// killStore is the store flag of a meterd aggregator and a way to open the
// same store in the test.
func killStore(t *testing.T, kind string) ([]string, func() aggregator.Store) {
	t.Helper()
	switch kind {
	case "sqlite":
		path := filepath.Join(t.TempDir(), "meterd.db")
		return []string{"--sqlite-path", path}, func() aggregator.Store {
			st, err := sqlite.New(sqlite.Config{Path: path})
			if err != nil {
				t.Fatal(err)
			}
			return st
		}
	default:
		dsn := chtest.DSN(t)
		return []string{"--clickhouse", dsn}, func() aggregator.Store {
			st, err := clickhouse.New(t.Context(), clickhouse.Config{DSN: dsn})
			if err != nil {
				t.Fatal(err)
			}
			return st
		}
	}
}

// Two aggregator processes on the same store and durable: the second stands
// by while the first holds the writer lease. The holder is frozen with
// SIGSTOP past its lease under load: the standby takes over within the
// lease, the zombie, woken with SIGCONT, finds its lease lost and writes
// nothing, and every distinct event published is counted exactly once.
func TestAggregatorZombie(t *testing.T) {
	if testing.Short() {
		t.Skip("two aggregator processes and a freeze past the lease")
	}
	bin := buildMeterd(t)
	// Every store write must end within 4/5 of the lease, also under -race
	// on a loaded 2-core machine.
	const leaseDuration = 5 * time.Second
	for _, kind := range []string{"sqlite", "clickhouse"} {
		t.Run(kind, func(t *testing.T) {
			b := startKillBroker(t)
			storeFlag, open := killStore(t, kind)
			t0 := time.Date(2026, 11, 21, 8, 0, 0, 0, time.UTC)
			var (
				mu        sync.Mutex
				want      = map[string]int64{}
				seen      = map[string]bool{}
				published int
			)
			publish := func(i int) {
				events := make([]schemas.Event, 100)
				mu.Lock()
				for j := range events {
					n := i*100 + j
					e := schemas.Event{ID: "e" + strconv.Itoa(n%30000), Tenant: "t" + strconv.Itoa(n%7), Meter: "api_calls",
						Value: int64(n%5 + 1), Time: t0.Add(time.Duration(n%7200) * time.Second)}
					if k := e.Tenant + "/" + e.ID; !seen[k] {
						seen[k] = true
						want[e.Tenant] += e.Value
					}
					events[j] = e
				}
				published++
				mu.Unlock()
				data, err := schemas.EncodeBatch(&schemas.Batch{ID: fmt.Sprintf("z%d", i), Collector: "test", SealedAt: t0, Events: events})
				if err != nil {
					t.Error(err)
					return
				}
				msg := &nats.Msg{Subject: schemas.UsageSubject(i % 16), Data: data, Header: nats.Header{}}
				msg.Header.Set(schemas.HeaderContentType, schemas.BatchContentType)
				if _, err := b.js.PublishMsg(t.Context(), msg, jetstream.WithMsgID(fmt.Sprintf("z%d", i))); err != nil {
					t.Error(err)
				}
			}
			loadCtx, stopLoad := context.WithCancel(t.Context())
			loadDone := make(chan struct{})
			go func() {
				defer close(loadDone)
				for i := 0; loadCtx.Err() == nil; i++ {
					publish(i)
					time.Sleep(10 * time.Millisecond)
				}
			}()
			defer func() { stopLoad(); <-loadDone }()

			start := func() *killProc {
				addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
				args := append([]string{"aggregator", "--nats-url", b.URL(), "--nats-replicas", "1",
					"--listen", addr, "--log-format", "text", "--insecure", "--fetch-batch", "5", "--fetch-wait", "20ms",
					"--ack-wait", "2s", "--lease-duration", leaseDuration.String()}, storeFlag...)
				if kind == "clickhouse" {
					// Each aggregator has a dedup index of its own, as on
					// a machine (a pod) of its own: one that takes the lease
					// over catches up with what the other wrote.
					args = append(args, "--dedup-index-dir", t.TempDir())
				}
				return startKillProc(t, bin, addr, args...)
			}
			waitFor := func(what string, within time.Duration, cond func() bool) time.Duration {
				t.Helper()
				begin := time.Now()
				for !cond() {
					if time.Since(begin) > within {
						t.Fatalf("%s: not within %s", what, within)
					}
					time.Sleep(10 * time.Millisecond)
				}
				return time.Since(begin)
			}
			const leases, committed = "meterd_aggregator_writer_leases", "meterd_aggregator_batches_committed_total"
			a := start()
			waitFor("a holds the lease and commits", 20*time.Second, func() bool {
				return a.metric(t, leases) == 1 && a.metric(t, committed) >= 10
			})
			s := start()
			time.Sleep(leaseDuration + time.Second)
			if s.metric(t, leases) != 0 || s.metric(t, committed) != 0 {
				t.Fatalf("the second aggregator wrote beside the first: lease %v, %v batches committed", s.metric(t, leases), s.metric(t, committed))
			}
			if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			takeover := waitFor("the standby takes over", 4*leaseDuration, func() bool { return s.metric(t, leases) == 1 })
			if takeover > leaseDuration+time.Second {
				t.Errorf("the standby took over %s after the holder froze, want within the lease %s and a poll", takeover, leaseDuration)
			}
			base := s.metric(t, committed)
			newHolderCommits := func(within time.Duration) bool {
				for begin := time.Now(); time.Since(begin) < within; time.Sleep(10 * time.Millisecond) {
					if s.metric(t, committed) >= base+10 {
						return true
					}
				}
				return false
			}
			// A holder frozen between two writes leaves the store free: the
			// new holder commits while it sleeps. One frozen inside a write
			// holds it until it wakes: SQLite's file lock, or on ClickHouse an
			// insert still open on the server, which the new holder's
			// recovery waits for (until ClickHouse's receive_timeout at most).
			// Either way the zombie's write must not land once it wakes.
			frozenInside := !newHolderCommits(20 * time.Second)
			if frozenInside {
				t.Logf("the holder froze inside a write; the new holder commits once it wakes")
			}
			if err := a.cmd.Process.Signal(syscall.SIGCONT); err != nil {
				t.Fatal(err)
			}
			waitFor("the zombie stands down", 10*time.Second, func() bool {
				return a.metric(t, leases) == 0 && a.metric(t, "meterd_aggregator_lease_lost_total") == 1
			})
			if frozenInside && !newHolderCommits(30*time.Second) {
				t.Fatal("the new holder commits: not within 30s of the zombie waking")
			}
			if !strings.Contains(a.log.String(), "lost the writer lease") {
				t.Error("the zombie did not log the lost lease")
			}
			time.Sleep(2 * time.Second) // load goes on beside the zombie
			stopLoad()
			<-loadDone
			cons, err := b.js.Consumer(t.Context(), schemas.UsageStream, aggregator.DefaultDurable)
			if err != nil {
				t.Fatal(err)
			}
			waitFor("the consumer drains", 60*time.Second, func() bool {
				info, err := cons.Info(t.Context())
				return err == nil && info.NumPending == 0 && info.NumAckPending == 0
			})
			if a.metric(t, leases) != 0 || s.metric(t, leases) != 1 {
				t.Errorf("leases at the end: zombie %v, new holder %v", a.metric(t, leases), s.metric(t, leases))
			}
			for _, p := range []*killProc{a, s} {
				if d := p.metric(t, "meterd_aggregator_dead_lettered_total"); d != 0 {
					t.Errorf("%v batches dead-lettered", d)
				}
				if err := p.terminate(); err != nil {
					t.Errorf("SIGTERM: %v", err)
				}
			}
			store := open()
			defer store.Close()
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			mu.Lock()
			defer mu.Unlock()
			for tenant, v := range want {
				got, err := store.Total(ctx, tenant, "api_calls", t0, t0.Add(3*time.Hour))
				if err != nil {
					t.Fatal(err)
				}
				if got != v {
					t.Errorf("%s: total %d, want %d", tenant, got, v)
				}
			}
			// Reconcile compares every rollup row of the hours with the raw
			// events: on a loaded CI machine with -race that alone took
			// more than the totals' 30 s.
			rctx, rcancel := context.WithTimeout(t.Context(), 2*time.Minute)
			defer rcancel()
			if n, err := store.Reconcile(rctx, t0, t0.Add(3*time.Hour)); err != nil || n != 0 {
				t.Errorf("rollups differ from raw events: %d rows (%v)", n, err)
			}
			t.Logf("%d batches; standby took over %s after SIGSTOP", published, takeover.Round(10*time.Millisecond))
		})
	}
}
