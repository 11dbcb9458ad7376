package clickhouse

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/rollup"
	"github.com/meterd/meterd/aggregator/storetest"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/schemas"
	"github.com/meterd/meterd/schemas/migrations"
)

func TestShardOf(t *testing.T) {
	for _, tc := range []struct{ p, shards, want int }{
		{0, 1, 1}, {5, 1, 1}, {0, 2, 1}, {1, 2, 2}, {2, 2, 1}, {15, 4, 4}, {3, 0, 1},
	} {
		if got := ShardOf(tc.p, tc.shards); got != tc.want {
			t.Errorf("ShardOf(%d, %d) = %d, want %d", tc.p, tc.shards, got, tc.want)
		}
	}
	// Every shard gets the same number of partitions when shards divides
	// partitions.
	counts := map[int]int{}
	for p := range 16 {
		counts[ShardOf(p, 4)]++
	}
	for s := 1; s <= 4; s++ {
		if counts[s] != 4 {
			t.Errorf("shard %d holds %d of 16 partitions, want 4", s, counts[s])
		}
	}
}

func TestClusterConfigValidate(t *testing.T) {
	const dsn = "clickhouse://127.0.0.1:9000/meterd"
	for _, c := range []Config{
		{DSN: dsn, Shard: 1},
		{DSN: dsn, InsertQuorum: 2},
		{DSN: dsn, Cluster: "meterd"},
		{DSN: dsn, Cluster: "bad name", Shard: 1},
		{DSN: dsn, Cluster: "meterd", Shard: 1, InsertQuorum: -1},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil, want an error", c)
		}
	}
	if err := (Config{DSN: dsn, Cluster: "meterd-prod.eu", Shard: 2, InsertQuorum: 2}).Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}

// Every migration's statements run on a cluster: each is rewritten to run ON
// CLUSTER, qualified with the database, and a CREATE gets the Replicated
// form of its engine with the engine's own arguments kept.
func TestClusterStatements(t *testing.T) {
	c := &cluster{name: "meterd", db: "usage"}
	ms, err := migrations.Load(migrations.ClickHouse, "clickhouse")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, m := range ms {
		for _, stmt := range m.Statements {
			got, err := c.statement(stmt)
			if err != nil {
				t.Errorf("migration %s: %v", m.Name, err)
				continue
			}
			n++
			if !strings.Contains(got, " usage.") || !strings.Contains(got, " ON CLUSTER `meterd`") {
				t.Errorf("migration %s: not qualified and ON CLUSTER: %s", m.Name, got)
			}
			if strings.HasPrefix(stmt, "CREATE") && !strings.Contains(got, "ENGINE = Replicated") {
				t.Errorf("migration %s: no Replicated engine: %s", m.Name, got)
			}
		}
	}
	if n < 7 {
		t.Errorf("%d statements rewritten, want every migration's", n)
	}
	for _, tc := range []struct{ in, want string }{
		{"CREATE TABLE IF NOT EXISTS t (a Int8) ENGINE = MergeTree\nPARTITION BY a ORDER BY a",
			"CREATE TABLE IF NOT EXISTS usage.t ON CLUSTER `meterd` (a Int8) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/usage/t', '{replica}')\nPARTITION BY a ORDER BY a"},
		{"CREATE TABLE IF NOT EXISTS r (v Int64, n Int64) ENGINE = SummingMergeTree((v, n)) ORDER BY v",
			"CREATE TABLE IF NOT EXISTS usage.r ON CLUSTER `meterd` (v Int64, n Int64) ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/usage/r', '{replica}', (v, n)) ORDER BY v"},
		{"CREATE TABLE IF NOT EXISTS a (sign Int8) ENGINE = CollapsingMergeTree(sign) ORDER BY sign",
			"CREATE TABLE IF NOT EXISTS usage.a ON CLUSTER `meterd` (sign Int8) ENGINE = ReplicatedCollapsingMergeTree('/clickhouse/tables/{shard}/usage/a', '{replica}', sign) ORDER BY sign"},
		{"ALTER TABLE events DROP COLUMN x", "ALTER TABLE usage.events ON CLUSTER `meterd` DROP COLUMN x"},
		{"DROP TABLE IF EXISTS batches", "DROP TABLE IF EXISTS usage.batches ON CLUSTER `meterd`"},
	} {
		if got, err := c.statement(tc.in); err != nil || got != tc.want {
			t.Errorf("statement(%q) =\n%s (%v), want\n%s", tc.in, got, err, tc.want)
		}
	}
	got, err := c.migrationsTable("CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32) ENGINE = MergeTree ORDER BY version")
	if want := "CREATE TABLE IF NOT EXISTS usage.schema_migrations ON CLUSTER `meterd` (version UInt32) ENGINE = ReplicatedMergeTree('/clickhouse/tables/all/usage/schema_migrations', '{shard}-{replica}') ORDER BY version"; err != nil || got != want {
		t.Errorf("migrationsTable =\n%s (%v), want\n%s", got, err, want)
	}
	for _, stmt := range []string{"INSERT INTO events VALUES (1)", "CREATE TABLE t (a Int8) ENGINE = MergeTree ORDER BY a", "CREATE TABLE IF NOT EXISTS t (a Int8) ENGINE = Log"} {
		if got, err := c.statement(stmt); err == nil {
			t.Errorf("statement(%q) = %q, want an error", stmt, got)
		}
	}
}

