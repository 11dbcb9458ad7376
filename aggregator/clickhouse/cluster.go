package clickhouse

import (
	"context"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// ShardOf returns the shard (ClickHouse's shard_num, counted from 1 as in
// remote_servers and system.clusters) whose local tables hold usage
// partition p on a cluster of shards shards: p mod shards, plus one.
// Partitions are tenant-hashed, so the modulo spreads tenants as evenly as
// the partitions do, and a tenant's events, rollups and intents all live on
// one shard: its writer's lookups and repairs never leave it. The mapping
// must not change while a database holds data (a retried event found on
// another shard than its first copy would count twice), so the number of
// shards is fixed with the database, as the number of partitions is.
func ShardOf(p, shards int) int {
	if shards < 1 {
		return 1
	}
	return p%shards + 1
}

// readTables names the tables the reads (Total, Totals, TenantTotals,
// Usage) query: the local ones on one server, the Distributed ones over
// them on a cluster.
type readTables struct{ events, rollups string }

var localTables = readTables{events: "events", rollups: "rollups_hourly"}

// distributedSuffix makes the name of the Distributed table over a local
// one: events_all over events.
const distributedSuffix = "_all"

// distributed are the local tables that get a Distributed table: those the
// reads query.
var distributed = []string{"events", "rollups_hourly"}

// clusterName is what Config.Cluster may be: the names remote_servers
// gives clusters in practice, quoted as an identifier in every statement.
var clusterName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]*$`)

// cluster is what a Store on a cluster keeps beyond a single server's.
type cluster struct {
	name   string
	db     string
	shard  int
	shards int // in remote_servers
	// addrs and replicas are the shard's replicas (system.clusters), one
	// connection pool each; at is the replica the writer writes, which
	// changes only in settle, under the store's mu (atomic so that a test
	// can read it while a write waits).
	addrs    []string
	replicas []driver.Conn
	at       atomic.Int32
}

// on is the ON CLUSTER clause of a distributed DDL statement.
func (c *cluster) on() string { return " ON CLUSTER `" + c.name + "`" }

// zkPath is the ZooKeeper path of table's replicas: per shard, and per
// database, so databases (and tests) never share one.
func (c *cluster) zkPath(table string) string {
	return "/clickhouse/tables/{shard}/" + c.db + "/" + table
}

var (
	createTableStmt = regexp.MustCompile(`^CREATE TABLE IF NOT EXISTS\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(`)
	alterTableStmt  = regexp.MustCompile(`^ALTER TABLE\s+([A-Za-z_][A-Za-z0-9_]*)\s`)
	dropTableStmt   = regexp.MustCompile(`^DROP TABLE IF EXISTS\s+([A-Za-z_][A-Za-z0-9_]*)$`)
	// engineClause matches the engines the migrations use and their
	// arguments (one level of parentheses, as SummingMergeTree((a, b))).
	engineClause = regexp.MustCompile(`ENGINE\s*=\s*(MergeTree|SummingMergeTree|CollapsingMergeTree|ReplacingMergeTree)(\s*\(((?:[^()]|\([^()]*\))*)\))?`)
)

// statement rewrites a migration's statement for the cluster: the table is
// qualified with the database, the statement runs ON CLUSTER (18.16 queues
// it in ZooKeeper's distributed_ddl path and every server runs it), and
// a MergeTree engine becomes its Replicated form, whose replicas are found
// by the {shard} and {replica} macros of each server. A statement of
// another form is an error, never run on one server only: a migration that
// adds one must teach this function.
func (c *cluster) statement(stmt string) (string, error) {
	if m := createTableStmt.FindStringSubmatchIndex(stmt); m != nil {
		table := stmt[m[2]:m[3]]
		return c.create(stmt, m, c.zkPath(table), "{replica}")
	}
	if m := alterTableStmt.FindStringSubmatchIndex(stmt); m != nil {
		return stmt[:m[2]] + c.db + "." + stmt[m[2]:m[3]] + c.on() + stmt[m[3]:], nil
	}
	if m := dropTableStmt.FindStringSubmatchIndex(stmt); m != nil {
		return stmt[:m[2]] + c.db + "." + stmt[m[2]:m[3]] + c.on(), nil
	}
	return "", fmt.Errorf("cannot run on a cluster (only CREATE TABLE IF NOT EXISTS, ALTER TABLE and DROP TABLE IF EXISTS are rewritten): %.60q", stmt)
}

// create rewrites the CREATE TABLE statement stmt, whose table name
// createTableStmt matched at name: the table is qualified, the statement
// runs ON CLUSTER, and its MergeTree engine becomes the Replicated form at
// the ZooKeeper path, named replica there.
func (c *cluster) create(stmt string, name []int, path, replica string) (string, error) {
	table := stmt[name[2]:name[3]]
	e := engineClause.FindStringSubmatchIndex(stmt)
	if e == nil {
		return "", fmt.Errorf("table %s: no MergeTree engine to replicate", table)
	}
	args := "'" + path + "', '" + replica + "'"
	if e[6] >= 0 && strings.TrimSpace(stmt[e[6]:e[7]]) != "" {
		args += ", " + stmt[e[6]:e[7]]
	}
	return stmt[:name[2]] + c.db + "." + table + c.on() + stmt[name[3]:e[0]] +
		"ENGINE = Replicated" + stmt[e[2]:e[3]] + "(" + args + ")" + stmt[e[1]:], nil
}

// migrationsTable is the CREATE statement of schema_migrations on a
// cluster: one replicated table over every server of the cluster (its path
// has no {shard}, and each server's replica is named by its shard and
// replica), so a migration recorded anywhere is known everywhere.
func (c *cluster) migrationsTable(stmt string) (string, error) {
	m := createTableStmt.FindStringSubmatchIndex(stmt)
	if m == nil {
		return "", fmt.Errorf("schema_migrations: not a CREATE TABLE IF NOT EXISTS: %.60q", stmt)
	}
	return c.create(stmt, m, "/clickhouse/tables/all/"+c.db+"/schema_migrations", "{shard}-{replica}")
}

// createDistributed creates the Distributed tables over the local ones the
// reads query, on every server, after the migrations: each is created AS its
// local table, so one whose columns no longer match (a migration changed the
// local table) is created anew. No insert goes through them (writers write
// their shard's local tables), so they have no sharding key.
func (s *Store) createDistributed(ctx context.Context) error {
	c := s.cluster
	for _, local := range distributed {
		dist := local + distributedSuffix
		lc, err := s.columns(ctx, local)
		if err != nil {
			return err
		}
		dc, err := s.columns(ctx, dist)
		if err != nil {
			return err
		}
		if len(dc) > 0 && !slices.Equal(lc, dc) {
			if err := s.read.Exec(ctx, "DROP TABLE IF EXISTS "+c.db+"."+dist+c.on()); err != nil {
				return fmt.Errorf("drop %s, whose columns differ from %s: %w", dist, local, err)
			}
			dc = nil
		}
		if len(dc) > 0 {
			continue
		}
		if err := s.read.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+c.db+"."+dist+c.on()+" AS "+c.db+"."+local+
			" ENGINE = Distributed('"+c.name+"', '"+c.db+"', '"+local+"')"); err != nil {
			return fmt.Errorf("create %s: %w", dist, err)
		}
	}
	return nil
}

// columns returns the names and types of table's columns on the server the
// reads use, none if it does not exist.
func (s *Store) columns(ctx context.Context, table string) ([]string, error) {
	rows, err := s.read.Query(ctx, `SELECT name, type FROM system.columns WHERE database = ? AND table = ? ORDER BY name`,
		s.cluster.db, table)
	if err != nil {
		return nil, fmt.Errorf("columns of %s: %w", table, err)
	}
	defer rows.Close()
	var cols []string
	for rows.Next() {
		var name, typ string
		if err := rows.Scan(&name, &typ); err != nil {
			return nil, err
		}
		cols = append(cols, name+" "+typ)
	}
	return cols, rows.Err()
}

// openCluster finds the replicas of the writer's shard in system.clusters
// and opens a connection pool to each, with opts' credentials, database
// and settings, insert deduplication off, and insert_quorum if quorum > 0.
func openCluster(ctx context.Context, read driver.Conn, opts *clickhouse.Options, name string, shard, partition, quorum int) (*cluster, error) {
	var shards uint64
	if err := read.QueryRow(ctx, `SELECT uniqExact(shard_num) FROM system.clusters WHERE cluster = ?`, name).Scan(&shards); err != nil {
		return nil, fmt.Errorf("read system.clusters: %w", err)
	}
	if shards == 0 {
		return nil, fmt.Errorf("the server has no cluster %q in its remote_servers", name)
	}
	if shard == 0 {
		shard = ShardOf(partition, int(shards))
	}
	c := &cluster{name: name, db: opts.Auth.Database, shard: shard, shards: int(shards)}
	rows, err := read.Query(ctx, `SELECT host_name, port FROM system.clusters WHERE cluster = ? AND shard_num = ? ORDER BY replica_num`,
		name, uint32(shard))
	if err != nil {
		return nil, fmt.Errorf("read system.clusters: %w", err)
	}
	for rows.Next() {
		var host string
		var port uint16
		if err := rows.Scan(&host, &port); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read system.clusters: %w", err)
		}
		c.addrs = append(c.addrs, host+":"+strconv.Itoa(int(port)))
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read system.clusters: %w", err)
	}
	if len(c.addrs) == 0 {
		return nil, fmt.Errorf("cluster %q has %d shards, no shard %d", name, shards, shard)
	}
	for _, addr := range c.addrs {
		o := *opts
		o.Addr = []string{addr}
		o.Settings = maps.Clone(opts.Settings)
		if o.Settings == nil {
			o.Settings = clickhouse.Settings{}
		}
		// A replicated table drops an inserted block whose part equals one
		// of its last 100 (insert_deduplicate), which the store must never
		// have: a retried write's rollups are the same rows as those of
		// the failed write that the repair took back, and were dropped.
		o.Settings["insert_deduplicate"] = 0
		if quorum > 0 {
			o.Settings["insert_quorum"] = quorum
		}
		conn, err := clickhouse.Open(&o)
		if err != nil {
			c.close()
			return nil, fmt.Errorf("open replica %s: %w", addr, err)
		}
		c.replicas = append(c.replicas, conn)
	}
	return c, nil
}

// close closes the replicas' connections.
func (c *cluster) close() error {
	var first error
	for _, r := range c.replicas {
		if err := r.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// replicaPing bounds the check of whether a replica answers.
const replicaPing = 5 * time.Second

// live returns the positions of the replicas that answer, the writer's
// current one first if it does.
func (c *cluster) live(ctx context.Context) []int {
	var up []int
	for k := range c.replicas {
		i := (int(c.at.Load()) + k) % len(c.replicas)
		pctx, cancel := context.WithTimeout(ctx, replicaPing)
		err := c.replicas[i].Ping(pctx)
		cancel()
		if err == nil {
			up = append(up, i)
		}
	}
	return up
}

// settle chooses the replica the writer writes and makes it hold every
// write of the shard that may still land, before recoverIntents reads the
// intent log and the dedup lookups read events (see "On a cluster" in the
// package documentation): it waits until no query of an intent open on any
// replica that answers still runs on any of them, and then until the
// chosen replica has fetched every part the others committed (SYSTEM SYNC
// REPLICA, which waits for a replica that is down if only it has a part).
func (s *Store) settle(ctx context.Context) error {
	c := s.cluster
	up := c.live(ctx)
	if len(up) == 0 {
		return fmt.Errorf("no replica of shard %d answers (%s)", c.shard, strings.Join(c.addrs, ", "))
	}
	if at := int(c.at.Load()); at != up[0] {
		s.log.Warn("the writer moves to another replica of its shard", "shard", c.shard, "from", c.addrs[at], "to", c.addrs[up[0]])
	}
	c.at.Store(int32(up[0]))
	s.conn = c.replicas[up[0]]
	open := map[string]bool{}
	for _, i := range up {
		ids, err := openIntentIDs(ctx, c.replicas[i], s.scope.intentsWhere())
		if err != nil {
			return fmt.Errorf("replica %s: %w", c.addrs[i], err)
		}
		for _, id := range ids {
			open[id] = true
		}
	}
	for _, id := range slices.Sorted(maps.Keys(open)) {
		for _, i := range up {
			if err := waitQueries(ctx, c.replicas[i], id); err != nil {
				return fmt.Errorf("replica %s: %w", c.addrs[i], err)
			}
		}
	}
	if err := syncReplica(ctx, s.conn); err != nil {
		return fmt.Errorf("replica %s: %w", c.addrs[up[0]], err)
	}
	return nil
}

// syncedTables are the tables the writer reads before it writes, and
// syncedIn the same as the list of an IN.
var (
	syncedTables = []string{"applies", "events", "rollups_hourly"}
	syncedIn     = "('" + strings.Join(syncedTables, "', '") + "')"
)

// syncReplica returns once conn's replica holds every part committed to
// the shard's tables before it was called. SYSTEM SYNC REPLICA waits for
// the replica's queue only, and the replica copies new entries of the
// shared log to its queue a moment after they are written (a watch), so
// it runs once every table's queue holds the whole log; and since the
// tables are synced one after the other, it runs again until one round
// finds every queue empty and the whole log copied, lest the rollups of a
// write be fetched without its events.
func syncReplica(ctx context.Context, conn driver.Conn) error {
	for {
		pulled, err := logPulled(ctx, conn)
		if err != nil {
			return err
		}
		if pulled {
			for _, table := range syncedTables {
				if err := conn.Exec(ctx, "SYSTEM SYNC REPLICA "+table); err != nil {
					return fmt.Errorf("sync %s with the other replicas: %w", table, err)
				}
			}
			var busy uint64
			if err := conn.QueryRow(ctx, `SELECT count() FROM system.replicas WHERE database = currentDatabase() AND table IN `+syncedIn+` AND queue_size > 0`).Scan(&busy); err != nil {
				return fmt.Errorf("read system.replicas: %w", err)
			}
			if pulled, err = logPulled(ctx, conn); err != nil {
				return err
			}
			if busy == 0 && pulled {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// logPulled reports whether conn's replica has copied every entry of the
// shared log of each synced table to its queue: its log_pointer is past
// the log's last index, or the log is empty.
func logPulled(ctx context.Context, conn driver.Conn) (bool, error) {
	rows, err := conn.Query(ctx, `SELECT zookeeper_path, log_pointer, log_max_index FROM system.replicas
		WHERE database = currentDatabase() AND table IN `+syncedIn)
	if err != nil {
		return false, fmt.Errorf("read system.replicas: %w", err)
	}
	type state struct {
		path          string
		pointer, last uint64
	}
	var tables []state
	for rows.Next() {
		var st state
		if err := rows.Scan(&st.path, &st.pointer, &st.last); err != nil {
			rows.Close()
			return false, fmt.Errorf("read system.replicas: %w", err)
		}
		tables = append(tables, st)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return false, fmt.Errorf("read system.replicas: %w", err)
	}
	if len(tables) != len(syncedTables) {
		return false, fmt.Errorf("system.replicas has %d of the tables %v", len(tables), syncedTables)
	}
	for _, st := range tables {
		if st.pointer > st.last {
			continue
		}
		// 0 and 0: an empty log, or one entry not copied yet.
		if st.pointer == 0 && st.last == 0 {
			var n uint64
			if err := conn.QueryRow(ctx, `SELECT count() FROM system.zookeeper WHERE path = ?`, st.path+"/log").Scan(&n); err != nil {
				return false, fmt.Errorf("read the log of %s: %w", st.path, err)
			}
			if n == 0 {
				continue
			}
		}
		return false, nil
	}
	return true, nil
}

// openIntentIDs returns the ids of the intents open in the applies of conn's
// server that where selects (scope.intentsWhere).
func openIntentIDs(ctx context.Context, conn driver.Conn, where string) ([]string, error) {
	rows, err := conn.Query(ctx, `SELECT apply_id FROM applies`+where+` GROUP BY apply_id HAVING sum(sign) > 0`)
	if err != nil {
		return nil, fmt.Errorf("read intents: %w", err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("read intents: %w", err)
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

// Shards is the number of shards of the store's cluster (0 on one server):
// the writer of usage partition p writes shard ShardOf(p, Shards()).
func (s *Store) Shards() int {
	if s.cluster == nil {
		return 0
	}
	return s.cluster.shards
}

// writerReplica returns the position of the replica the writer writes.
func (s *Store) writerReplica() int { return int(s.cluster.at.Load()) }

// exists reports whether system.<table> of conn's server has a row where
// cond holds.
func exists(ctx context.Context, conn driver.Conn, table, cond string, args ...any) (bool, error) {
	var n uint64
	if err := conn.QueryRow(ctx, `SELECT count() FROM system.`+table+` WHERE `+cond, args...).Scan(&n); err != nil {
		return false, fmt.Errorf("read system.%s: %w", table, err)
	}
	return n > 0, nil
}
