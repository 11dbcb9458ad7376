package main

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/sqlite"
	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/internal/lease"
	"github.com/meterd/meterd/schemas"
)

// envClusterLong selects the long form of TestNATSClusterServerKilled:
// minutes of load, each server in turn killed.
const envClusterLong = "METERD_CLUSTER_LONG"

// meterd on a real 3-server NATS cluster (separate nats-server processes
// configured as deploy/nats), every component with --nats-replicas 3: two
// collectors take a steady load of POSTs and an aggregator writes it into
// SQLite, while the server leading METERD_USAGE is SIGKILLed, left dead
// for a while and started again. Nothing is lost and nothing doubled: the
// set of events answered 202 is exactly the set the store holds, and
// every tenant's total counts each once. Every stream and bucket meterd
// creates really has 3 replicas, the restarted server caught up.
//
// The CI form kills one server (the leader) in about 20 s of load;
// METERD_CLUSTER_LONG=1 kills each of the three in turn, the leader first,
// in about 2 minutes.
func TestNATSClusterServerKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("three nats-server processes under load")
	}
	rounds, phase := 1, 3*time.Second
	if os.Getenv(envClusterLong) == "1" {
		rounds, phase = 3, 15*time.Second
	}
	c := jstest.StartCluster(t, 3)
	dir := t.TempDir()
	db := filepath.Join(dir, "meterd.db")
	common := []string{"--nats-url", c.URL(), "--nats-replicas", "3", "--insecure", "--log-format", "text"}
	// The streams' byte bounds are reserved on every server: smaller than
	// production's, to fit three servers on a test machine's disk.
	startComponent(t, "aggregator", append([]string{"--sqlite-path", db,
		"--usage-max-bytes", fmt.Sprint(256 << 20), "--dlq-max-bytes", fmt.Sprint(64 << 20)}, common...)...)
	startComponent(t, "enforcer", append([]string{"--sqlite-path", filepath.Join(dir, "enforcer.db")}, common...)...)
	var collectors []string
	for _, name := range []string{"c1", "c2"} {
		collectors = append(collectors, startComponent(t, "collector", append([]string{
			"--spool-dir", filepath.Join(dir, name), "--collector-name", name}, common...)...))
	}

	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	js := c.JetStream()
	led := &killLedger{accepted: map[killKey]bool{}, unknown: map[killKey]bool{}}
	begin := time.Now()
	var loads []*killLoad
	for _, base := range collectors {
		loads = append(loads, led.startLoad(base+"/v1/events", 2))
	}
	stopLoads := sync.OnceFunc(func() {
		for _, ld := range loads {
			ld.stop()
		}
	})
	defer stopLoads() // a failed round leaves no client behind
	killed := map[int]bool{}
	for round := range rounds {
		time.Sleep(phase)
		// The leader of METERD_USAGE first, then each server not yet
		// killed, whatever it leads (consumers, buckets).
		leader := streamLeader(ctx, t, js, schemas.UsageStream)
		victim := c.Index(leader)
		if victim < 0 {
			t.Fatalf("round %d: METERD_USAGE has no leader among %s", round, c.URL())
		}
		for i := 0; killed[victim] && i < c.N(); i++ {
			victim = i
		}
		killed[victim] = true
		role := "a follower of METERD_USAGE"
		if c.Name(victim) == leader {
			role = "the leader of METERD_USAGE"
		}
		before := led.acceptedCount()
		c.Kill(victim)
		killedAt := time.Now()
		// Requests in flight wait for the new leader, or for the spool
		// (PublishTimeout and PublishRetry): the API goes on answering 202
		// with the server dead.
		for led.acceptedCount() < before+1000 {
			if time.Since(killedAt) > 30*time.Second {
				t.Fatalf("round %d: %d events accepted in the 30 s after %s (%s) was killed, want 1000",
					round, led.acceptedCount()-before, c.Name(victim), role)
			}
			time.Sleep(10 * time.Millisecond)
		}
		resumed := time.Since(killedAt)
		time.Sleep(phase)
		during := led.acceptedCount() - before
		// Catching up under load takes 8 s on a quiet machine; under -race
		// with the rest of the suite beside it, CI runs took over a minute
		// and once more than four. With one round the server restarts and
		// must be current once the load stops; between rounds it must be
		// current before the next kill, so that two servers are never behind.
		if rounds == 1 {
			c.Restart(victim, 4*time.Minute)
		} else {
			c.Start(victim, 4*time.Minute)
		}
		t.Logf("round %d: killed %s, %s: 1000 events accepted %s after the kill, %d while it was dead; back %s after the kill",
			round, c.Name(victim), role, resumed.Round(time.Millisecond), during, time.Since(killedAt).Round(time.Millisecond))
	}
	time.Sleep(phase)
	stopLoads()
	loadTime := time.Since(begin)
	for i := range c.N() {
		c.WaitCurrent(i, 4*time.Minute)
	}

	// Every request got its 202: a server of three down is no outage.
	if n, u := led.statusCount(), len(led.unknown); n > 0 || u > 0 {
		t.Errorf("%d requests answered other than 202, %d events without an answer; want every request accepted", n, u)
	}
	waitFor := func(what string, within time.Duration, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(within); !cond(); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within %s", what, within)
			}
		}
	}
	for _, base := range collectors {
		waitFor("the collector's spool empties", time.Minute, func() bool {
			return metricAt(t, base, "meterd_collector_spool_batches") == 0
		})
	}
	cons, err := js.Consumer(ctx, schemas.UsageStream, aggregator.DefaultDurable)
	if err != nil {
		t.Fatal(err)
	}
	waitFor("the aggregator's consumer drains", 2*time.Minute, func() bool {
		info, err := cons.Info(ctx)
		return err == nil && info.NumPending == 0 && info.NumAckPending == 0
	})

	// The oracle: the events answered 202 are the events stored, each once.
	stored := storedEvents(ctx, t, db)
	var missing, foreign int
	perTenant := map[string]int64{}
	for k := range led.accepted {
		perTenant[k.tenant]++
		if !stored[k] {
			missing++
		}
	}
	for k := range stored {
		if !led.accepted[k] {
			foreign++
		}
	}
	if missing > 0 || foreign > 0 || len(stored) != len(led.accepted) {
		t.Errorf("oracle: %d events answered 202, %d stored; %d accepted events missing, %d stored that were never accepted",
			len(led.accepted), len(stored), missing, foreign)
	}
	st, err := sqlite.New(sqlite.Config{Path: db})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	from, to := begin.Add(-time.Hour), time.Now().Add(time.Hour)
	for tenant, want := range perTenant {
		got, err := st.Total(ctx, tenant, "api_calls", from, to)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("%s: total %d, want %d (each accepted event once)", tenant, got, want)
		}
	}
	if n, err := st.Reconcile(ctx, from, to); err != nil || n != 0 {
		t.Errorf("rollups differ from the raw events: %d rows (%v)", n, err)
	}
	t.Logf("oracle: %d events answered 202 in %s of load (%d killed servers), all stored once",
		len(led.accepted), loadTime.Round(time.Millisecond), rounds)

	// R3 everywhere meterd writes, with every replica current again.
	for _, name := range []string{schemas.UsageStream, schemas.DLQStream,
		"KV_" + schemas.BlocklistBucket, "KV_" + lease.DefaultBucket, "KV_" + catalog.Bucket} {
		checkR3(ctx, t, js, name)
	}
	ci, err := cons.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ci.Cluster == nil || ci.Cluster.Leader == "" || len(ci.Cluster.Replicas) != 2 {
		t.Errorf("consumer %s: cluster %+v; want a leader and 2 replicas, as its stream", aggregator.DefaultDurable, ci.Cluster)
	}
}