// clusterStore opens a store of the cluster's database dsn writing shard.
func clusterStore(t testing.TB, dsn string, shard int, index bool) *Store {
	t.Helper()
	cfg := Config{DSN: dsn, Cluster: chtest.ClusterName, Shard: shard}
	if index {
		cfg.IndexDir = t.TempDir()
	}
	return openStore(t, cfg)
}

// The conformance suite on the cluster: the writer writes shard 1's local
// replicated tables and every read goes through the Distributed tables.
func TestClusterConformance(t *testing.T) {
	c := chtest.SharedCluster(t)
	storetest.Run(t, func(t *testing.T) aggregator.Store {
		return corruptible{clusterStore(t, c.DSN(t), 1, true)}
	})
}

// A store on the cluster has replicated local tables on every server, the
// Distributed tables over them, and its migrations recorded once on every
// server; a second store (another writer's start) migrates nothing again.
func TestClusterSchema(t *testing.T) {
	c := chtest.SharedCluster(t)
	dsn := c.DSN(t)
	s := clusterStore(t, dsn, 2, false)
	clusterStore(t, dsn, 1, false)
	if s.Shards() != c.Shards() {
		t.Errorf("Shards() = %d, want %d", s.Shards(), c.Shards())
	}
	for _, tc := range []struct {
		cluster string
		shard   int
		want    string
	}{
		{chtest.ClusterName, c.Shards() + 1, fmt.Sprintf("cluster %q has %d shards, no shard %d", chtest.ClusterName, c.Shards(), c.Shards()+1)},
		{"nosuch", 1, "nosuch"},
	} {
		st, err := New(t.Context(), Config{DSN: dsn, Cluster: tc.cluster, Shard: tc.shard})
		if err == nil {
			st.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(cluster %s, shard %d): %v, want an error mentioning %q", tc.cluster, tc.shard, err, tc.want)
		}
	}
	db := s.cluster.db
	if err := c.Sync(t.Context(), db); err != nil {
		t.Fatal(err)
	}
	ms, err := migrations.Load(migrations.ClickHouse, "clickhouse")
	if err != nil {
		t.Fatal(err)
	}
	for shard := 1; shard <= c.Shards(); shard++ {
		for r := 1; r <= c.Replicas(shard); r++ {
			conn := s.read
			if shard != 1 || r != 1 {
				conn = openStore(t, Config{DSN: "clickhouse://" + c.Addr(shard, r) + "/" + db}).read
			}
			rows, err := conn.Query(t.Context(), `SELECT name, engine FROM system.tables WHERE database = ? ORDER BY name`, db)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for rows.Next() {
				var name, engine string
				if err := rows.Scan(&name, &engine); err != nil {
					t.Fatal(err)
				}
				got = append(got, name+" "+engine)
			}
			rows.Close()
			want := "applies ReplicatedCollapsingMergeTree,events ReplicatedMergeTree,events_all Distributed," +
				"rollups_hourly ReplicatedSummingMergeTree,rollups_hourly_all Distributed,schema_migrations ReplicatedMergeTree,store_identity ReplicatedMergeTree"
			if strings.Join(got, ",") != want {
				t.Errorf("shard %d replica %d: tables %q, want %s", shard, r, got, want)
			}
			var versions, records uint64
			if err := conn.QueryRow(t.Context(), `SELECT uniqExact(version), count() FROM schema_migrations`).Scan(&versions, &records); err != nil {
				t.Fatal(err)
			}
			if versions != uint64(len(ms)) || records != uint64(len(ms)) {
				t.Errorf("shard %d replica %d: %d migrations recorded %d times, want %d once", shard, r, versions, records, len(ms))
			}
		}
	}
}

