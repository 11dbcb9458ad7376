package main

import (
	"context"
	"maps"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator/clickhouse"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/schemas"
)

// meterd on the distributed engines users run, all at once: three
// nats-server processes (streams R3), a ClickHouse cluster of two shards
// (shard 1 with two replicas, ZooKeeper) and two aggregator processes that
// share the usage partitions, each partition's store writing its shard.
// Under load, a NATS server is SIGKILLed (and stays down), the replica shard
// 1's writers write is SIGKILLed and restarted, the active one of two
// enforcers is SIGKILLed (the other takes over within 10 s), an aggregator
// is SIGKILLed and restarted, and one is frozen past its leases (SIGSTOP,
// SIGCONT). The
// oracle, read through the Distributed tables: every distinct event
// published counted exactly once; on each shard the rollups equal the raw
// events.
func TestScaleOutOnClusters(t *testing.T) {
	if testing.Short() {
		t.Skip("three nats-server and three clickhouse-server processes, ZooKeeper, two aggregators")
	}
	bin := buildMeterd(t)
	nc := jstest.StartCluster(t, 3)
	cc := chtest.SharedCluster(t)
	// Reads and migrations on shard 2, whose one server is never killed.
	dsn := strings.Replace(cc.DSN(t), cc.Addr(1, 1), cc.Addr(2, 1), 1)
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	db := strings.TrimPrefix(u.Path, "/")
	// A longer lease than the single-server share test's: a new writer's
	// first write on a cluster settles the shard (ZooKeeper's replication
	// log of each table) and catches its index up, fenced by the lease,
	// which a loaded 2-core machine running all of this needs seconds for.
	const leaseDuration, memberTTL = 8 * time.Second, 3 * time.Second
	rebalance := 2*memberTTL + leaseDuration + 30*time.Second

	procs := map[string]*killProc{}
	dirs := map[string]string{}
	start := func(member string) {
		if dirs[member] == "" {
			dirs[member] = t.TempDir()
		}
		addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
		procs[member] = startKillProc(t, bin, addr, "aggregator", "--share-partitions", "--member", member,
			"--nats-url", nc.URL(), "--nats-replicas", "3", "--usage-max-bytes", strconv.Itoa(256<<20), "--dlq-max-bytes", strconv.Itoa(64<<20),
			"--listen", addr, "--log-format", "text", "--insecure", "--fetch-batch", "5", "--fetch-wait", "20ms", "--ack-wait", "2s",
			"--lease-duration", leaseDuration.String(), "--member-ttl", memberTTL.String(),
			"--clickhouse", dsn, "--clickhouse-cluster", chtest.ClusterName, "--dedup-index-dir", dirs[member])
	}
	start("a")
	start("b")
	settledPartitions(t, procs, "2 aggregators on the clusters", []string{"a", "b"}, rebalance)
	// Two enforcers, one active by lease, reading usage through the
	// Distributed tables.
	startEnforcer := func() *killProc {
		addr := "127.0.0.1:" + strconv.Itoa(jstest.FreePort(t))
		return startKillProc(t, bin, addr, "enforcer", "--listen", addr, "--nats-url", nc.URL(), "--nats-replicas", "3",
			"--insecure", "--log-format", "text", "--clickhouse", dsn, "--clickhouse-cluster", chtest.ClusterName)
	}
	const active = "meterd_enforcer_active_leases"
	enf := []*killProc{startEnforcer(), startEnforcer()}
	pollUntil(t, "one enforcer is active", 30*time.Second, func() bool { return enf[0].metric(t, active)+enf[1].metric(t, active) == 1 })

	load := newSharedLoad(nc.JetStream(), time.Date(2026, 11, 22, 8, 0, 0, 0, time.UTC))
	stopLoad := load.run(t)
	defer stopLoad()

	// One of the three nats-server processes dies and stays dead: the R3
	// streams and buckets go on with two (TestNATSClusterServerKilled
	// restarts one and waits until it is current again).
	time.Sleep(3 * time.Second)
	nc.Kill(0)
	t.Log("nats-server 0 killed")

	cc.Kill(1, 1)
	t.Log("shard 1 replica 1 (its writers' first choice) killed")
	time.Sleep(5 * time.Second)
	cc.Start(t, 1, 1)
	t.Log("shard 1 replica 1 back")

	// The active enforcer dies; the standby takes over within 10 s.
	act, standby := enf[0], enf[1]
	if act.metric(t, active) != 1 {
		act, standby = standby, act
	}
	// The takeover bound is of a standby standing by. After the NATS
	// server's kill one took 11 s to open its buckets again (JetStream
	// requests timed out while the cluster moved its leaders), and a
	// standby that starts following the lease waits a whole lease for it.
	pollUntil(t, "the standby enforcer stands by", 60*time.Second, func() bool { return getReadyz(t, standby.addr).status == 200 })
	act.kill(t)
	takeover := pollUntil(t, "the standby enforcer takes over", 15*time.Second, func() bool { return standby.metric(t, active) == 1 })
	if takeover > 10*time.Second {
		t.Errorf("the standby enforcer took over %s after the kill, want within 10 s", takeover)
	}

	procs["a"].kill(t)
	failover, _ := settledPartitions(t, procs, "a killed", []string{"b"}, rebalance)
	start("a")
	settledPartitions(t, procs, "a back", []string{"a", "b"}, rebalance)

	freezePastLeases(t, procs, "b", []string{"a", "b"}, memberTTL+leaseDuration+2*time.Second, rebalance+20*time.Second)
	time.Sleep(time.Second)
	stopLoad()

	drainPartitions(t, nc.JetStream(), 2*time.Minute)
	for _, m := range []string{"a", "b"} {
		if err := procs[m].terminate(); err != nil {
			t.Errorf("SIGTERM %s: %v", m, err)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	if err := cc.Sync(ctx, db); err != nil {
		t.Fatal(err)
	}
	var stores []*clickhouse.Store
	for shard := 1; shard <= cc.Shards(); shard++ {
		s, err := clickhouse.New(ctx, clickhouse.Config{DSN: dsn, Cluster: chtest.ClusterName, Shard: shard})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		stores = append(stores, s)
	}
	load.mu.Lock()
	defer load.mu.Unlock()
	for _, tenant := range slices.Sorted(maps.Keys(load.want)) {
		got, err := stores[0].Total(ctx, tenant, "api_calls", load.t0, load.t0.Add(3*time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if got != load.want[tenant] {
			t.Errorf("%s (partition %d, shard %d): total %d, want %d", tenant, schemas.Partition(tenant, schemas.DefaultPartitions),
				clickhouse.ShardOf(schemas.Partition(tenant, schemas.DefaultPartitions), cc.Shards()), got, load.want[tenant])
		}
	}
	for i, s := range stores {
		if n, err := s.Reconcile(ctx, load.t0, load.t0.Add(3*time.Hour)); err != nil || n != 0 {
			t.Errorf("shard %d: rollups differ from raw events: %d rows (%v)", i+1, n, err)
		}
	}
	t.Logf("%d batches, %d tenants over %d shards; failover after an aggregator's SIGKILL %s, enforcer takeover %s", load.published, len(load.want),
		cc.Shards(), failover.Round(10*time.Millisecond), takeover.Round(10*time.Millisecond))
}
