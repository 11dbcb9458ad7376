package main

import (
	"context"
	"path/filepath"
	"slices"
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
			storeFlag, open := killStore(t, kind)
			if kind == "clickhouse" {
				// The process restarted after the kill keeps its dedup
				// index: the events of the killed write are in ClickHouse
				// and not in the index, which catches up.
				storeFlag = append(storeFlag, "--dedup-index-dir", t.TempDir())
			}

			// The oracle: 300 batches of 200 events whose ids repeat across
			// batches, as client retries do.
			o := newAggOracle(200, 41000, 9)
			for i := range 300 {
				msg, id := o.batch(t, "k", i)
				if _, err := b.js.PublishMsgAsync(msg, jetstream.WithMsgID(id)); err != nil {
					t.Fatal(err)
				}
			}
			<-b.js.PublishAsyncComplete()

			p := startKillAggregator(t, bin, b, 10, 2*time.Second, storeFlag...)
			deadline := time.Now().Add(30 * time.Second)
			for p.metric(t, "meterd_aggregator_batches_committed_total") < 30 {
				if time.Now().After(deadline) {
					t.Fatal("no progress before the kill")
				}
				time.Sleep(5 * time.Millisecond)
			}
			p.kill(t)

			p = startKillAggregator(t, bin, b, 10, 2*time.Second, storeFlag...)
			waitDrained(t, b.js, 90*time.Second)
			if d := p.metric(t, "meterd_aggregator_dead_lettered_total"); d != 0 {
				t.Fatalf("%v batches dead-lettered", d)
			}
			if err := p.terminate(); err != nil {
				t.Fatalf("SIGTERM: %v", err)
			}

			o.check(t, open())
		})
	}
}

// startKillAggregator starts `meterd aggregator` on b's NATS and the store
// of storeFlag, on a port of its own, fetching fetchBatch batches at most
// per write, under a writer lease of duration lease.
func startKillAggregator(t *testing.T, bin string, b *killBroker, fetchBatch int, lease time.Duration, storeFlag ...string) *killProc {
	t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
	return startKillProc(t, bin, addr, append([]string{"aggregator", "--nats-url", b.URL(), "--nats-replicas", "1",
		"--listen", addr, "--log-format", "text", "--insecure", "--fetch-batch", strconv.Itoa(fetchBatch), "--fetch-wait", "20ms",
		"--ack-wait", "2s", "--lease-duration", lease.String()}, storeFlag...)...)
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
			o := newAggOracle(100, 30000, 7)
			publish := func(i int) {
				msg, id := o.batch(t, "z", i)
				if _, err := b.js.PublishMsg(t.Context(), msg, jetstream.WithMsgID(id)); err != nil {
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
				flags := storeFlag
				if kind == "clickhouse" {
					// Each aggregator has a dedup index of its own, as on
					// a machine (a pod) of its own: one that takes the lease
					// over catches up with what the other wrote.
					flags = append(slices.Clip(flags), "--dedup-index-dir", t.TempDir())
				}
				return startKillAggregator(t, bin, b, 5, leaseDuration, flags...)
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
			waitDrained(t, b.js, 60*time.Second)
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
			o.check(t, open())
			t.Logf("%d batches; standby took over %s after SIGSTOP", o.batches(), takeover.Round(10*time.Millisecond))
		})
	}
}

// aggOracle makes batches of events whose ids repeat across batches, as
// client retries do, and keeps what each tenant's total must be: every
// distinct event counted once. It is safe for concurrent use.
type aggOracle struct {
	t0                     time.Time
	perBatch, ids, tenants int

	mu      sync.Mutex
	want    map[string]int64
	seen    map[string]bool
	batched int
}

// newAggOracle makes batches of perBatch events, of ids distinct ids per
// tenant at most, spread over tenants tenants and two hours.
func newAggOracle(perBatch, ids, tenants int) *aggOracle {
	return &aggOracle{t0: time.Date(2026, 11, 21, 8, 0, 0, 0, time.UTC), perBatch: perBatch, ids: ids, tenants: tenants,
		want: map[string]int64{}, seen: map[string]bool{}}
}

// batch returns batch i as the collector publishes it, and its id
// (prefix and i).
func (o *aggOracle) batch(t *testing.T, prefix string, i int) (*nats.Msg, string) {
	events := make([]schemas.Event, o.perBatch)
	o.mu.Lock()
	for j := range events {
		n := i*o.perBatch + j
		e := schemas.Event{ID: "e" + strconv.Itoa(n%o.ids), Tenant: "t" + strconv.Itoa(n%o.tenants), Meter: "api_calls",
			Value: int64(n%5 + 1), Time: o.t0.Add(time.Duration(n%7200) * time.Second)}
		if k := e.Tenant + "/" + e.ID; !o.seen[k] {
			o.seen[k] = true
			o.want[e.Tenant] += e.Value
		}
		events[j] = e
	}
	o.batched++
	o.mu.Unlock()
	id := prefix + strconv.Itoa(i)
	data, err := schemas.EncodeBatch(&schemas.Batch{ID: id, Collector: "test", SealedAt: o.t0, Events: events})
	if err != nil {
		t.Error(err)
	}
	msg := &nats.Msg{Subject: schemas.UsageSubject(i % 16), Data: data, Header: nats.Header{}}
	msg.Header.Set(schemas.HeaderContentType, schemas.BatchContentType)
	return msg, id
}

// batches is how many batches were made.
func (o *aggOracle) batches() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.batched
}

// check closes store after checking that it holds each tenant's total
// exactly, and rollups that agree with the raw events.
func (o *aggOracle) check(t *testing.T, store aggregator.Store) {
	t.Helper()
	defer store.Close()
	from, to := o.t0, o.t0.Add(3*time.Hour)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	o.mu.Lock()
	defer o.mu.Unlock()
	for tenant, v := range o.want {
		got, err := store.Total(ctx, tenant, "api_calls", from, to)
		if err != nil {
			t.Fatal(err)
		}
		if got != v {
			t.Errorf("%s: total %d, want %d", tenant, got, v)
		}
	}
	// Reconcile compares every rollup row of the hours with the raw
	// events: on a loaded CI machine with -race that alone took more than
	// the totals' 30 s.
	rctx, rcancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer rcancel()
	if n, err := store.Reconcile(rctx, from, to); err != nil || n != 0 {
		t.Errorf("rollups differ from raw events: %d rows (%v)", n, err)
	}
}

// waitDrained waits until the aggregator's consumer has nothing pending
// or unacknowledged.
func waitDrained(t *testing.T, js jetstream.JetStream, within time.Duration) {
	t.Helper()
	cons, err := js.Consumer(t.Context(), schemas.UsageStream, aggregator.DefaultDurable)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(within)
	for {
		info, err := cons.Info(t.Context())
		if err == nil && info.NumPending == 0 && info.NumAckPending == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("consumer not drained within %s: %+v %v", within, info, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