// killRounds is how many times TestClusterReplicaKill kills the writer's
// replica: once in the short form that CI runs, more with
// METERD_TEST_CH_KILL_ROUNDS (README: "Testing on a ClickHouse cluster").
func killRounds(t *testing.T) int {
	if v := os.Getenv("METERD_TEST_CH_KILL_ROUNDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("METERD_TEST_CH_KILL_ROUNDS=%q: want a positive number", v)
		}
		return n
	}
	return 1
}

// TestClusterReplicaKill is the oracle test of a replica's crash under
// load: a writer per shard applies batches of random events (with retried
// events and redelivered batches, as the aggregator gets them), retrying
// every failed Apply as the aggregator does, while the replica that shard
// 1's writer writes is SIGKILLed and, seconds later, started again. The
// totals read through the Distributed tables at the end equal the sums of
// the acknowledged events, exactly: nothing lost, nothing counted twice.
//
// The crash is the worst case, made certain rather than left to timing:
// the other replica's fetches are stopped for a second before the kill, so
// the killed replica holds the only copy of that second's parts when the
// writer moves (a writer that moved without waiting for them would count
// the redelivered batches again, or lose their repairs). Both ways of
// looking events up run: the dedup index and the lookup in events.
func TestClusterReplicaKill(t *testing.T) {
	c := chtest.SharedCluster(t)
	if c.Replicas(1) < 2 {
		t.Skip("shard 1 has one replica")
	}
	for _, index := range []bool{true, false} {
		t.Run(map[bool]string{true: "index", false: "lookup"}[index], func(t *testing.T) { replicaKill(t, c, index) })
	}
}