// streamLeader is the server leading stream now.
func streamLeader(ctx context.Context, t *testing.T, js jetstream.JetStream, stream string) string {
	t.Helper()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Cluster == nil {
		t.Fatalf("%s: no cluster info: not on a cluster", stream)
	}
	return info.Cluster.Leader
}

// checkR3 asserts that stream is configured with 3 replicas on file storage
// and has a leader and two current followers.
func checkR3(ctx context.Context, t *testing.T, js jetstream.JetStream, stream string) {
	t.Helper()
	var info *jetstream.StreamInfo
	// A follower just restarted may need a moment to report itself current.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		s, err := js.Stream(ctx, stream)
		if err != nil {
			t.Errorf("%s: %v", stream, err)
			return
		}
		if info, err = s.Info(ctx); err != nil {
			t.Errorf("%s: %v", stream, err)
			return
		}
		if r3(info) || time.Now().After(deadline) {
			break
		}
	}
	if !r3(info) {
		t.Errorf("%s: %d replicas on %v, cluster %+v; want 3 on file storage, a leader and 2 current followers",
			stream, info.Config.Replicas, info.Config.Storage, info.Cluster)
	}
}

func r3(info *jetstream.StreamInfo) bool {
	if info.Config.Replicas != 3 || info.Config.Storage != jetstream.FileStorage ||
		info.Cluster == nil || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != 2 {
		return false
	}
	for _, r := range info.Cluster.Replicas {
		if !r.Current || r.Offline {
			return false
		}
	}
	return true
}

// storedEvents reads the (tenant, id) of every event in the SQLite store at
// path: the store keeps each identity once, so the totals show doubling
// and this set shows loss.
func storedEvents(ctx context.Context, t *testing.T, path string) map[killKey]bool {
	t.Helper()
	db, err := sql.Open("sqlite", path+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.QueryContext(ctx, `SELECT tenant, id FROM events`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[killKey]bool{}
	for rows.Next() {
		var k killKey
		if err := rows.Scan(&k.tenant, &k.id); err != nil {
			t.Fatal(err)
		}
		out[k] = true
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}