func replicaKill(t *testing.T, c *chtest.Cluster, index bool) {
	dsn := c.DSN(t)
	const partitions = 4
	writers := make([]*Store, c.Shards())
	for i := range writers {
		writers[i] = clusterStore(t, dsn, i+1, index)
	}

	var (
		mu     sync.Mutex
		oracle = map[string]int64{} // tenant meter → sum of acknowledged values
		events = map[string]int64{} // tenant meter → acknowledged events
		acked  int
	)
	t0 := time.Now().UTC().Truncate(time.Hour).Add(-2 * time.Hour)
	ctx, stop := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	for i, w := range writers {
		shard := i + 1
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(shard), 7))
			seen := map[rollup.EventID]bool{}
			var sent []*schemas.Batch
			for n := 0; ctx.Err() == nil; n++ {
				var b *schemas.Batch
				if n%3 == 2 && len(sent) > 0 {
					// A redelivered batch, of the last few: those a
					// lagging replica may lack.
					b = sent[len(sent)-1-rng.IntN(min(len(sent), 10))]
				} else {
					b = &schemas.Batch{ID: fmt.Sprintf("s%d-b%d", shard, n)}
					for k := range 50 {
						p := rng.IntN(partitions)
						if ShardOf(p, len(writers)) != shard {
							p = (p + 1) % partitions
						}
						if ShardOf(p, len(writers)) != shard {
							continue
						}
						e := schemas.Event{ID: fmt.Sprintf("e%d-%d", n, k), Tenant: fmt.Sprintf("p%d-t%d", p, rng.IntN(5)),
							Meter: []string{"api_calls", "tokens"}[rng.IntN(2)], Value: rng.Int64N(1000) + 1,
							Time: t0.Add(time.Duration(rng.IntN(7200)) * time.Second)}
						if k%10 == 9 && n > 0 { // a retry of an earlier event, same id and tenant
							e.ID, e.Tenant = fmt.Sprintf("e%d-%d", rng.IntN(n), rng.IntN(50)), fmt.Sprintf("p%d-t%d", p, 0)
						}
						b.Events = append(b.Events, e)
					}
				}
				// Retried until acknowledged, as the aggregator does
				// (it never acks a batch a failed Apply held).
				for attempt := 0; ; attempt++ {
					actx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
					_, err := w.Apply(actx, []*schemas.Batch{b})
					cancel()
					if err == nil {
						break
					}
					if attempt == 0 {
						t.Logf("shard %d: apply failed, retrying: %v", shard, err)
					}
					if attempt > 300 {
						t.Errorf("shard %d: apply still fails after %d attempts: %v", shard, attempt, err)
						return
					}
					time.Sleep(200 * time.Millisecond)
				}
				sent = append(sent, b)
				mu.Lock()
				for _, e := range b.Events {
					k := rollup.EventID{Tenant: e.Tenant, ID: e.ID}
					if seen[k] {
						continue
					}
					seen[k] = true
					oracle[e.Tenant+" "+e.Meter] += e.Value
					events[e.Tenant+" "+e.Meter]++
					acked++
				}
				mu.Unlock()
			}
		})
	}

	start := time.Now()
	for round := range killRounds(t) {
		time.Sleep(time.Second)
		r := writers[0].writerReplica() + 1
		other := 3 - r
		if err := c.Exec(t.Context(), 1, other, "SYSTEM STOP FETCHES"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		c.Kill(1, r)
		t.Logf("round %d: killed shard 1 replica %d (the writer's) at %s", round+1, r, time.Since(start).Round(time.Millisecond))
		if err := c.Exec(t.Context(), 1, other, "SYSTEM START FETCHES"); err != nil {
			t.Fatal(err)
		}
		// Down past its ZooKeeper session (4 s in chtest): a replica that
		// comes back earlier waits for it to expire before it serves its
		// parts again, which only makes the test longer.
		time.Sleep(5 * time.Second)
		if writers[0].writerReplica()+1 == r {
			t.Errorf("round %d: the writer of shard 1 still writes the killed replica %d", round+1, r)
		}
		restart := time.Now()
		c.Start(t, 1, r)
		t.Logf("round %d: replica %d started again at %s (in %s)", round+1, r, time.Since(start).Round(time.Millisecond), time.Since(restart).Round(time.Millisecond))
	}
	stop() // each writer still retries its last batch until it is acknowledged
	wg.Wait()
	if t.Failed() {
		return
	}
	if err := c.Sync(t.Context(), writers[0].cluster.db); err != nil {
		t.Fatal(err)
	}
	// A reader opened now: the servers it would have connected to before
	// were killed.
	reader := openStore(t, Config{DSN: dsn, Cluster: chtest.ClusterName, Shard: 1})
	totals, err := reader.Totals(t.Context(), t0.Add(-time.Hour), t0.Add(3*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][2]int64{}
	for _, inc := range totals {
		got[inc.Tenant+" "+inc.Meter] = [2]int64{inc.Value, inc.Events}
	}
	for k, v := range oracle {
		if got[k] != [2]int64{v, events[k]} {
			t.Errorf("%s: total %v, want value %d in %d events", k, got[k], v, events[k])
		}
	}
	for k := range got {
		if _, ok := oracle[k]; !ok {
			t.Errorf("%s: total %v, never acknowledged", k, got[k])
		}
	}
	if t.Failed() {
		var want, wantN int64
		for k, v := range oracle {
			want, wantN = want+v, wantN+events[k]
		}
		t.Logf("acknowledged: value %d in %d events", want, wantN)
		for shard := 1; shard <= c.Shards(); shard++ {
			for r := 1; r <= c.Replicas(shard); r++ {
				conn := openStore(t, Config{DSN: "clickhouse://" + c.Addr(shard, r) + "/" + writers[0].cluster.db}).read
				var ev, evN, ro, roN int64
				err := conn.QueryRow(t.Context(), `SELECT (SELECT toInt64(sum(value)) FROM events), (SELECT toInt64(count()) FROM events),
					(SELECT toInt64(sum(value)) FROM rollups_hourly), (SELECT toInt64(sum(events)) FROM rollups_hourly)`).Scan(&ev, &evN, &ro, &roN)
				t.Logf("shard %d replica %d: events value %d in %d, rollups value %d in %d (%v)", shard, r, ev, evN, ro, roN, err)
			}
		}
	}
	if !t.Failed() {
		t.Logf("%d events acknowledged in %s across %d kills, totals exact", acked, time.Since(start).Round(time.Millisecond), killRounds(t))
	}
}

// With an insert quorum of 2 on a shard of 2 replicas, a write is
// acknowledged only once both hold it: while one is down every Apply
// fails (and is retried), and after it is back the usage is exact.
func TestClusterInsertQuorum(t *testing.T) {
	c := chtest.SharedCluster(t)
	if c.Replicas(1) < 2 {
		t.Skip("shard 1 has one replica")
	}
	dsn := c.DSN(t)
	s := openStore(t, Config{DSN: dsn, Cluster: chtest.ClusterName, Shard: 1, InsertQuorum: 2, IndexDir: t.TempDir()})
	t0 := time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC)
	batch := func(id string, value int64) []*schemas.Batch {
		return []*schemas.Batch{{ID: id, Events: []schemas.Event{{ID: id, Tenant: "acme", Meter: "api_calls", Value: value, Time: t0}}}}
	}
	if _, err := s.Apply(t.Context(), batch("e1", 1)); err != nil {
		t.Fatal(err)
	}
	c.Kill(1, 2)
	t.Cleanup(func() { c.Start(t, 1, 2) })
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	_, err := s.Apply(ctx, batch("e2", 10))
	cancel()
	if err == nil {
		t.Fatal("Apply with one of two replicas down and a quorum of 2 succeeded")
	}
	t.Logf("with a replica down: %v", err)
	c.Start(t, 1, 2)
	var incs []aggregator.Increment
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		incs, err = s.Apply(ctx, batch("e2", 10))
		cancel()
		if err == nil {
			break
		}
		if attempt == 100 {
			t.Fatalf("Apply still fails with both replicas up: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The failed call's rollups may have landed (then its usage is in the
	// totals and in no increment, as on one server) or not (then it is
	// counted now).
	if len(incs) > 1 || len(incs) == 1 && incs[0].Value != 10 {
		t.Errorf("increments %+v, want e2's 10 or nothing", incs)
	}
	if err := c.Sync(t.Context(), s.cluster.db); err != nil {
		t.Fatal(err)
	}
	if total, err := s.Total(t.Context(), "acme", "api_calls", t0, t0.Add(time.Hour)); err != nil || total != 11 {
		t.Errorf("total %d (%v), want 11", total, err)
	}
}
