// Package clickhouse is the aggregator.Store on ClickHouse, over the native
// protocol (clickhouse-go/v2). It runs on ClickHouse 18.16 (Debian's package)
// and on current releases, so it uses only what both have: MergeTree,
// SummingMergeTree, CollapsingMergeTree, DateTime, external tables, and
// explicit column lists in every INSERT. The schema is the versioned DDL in
// schemas/migrations/clickhouse, applied by New.
//
// # Exactly once without insert deduplication
//
// 18.16 has neither insert_deduplication_token nor deduplication for
// non-replicated tables, and a ClickHouse INSERT is atomic only per part (per
// partition of a block), so the store builds exactly-once from lookups and an
// intent log:
//
//   - The raw table events, ORDER BY (tenant, id), is the source of truth.
//     Apply drops events that appear earlier in the call, looks up which of
//     the rest the store holds already, and inserts only the new ones. With
//     a dedup index (Config.IndexDir, next section) the lookup is local;
//     without one it is a query of events (the candidates travel as an
//     external table and are matched on key_hash, a 64-bit hash of (tenant,
//     id), then compared exactly; a call of few candidates also narrows the
//     granules read through the primary key). A retried event counts once
//     however long ago the first copy came (with an index: within its
//     horizon), and so does every event of a redelivered batch.
//   - The hourly rollups are inserted by Apply, summed from exactly the events
//     it inserted, at the same time as them. That is chosen over a
//     materialized view: a view is no more atomic with its source insert on
//     18.16, it would make Apply compute the increments it returns a second
//     way, and its query cannot be altered by a migration on 18.16.
//   - Before writing events or rollups, Apply records an intent (applies,
//     sign 1: the tenants and hours of all its candidates, so it can be
//     written while the lookup runs); the next Apply closes it (sign -1) in
//     the block that opens its own, and Close closes the last one. One block
//     of applies is one part, so an intent is never closed without its
//     successor being open. A crash or error leaves an open intent whose
//     writes may be unfinished. Before it writes again (at its first Apply,
//     and after any failed Apply) the store waits until no query of an open
//     intent still runs on the server, recomputes the rollups of the intent's
//     tenants and hours from the events, inserts the differences, and closes
//     the intent. So a redelivered batch whose events were written but not
//     counted is counted by the repair, never twice and never zero times, and
//     the usage that the repair counts is returned with the next successful
//     Apply (usage whose rollups the failed call had written is in the totals
//     but in no increment). Waiting for the queries matters: an insert whose
//     client gave up may still be writing on the server.
//
// An Apply therefore waits for two rounds of queries: the lookup and the
// intent, concurrently, and then the events and rollups inserts,
// concurrently. It creates three parts (intent, events, rollups) per call.
//
// Rollup rows are only ever added: a commit's usage, a repair's or
// Reconcile's correcting deltas (which may be negative). SummingMergeTree
// merges rows of the same key by adding them, which is associative, so a
// correction is exact before, during and after merges; every read uses
// sum() ... GROUP BY and never depends on merges having happened. A read
// sums each value in two parts, v / 2^32 and v % 2^32, joined in Go
// (internal/saturating): sum() of Int64 wraps silently past 2^63, the parts
// cannot. A merge adds one key's rows as Int64 and so bounds a rollup row by
// 2^63 − 1: 2^31 events of schemas.MaxValue in one hour with the same
// dimensions. Reconcile
// is safe because it holds the store's write lock, so no Apply adds between
// its comparison and its correction.
//
// # The dedup index
//
// A query of events reads in proportion to the table (see Cost), so a
// writer keeps a local index of the keys of the events the store holds
// (aggregator/keyindex: 128-bit keys in an LSM with Bloom filters, whose
// cost per lookup does not grow with history). ClickHouse stays the source
// of truth: the index is only ever a copy of what events holds, and Apply
// trusts an answer of "not held" only because of this invariant:
//
// Before every lookup, the index holds the key of every event the store
// holds that was inserted within the horizon.
//
//   - Apply adds the keys of the events it inserted after ClickHouse
//     acknowledged them, with a mark (the store's identity and the time the
//     write began, on the server's clock), in one atomic write of the index.
//     A key added for an insert that did not land costs nothing but a
//     wrongly kept horizon: the lookup only ever answers for keys the store
//     may hold.
//   - Whenever the index may lack keys the store holds (at the first write
//     after New, after a failed write, after WriterChanged), the store first
//     waits for the queries of open intents (as for the rollups' repair), so
//     every insert of this or an earlier writer has landed or will never
//     land, then adds the key of every event inserted since the index's mark
//     less a margin. A crash between an insert and the index's write, a lost
//     write of the index (it is not synced: after a machine crash it holds a
//     prefix of its writes, whose mark describes it) and the writes of
//     another holder of the lease are all caught up this way.
//   - An index with no mark (new, or its disk lost) or the mark of another
//     store (the table store_identity) is emptied and loaded from all the
//     events inserted within the horizon.
//
// The horizon (Config.Horizon, by default the late-event bound and five
// minutes) bounds the index's disk: a copy of an event that arrives later
// than the horizon after its first copy was written counts again. An event
// that carries its own time cannot be accepted later than the late-event
// bound, so for it the guarantee is absolute. Keys are compared by their
// 128 bits (keyindex's package documentation gives the odds of a collision
// and why the hash is cryptographic).
//
// # One writer
//
// The lookups, the intents and the corrections assume a single writer per
// tenant: one aggregator consumes its usage stream sequentially, and Apply
// and Reconcile of a Store are serialised. Two processes writing the same
// tenants could both find an event missing and count it twice. Total,
// Totals and Ping may run anywhere, concurrently.
//
// By default a store writes every tenant, so one process writes the
// database. Aggregators that share the usage partitions (aggregator/share)
// run one store per partition (Config.Partitions, Config.Partition), all on
// one database: tenants are hashed to partitions (schemas.Partition), so the
// stores' tenants are disjoint, and every write of a scoped store stays
// within its tenants. Apply refuses an event of another partition
// (aggregator.ErrInvalidEvent: the batch is dead-lettered, never written
// beside the other partition's writer); an intent records its partition and
// a store repairs only its own partition's open intents, since another
// partition's may be a write in progress (an intent of an unscoped writer,
// from before the partitions were shared, is repaired by each partition for
// its own tenants and stays open); Reconcile and the dedup index's
// catch-up and rebuild read only the partition's tenants, and the index's
// mark names the partition, so an index of another scope is rebuilt. The
// single-writer argument below therefore holds per partition: "one writer"
// reads "one writer per partition", each with its own lease.
//
// Selecting a partition's tenants costs a read of the tenant column of the
// rows concerned, filtered in Go (18.16 cannot compute the partition's
// hash), then a read through the primary key (ORDER BY tenant, id) of the
// partition's rows only: a rebuild of every partition's index reads the
// events once in all, plus the tenant column once per partition.
//
// The aggregator enforces the single writer with a lease (internal/lease,
// aggregator's package documentation): it writes only while it holds the
// lease, and gives every Apply and Reconcile a context deadline before its
// lease can be taken over. The store takes its part of the fencing:
//
//   - Every insert checks the deadline against the clock itself just before
//     it sends its data, not only through the context (whose timer may not
//     have fired yet in a process that just woke from SIGSTOP): a write
//     frozen past its lease is abandoned when the process wakes.
//   - A process that becomes the writer (WriterChanged) checks the intent
//     log before its first write, as after a crash: it waits until no query
//     of an open intent still runs on the server (the previous holder's
//     insert whose data was on its way when it froze ends, or is cancelled
//     when that process wakes and finds its deadline passed), repairs the
//     rollups of those intents from the events and closes them. Only then
//     does it look events up, so what the previous holder wrote is found
//     and not written twice.
//
// What no client-side check closes is a process frozen between its last
// clock check and its INSERT reaching the server, for longer than the lease
// margin: its insert would land after the new holder's lookup. The window is
// the few microseconds between a clock read and a socket write.
//
// An event held twice in events (by two writers before this fencing, or by
// hand) counts twice in the reports and in Reconcile's repairs, but it
// never breaks Apply: a later delivery of it is dropped once.
//
// # Durability
//
// Apply returns nil once ClickHouse acknowledged every insert. ClickHouse
// writes parts without fsync by default; production runs it replicated.
//
// # On a cluster
//
// With Config.Cluster the store runs on a ClickHouse cluster (ZooKeeper or
// ClickHouse Keeper, remote_servers, and the macros shard and replica on
// every server), with ClickHouse's own replication and no other machinery:
//
//   - The migrations run ON CLUSTER (distributed DDL, which 18.16 has):
//     every statement is rewritten by cluster.statement to name the
//     database and run on every server, and each MergeTree engine becomes
//     its Replicated form at /clickhouse/tables/{shard}/<database>/<table>
//     with the replica {replica}. A form it does not know is an error,
//     never a statement run on one server. schema_migrations is one
//     replicated table over all the servers, so a migration is recorded
//     once for the cluster. Distributed tables events_all and
//     rollups_hourly_all, over the local ones, are created after the
//     migrations (again if a migration changed a local table's columns).
//   - Usage partitions are the unit of sharding: partition p lives on
//     shard ShardOf(p, shards), so a tenant's events, rollups and intents
//     are on one shard and its writer writes that shard's local tables
//     (Config.Shard): the lookups, the intent log, the repairs, the dedup
//     index and Reconcile are those of one shard, and the single-server
//     argument above holds per shard. Total, Totals, TenantTotals and Usage
//     read the Distributed tables, which ask one replica of every shard; a
//     replica that lags shows the usage it has fetched so far.
//   - The writer finds its shard's replicas in system.clusters and writes
//     one of them at a time. Replicas fetch each other's parts
//     asynchronously, so a write that moved to another replica could look
//     up events that replica has not fetched yet and write them again.
//     The writer therefore moves only where recoverIntents runs anyway
//     (after a failed write, at start and after WriterChanged), and first
//     settles the shard: it waits until no query of an intent open on any
//     replica that answers still runs on any of them, then until the
//     replica it chose has copied the shared log of applies, events and
//     rollups_hourly to its queue and emptied the queues (SYSTEM SYNC
//     REPLICA, again until one round finds nothing left): it then holds
//     every part any replica committed to ZooKeeper, a write's events with
//     its rollups (a replica that had fetched the rollups of a write and
//     not yet its events would have the repair subtract them). A part only a
//     dead replica holds makes the sync, and so the writer, wait until that
//     replica is back (the write fails and the aggregator retries it): a
//     replica's crash loses nothing and counts nothing twice, at the price
//     of the shard's writes waiting while a part committed on the dead
//     replica alone is unreachable. A part a crashed replica wrote and did
//     not commit to ZooKeeper is moved aside by that replica at its restart
//     and never lands. What the settling cannot see is a replica that is
//     alive but unreachable from the writer, whose insert of an open intent
//     may still commit after the sync; the window is that insert's commit
//     (the server received the whole block and writes the part), as on one
//     server after its client gave up.
//   - The writes turn off insert_deduplicate. A replicated table drops
//     a block whose part equals one of the last it took, so a write that
//     failed after its rollups landed (taken back by the repair) and was
//     retried would have its rollups dropped and its usage lost (the
//     replica-kill test found it). Exactly-once never needed it.
//   - Config.InsertQuorum sets insert_quorum on every write: an insert is
//     acknowledged once that many replicas hold it, so the permanent loss
//     of one replica's disk loses no acknowledged usage. It is off by
//     default: with two replicas a quorum of two stops the shard's writes
//     while either is down (they fail and are retried), which suits three
//     replicas per shard; and before 20.10 (insert_quorum_parallel) a
//     table takes one quorum insert at a time, so it needs one writer per
//     shard. A crash and restart, which the tests run, loses nothing
//     without it: the settling above waits for the restarted replica.
//
// # Cost
//
// Without an index, the lookup of a call of K new events reads, per
// partition of events, every granule (8192 rows) that may hold one of them:
// the whole key_hash column while a partition has fewer than K granules,
// about K granules beyond. It grows with the table (65-270 ms for 50 000
// events against 10 million on the shared 2-core test machine) and caps at
// K granules per partition, which for K = 50 000 is still 400 million key
// hashes a call: it does not sustain full ingest speed on tables of
// hundreds of millions of events. With the index, a lookup costs a few
// in-memory filter probes per event whatever the table holds; loading the
// index from events (its rebuild) reads every event inserted within the
// horizon once. aggregator/BENCHMARKS.md has the figures.
package clickhouse

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/ext"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/keyindex"
	"github.com/meterd/meterd/aggregator/rollup"
	"github.com/meterd/meterd/internal/saturating"
	"github.com/meterd/meterd/schemas"
	"github.com/meterd/meterd/schemas/migrations"
)

var _ aggregator.Store = (*Store)(nil)

// Config configures a Store.
type Config struct {
	// DSN is clickhouse://[user[:password]@]host:port/database[?settings], the
	// native protocol address (clickhouse-go's DSN). The database is created
	// if it does not exist.
	DSN string
	// Logger receives the store's few log lines; nil discards them.
	Logger *slog.Logger
	// IndexDir, if set, is the directory of the writer's local dedup index
	// (aggregator/keyindex): Apply looks events up there rather than in
	// events, at a cost that does not grow with history. Only a writer
	// (the aggregator) sets it; readers leave it empty.
	IndexDir string
	// Horizon is how long the index holds an event's key after its first
	// copy was written (keyindex.DefaultHorizon if 0).
	Horizon time.Duration
	// IndexCacheBytes is the index's block cache, which must hold its Bloom
	// filters: 1.2 GiB per billion keys (keyindex.DefaultCacheBytes if 0).
	IndexCacheBytes int64
	// IndexBufferBytes bounds the memory of the keys the index holds in
	// memory: those added since its last spill and those the spill writes
	// (keyindex.DefaultBufferBytes if 0).
	IndexBufferBytes int64
	// Registerer, with IndexDir, receives the index's metrics
	// (meterd_aggregator_dedup_index_*); nil registers none.
	Registerer prometheus.Registerer
	// Partitions, if positive, scopes the store's writes to the tenants of
	// usage partition Partition of Partitions (schemas.Partition), for
	// aggregators that share the partitions: stores of different partitions
	// write one database at once, each the only writer of its tenants (see
	// "One writer" in the package documentation). 0 writes every tenant.
	// Reads (Total, Totals, Usage) are never scoped.
	Partitions, Partition int

	// Cluster, if set, runs the store on the ClickHouse cluster of that
	// name (remote_servers of the DSN's server; see "On a cluster" in the
	// package documentation): replicated tables created ON CLUSTER, reads
	// through Distributed tables, writes to the local tables of Shard.
	Cluster string
	// Shard is the cluster's shard (shard_num, from 1; ShardOf of the
	// writer's partition) whose local tables the store writes, through
	// whichever of its replicas answers. Required with Cluster.
	Shard int
	// InsertQuorum, with Cluster, is the insert_quorum of every write: an
	// insert is acknowledged once that many replicas of the shard hold it
	// (0: once one does, ClickHouse's default).
	InsertQuorum int
}

var databaseName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// Validate reports whether c can open a store.
func (c Config) Validate() error {
	_, err := c.options()
	return err
}

func (c Config) options() (*clickhouse.Options, error) {
	if c.DSN == "" {
		return nil, fmt.Errorf("clickhouse: DSN is required")
	}
	opts, err := clickhouse.ParseDSN(c.DSN)
	if err != nil {
		return nil, fmt.Errorf("clickhouse: DSN: %w", err)
	}
	if opts.Protocol != clickhouse.Native {
		return nil, fmt.Errorf("clickhouse: DSN must use the native protocol (clickhouse://)")
	}
	if !databaseName.MatchString(opts.Auth.Database) {
		return nil, fmt.Errorf("clickhouse: DSN must name a database matching %s, got %q", databaseName, opts.Auth.Database)
	}
	if c.Partitions < 0 || c.Partitions > 0 && (c.Partition < 0 || c.Partition >= c.Partitions) {
		return nil, fmt.Errorf("clickhouse: partition %d of %d is out of range", c.Partition, c.Partitions)
	}
	switch {
	case c.Cluster == "" && (c.Shard != 0 || c.InsertQuorum != 0):
		return nil, fmt.Errorf("clickhouse: a shard and an insert quorum need a cluster")
	case c.Cluster == "":
	case !clusterName.MatchString(c.Cluster):
		return nil, fmt.Errorf("clickhouse: cluster name must match %s, got %q", clusterName, c.Cluster)
	case c.Partitions > 0 && c.Shard != 0:
		// A partition's tenants live on its shard; another would look up
		// their retries where they are not, and count them again.
		return nil, fmt.Errorf("clickhouse: the store of partition %d writes shard ShardOf(%d, shards); leave the shard (%d) unset", c.Partition, c.Partition, c.Shard)
	case c.Shard < 1 && c.Partitions == 0:
		return nil, fmt.Errorf("clickhouse: on cluster %s the shard (from 1) is required, got %d", c.Cluster, c.Shard)
	case c.InsertQuorum < 0:
		return nil, fmt.Errorf("clickhouse: insert quorum must be 0 or more, got %d", c.InsertQuorum)
	}
	return opts, nil
}

// Store is the ClickHouse store. Its methods are safe for concurrent use.
type Store struct {
	rollup.Totaler // Total, Totals and TenantTotals, over sumsOf

	// conn is the writer's server: the DSN's, or on a cluster the replica
	// of the shard that settle chose (it changes only under mu). read is
	// the server of the reads and the migrations, the DSN's; tables names
	// the tables the reads query there.
	conn    driver.Conn
	read    driver.Conn
	tables  readTables
	cluster *cluster // nil on one server
	log     *slog.Logger
	// scope is the partition whose tenants this store writes, or the
	// zero scope (all tenants).
	scope scope

	mu sync.Mutex // serialises the writers: Apply and Reconcile
	// pending is set when an apply may have been interrupted (at start, and
	// after a failed write): the intent log is checked before writing.
	pending bool
	// carry holds usage that repairs counted and no Apply returned yet.
	carry rollup.Rows
	// open is the intent of the last write, which the next write (or Close)
	// closes; nil when none is open or pending is set.
	open *intent
	// prepared is set by Prepare once it synced the index after every open
	// intent's queries ended, under this writer's lease: recoverIntents
	// catches up from its mark less preparedMargin only. Cleared with every
	// change of writer and failed write, and when recoverIntents consumed it.
	prepared bool

	// index is the local dedup index, nil without Config.IndexDir; id is
	// the store's identity and clockOffset how far the server's clock is
	// ahead of this process's.
	index       *keyindex.Index
	id          string
	clockOffset time.Duration
	// stopExpiry ends the index's expiry, which closes expired when done.
	stopExpiry context.CancelFunc
	expired    chan struct{}
	// unregister removes the index's metrics (nil without a Registerer).
	unregister func()

	closeOnce sync.Once
	closeErr  error
}

// New connects, creates the database if it is missing and applies the
// migrations it has not recorded.
func New(ctx context.Context, cfg Config) (*Store, error) {
	opts, err := cfg.options()
	if err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := createDatabase(ctx, opts, cfg.Cluster); err != nil {
		return nil, err
	}
	conn, err := clickhouse.Open(opts)
	if err != nil {
		return nil, fmt.Errorf("clickhouse: open: %w", err)
	}
	s := &Store{conn: conn, read: conn, tables: localTables, log: log.With("component", "store", "store", "clickhouse"), pending: true, carry: rollup.Rows{},
		scope: scope{partitions: cfg.Partitions, partition: cfg.Partition}}
	s.Totaler = rollup.NewTotaler("clickhouse", s.sumsOf)
	if s.scope.partitions > 0 {
		s.log = s.log.With("partition", cfg.Partition)
	}
	if cfg.Cluster != "" {
		// A store of one partition without a shard writes its partition's
		// shard, ShardOf(partition, shards).
		if s.cluster, err = openCluster(ctx, conn, opts, cfg.Cluster, cfg.Shard, cfg.Partition, cfg.InsertQuorum); err != nil {
			conn.Close()
			return nil, fmt.Errorf("clickhouse: %w", err)
		}
		s.tables = readTables{events: "events" + distributedSuffix, rollups: "rollups_hourly" + distributedSuffix}
		s.log = s.log.With("cluster", cfg.Cluster, "shard", s.cluster.shard)
	}
	fail := func(err error) (*Store, error) {
		s.closeConns()
		return nil, fmt.Errorf("clickhouse: %w", err)
	}
	if err := s.migrate(ctx); err != nil {
		return fail(err)
	}
	if s.cluster != nil {
		if err := s.createDistributed(ctx); err != nil {
			return fail(err)
		}
		// The writer's replica: the first that answers (settle chooses
		// again before every write that follows a failure).
		up := s.cluster.live(ctx)
		if len(up) == 0 {
			return fail(fmt.Errorf("no replica of shard %d answers (%s)", s.cluster.shard, strings.Join(s.cluster.addrs, ", ")))
		}
		s.cluster.at.Store(int32(up[0]))
		s.conn = s.cluster.replicas[up[0]]
	}
	if cfg.IndexDir != "" {
		if err := s.openIndex(ctx, cfg); err != nil {
			return fail(err)
		}
	}
	return s, nil
}

// openIndex opens the dedup index and starts its expiry. The index is
// brought up to date with the store before the first lookup
// (recoverIntents).
func (s *Store) openIndex(ctx context.Context, cfg Config) error {
	var err error
	if s.id, err = s.storeID(ctx); err != nil {
		return fmt.Errorf("store identity: %w", err)
	}
	s.id = s.scope.indexScope(s.id)
	if err := s.measureClock(ctx); err != nil {
		return fmt.Errorf("server clock: %w", err)
	}
	s.index, err = keyindex.Open(keyindex.Options{Dir: cfg.IndexDir, Horizon: cfg.Horizon,
		CacheBytes: cfg.IndexCacheBytes, BufferBytes: cfg.IndexBufferBytes, Logger: s.log})
	if err != nil {
		return err
	}
	if reg := cfg.Registerer; reg != nil {
		m := indexMetrics{s.index}
		if err := reg.Register(m); err != nil {
			err = errors.Join(fmt.Errorf("dedup index metrics: %w", err), s.index.Close())
			s.index = nil
			return err
		}
		s.unregister = func() { reg.Unregister(m) }
	}
	expiry, stop := context.WithCancel(context.Background())
	s.stopExpiry, s.expired = stop, make(chan struct{})
	go s.expireIndex(expiry)
	return nil
}

// createDatabase creates the DSN's database from a connection to the
// server's default database (a connection to a missing one fails), on every
// server of the cluster if one is named.
func createDatabase(ctx context.Context, opts *clickhouse.Options, cluster string) error {
	boot := *opts
	boot.Auth.Database = ""
	conn, err := clickhouse.Open(&boot)
	if err != nil {
		return fmt.Errorf("clickhouse: open: %w", err)
	}
	defer conn.Close()
	on := ""
	if cluster != "" {
		// A statement ON CLUSTER waits for every server: one that is down
		// must not keep a writer from starting when there is nothing to do.
		if ok, err := exists(ctx, conn, "databases", "name = ?", opts.Auth.Database); err != nil || ok {
			return err
		}
		on = " ON CLUSTER `" + cluster + "`"
	}
	if err := conn.Exec(ctx, "CREATE DATABASE IF NOT EXISTS `"+opts.Auth.Database+"`"+on); err != nil {
		return fmt.Errorf("clickhouse: create database %s: %w", opts.Auth.Database, err)
	}
	return nil
}

// migrate applies the migrations not recorded in schema_migrations, in
// version order, recording each after all its statements succeeded.
func (s *Store) migrate(ctx context.Context) error {
	ms, err := migrations.Load(migrations.ClickHouse, "clickhouse")
	if err != nil {
		return err
	}
	create := `CREATE TABLE IF NOT EXISTS schema_migrations (
		version UInt32, name String, applied_at DateTime('UTC') DEFAULT now()
	) ENGINE = MergeTree ORDER BY version`
	made := false // on a cluster, if it exists: ON CLUSTER waits for every server
	if s.cluster != nil {
		if made, err = exists(ctx, s.read, "tables", "database = ? AND name = 'schema_migrations'", s.cluster.db); err != nil {
			return err
		}
		if create, err = s.cluster.migrationsTable(create); err != nil {
			return err
		}
	}
	if !made {
		if err := s.read.Exec(ctx, create); err != nil {
			return fmt.Errorf("create schema_migrations: %w", err)
		}
	}
	pending, err := migrations.Pending(ms, func() (migrations.Rows, error) {
		return s.read.Query(ctx, `SELECT DISTINCT version FROM schema_migrations`)
	})
	if err != nil {
		return fmt.Errorf("read schema_migrations: %w", err)
	}
	for _, m := range pending {
		done, err := s.migrationDone(ctx, m)
		if err != nil {
			return fmt.Errorf("migration %s: guard: %w", m.Name, err)
		}
		for _, stmt := range m.Statements {
			if done {
				break
			}
			if s.cluster != nil {
				if stmt, err = s.cluster.statement(stmt); err != nil {
					return fmt.Errorf("migration %s: %w", m.Name, err)
				}
			}
			if err := s.read.Exec(ctx, stmt); err != nil {
				return fmt.Errorf("migration %s: %w", m.Name, err)
			}
		}
		if err := s.recordMigration(ctx, m); err != nil {
			return fmt.Errorf("record migration %s: %w", m.Name, err)
		}
		s.log.Info("applied migration", "migration", m.Name)
	}
	return nil
}

// migrationDone runs the guard of m, if it has one: whether its effect is
// there already (it ran and was not recorded).
func (s *Store) migrationDone(ctx context.Context, m migrations.Migration) (bool, error) {
	if m.DoneWhen == "" {
		return false, nil
	}
	var done uint8
	if err := s.read.QueryRow(ctx, m.DoneWhen).Scan(&done); err != nil {
		return false, err
	}
	return done != 0, nil
}

// recordMigration inserts m into schema_migrations. Every insert goes
// through PrepareBatch: 18.16 waits for data blocks after an INSERT even when
// the query holds VALUES, so Exec of an INSERT never returns there.
func (s *Store) recordMigration(ctx context.Context, m migrations.Migration) error {
	b, err := s.read.PrepareBatch(ctx, `INSERT INTO schema_migrations (version, name)`)
	if err != nil {
		return err
	}
	defer b.Close()
	if err := b.Append(uint32(m.Version), m.Name); err != nil {
		return err
	}
	return b.Send()
}

// candidate is an event Apply may insert.
type candidate struct {
	e     *schemas.Event
	batch string
	hash  uint64
	key   keyindex.Key // with an index only
	dims  string       // DimsKey of e.Dimensions, once the lookup is done
}

// all reports whether f holds for every element of xs.
func all[T any](xs []T, f func(T) bool) bool {
	return !slices.ContainsFunc(xs, func(x T) bool { return !f(x) })
}

// Apply implements aggregator.Store; see the package documentation.
func (s *Store) Apply(ctx context.Context, batches []*schemas.Batch) ([]aggregator.Increment, error) {
	if err := rollup.Check(batches); err != nil {
		return nil, err
	}
	cands, index, in := candidates(batches, s.index != nil)
	// The scope is checked on the distinct tenants candidates collected,
	// and the batch to name is looked for only when one is not the scope's.
	if !all(in.tenants, s.scope.owns) {
		return nil, s.scope.check(batches)
	}
	in.partition = s.scope.intentPartition()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.recoverIntents(ctx); err != nil {
		return nil, fmt.Errorf("clickhouse: apply: %w", err)
	}
	rows := rollup.Rows{}
	if len(cands) > 0 {
		var err error
		if rows, err = s.write(ctx, cands, index, in); err != nil {
			s.pending, s.prepared = true, false // some of the writes may have reached the server
			return nil, fmt.Errorf("clickhouse: apply: %w", err)
		}
	}
	rows.Merge(s.carry)
	clear(s.carry)
	return rows.Increments(), nil
}

// candidates returns the events of batches without repetitions, an index of
// their keys to their positions, and the intent of writing all of them;
// withKeys computes their keyindex keys too.
func candidates(batches []*schemas.Batch, withKeys bool) ([]candidate, map[rollup.EventID]int, intent) {
	n := 0
	for _, b := range batches {
		n += len(b.Events)
	}
	cands := make([]candidate, 0, n)
	index := make(map[rollup.EventID]int, n)
	tenants := map[string]struct{}{}
	in := intent{id: randomID(16), startedAt: time.Now().UTC(), hours: rollup.Range{From: 1<<63 - 1}, partition: -1}
	for _, b := range batches {
		for i := range b.Events {
			e := &b.Events[i]
			k := rollup.EventID{Tenant: e.Tenant, ID: e.ID}
			if _, dup := index[k]; dup {
				continue
			}
			index[k] = len(cands)
			c := candidate{e: e, batch: b.ID, hash: keyHash(e.Tenant, e.ID)}
			if withKeys {
				c.key = keyindex.KeyOf(e.Tenant, e.ID)
			}
			cands = append(cands, c)
			tenants[e.Tenant] = struct{}{}
			h := rollup.Hour(rollup.Second(e.Time))
			in.hours.From, in.hours.To = min(in.hours.From, h), max(in.hours.To, h+rollup.HourSeconds)
		}
	}
	in.tenants = slices.Sorted(maps.Keys(tenants))
	return cands, index, in
}

// indexedLookupMax is the largest number of candidates held looks up
// through the primary key. Building the set of (tenant, id) tuples for the
// index costs more than scanning key_hash once a call has thousands of
// candidates (measured: 50 000 candidates against 1.5 million events, 25 ms
// for the key_hash scan against 100-180 ms with the tuples), but on a large
// table a few candidates must not scan it.
const indexedLookupMax = 4096

// lookUp returns the positions in cands of the candidates events holds
// already, each once; index maps their keys to their positions. Rows are
// selected by key_hash (and for few candidates also by the primary key); the
// exact (tenant, id) is compared here, so a hash collision costs a row, never
// a wrong answer. events may hold a key more than once (written by two
// writers before fencing, or by hand): the caller must not drop a candidate
// twice.
func (s *Store) lookUp(ctx context.Context, cands []candidate, index map[rollup.EventID]int) (held []int, err error) {
	hashes := make([]uint64, len(cands))
	for i, c := range cands {
		hashes[i] = c.hash
	}
	var tbl *ext.Table
	query := `SELECT tenant, id FROM events PREWHERE key_hash IN incoming_events`
	if len(cands) <= indexedLookupMax {
		tenants, ids := make([]string, len(cands)), make([]string, len(cands))
		for i, c := range cands {
			tenants[i], ids[i] = c.e.Tenant, c.e.ID
		}
		tbl, err = ext.NewTable("incoming_events",
			ext.Column("key_hash", "UInt64"), ext.Column("tenant", "String"), ext.Column("id", "String"))
		if err == nil {
			_, err = tbl.Block().Columns[1].Append(tenants)
		}
		if err == nil {
			_, err = tbl.Block().Columns[2].Append(ids)
		}
		query = `SELECT tenant, id FROM events PREWHERE key_hash IN (SELECT key_hash FROM incoming_events)
			WHERE (tenant, id) IN (SELECT tenant, id FROM incoming_events)`
	} else {
		tbl, err = ext.NewTable("incoming_events", ext.Column("key_hash", "UInt64"))
	}
	if err == nil {
		_, err = tbl.Block().Columns[0].Append(hashes)
	}
	if err != nil {
		return nil, fmt.Errorf("look up events: %w", err)
	}
	rows, err := s.conn.Query(clickhouse.Context(ctx, clickhouse.WithExternalTable(tbl)), query)
	if err != nil {
		return nil, fmt.Errorf("look up events: %w", err)
	}
	defer rows.Close()
	found := make([]bool, len(cands))
	for rows.Next() {
		var k rollup.EventID
		if err := rows.Scan(&k.Tenant, &k.ID); err != nil {
			return nil, fmt.Errorf("look up events: %w", err)
		}
		if i, ok := index[k]; ok && !found[i] {
			found[i] = true
			held = append(held, i)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("look up events: %w", err)
	}
	return held, nil
}

// keyHash is FNV-1a 64 of tenant, NUL, id: the key_hash column.
func keyHash(tenant, id string) uint64 {
	const prime = 1099511628211
	h := uint64(14695981039346656037)
	for i := 0; i < len(tenant); i++ {
		h = (h ^ uint64(tenant[i])) * prime
	}
	h *= prime // the NUL separator: h ^ 0 == h
	for i := 0; i < len(id); i++ {
		h = (h ^ uint64(id[i])) * prime
	}
	return h
}

// intent is an open entry of the intent log.
type intent struct {
	id        string
	startedAt time.Time
	tenants   []string
	hours     rollup.Range
	// partition is the scope of the writer that opened it, -1 for a
	// writer of every partition.
	partition int32
}

// write opens the intent in, looks up which candidates events holds, and
// inserts the others and their rollups; it returns the rollup rows it added.
// The intent covers every candidate (the lookup has not answered when it is
// written) and stays open until the next write closes it.
func (s *Store) write(ctx context.Context, cands []candidate, index map[rollup.EventID]int, in intent) (rollup.Rows, error) {
	// The intent, the lookup and the rollups of all candidates are
	// independent (they only read cands): only the inserts need all three.
	var (
		dims []string
		rows rollup.Rows
		held []int
		mark = keyindex.Mark{Store: s.id, Through: s.serverNow()}
	)
	err := parallel(
		func() error { dims, rows = sumAll(cands); return nil },
		func() error { return s.openIntent(ctx, in) },
		func() error {
			var err error
			if s.index != nil {
				held, err = s.held(cands, mark.Through)
			} else {
				held, err = s.lookUp(ctx, cands, index)
			}
			return err
		},
	)
	if err != nil {
		return nil, err
	}
	for i := range cands {
		cands[i].dims = dims[i]
	}
	for _, i := range held {
		c := &cands[i]
		k := rollup.Key{Tenant: c.e.Tenant, Meter: c.e.Meter, Hour: rollup.Hour(rollup.Second(c.e.Time)), Dims: c.dims}
		if rows.Add(k, rollup.Sum{Value: -c.e.Value, Events: -1}); rows[k] == (rollup.Sum{}) {
			delete(rows, k)
		}
		c.e = nil // not to be inserted
	}
	news := slices.DeleteFunc(cands, func(c candidate) bool { return c.e == nil })
	if len(news) == 0 {
		return rows, nil
	}
	// The intent covers events and rollups written in any order.
	err = parallel(
		func() error { return s.insertEvents(ctx, in.id, news) },
		func() error { return s.insertRollups(ctx, in.id+"-rollups", rows) })
	if err != nil {
		return nil, err
	}
	if s.index != nil {
		if err := s.indexWritten(news, mark); err != nil {
			return nil, err
		}
	}
	return rows, nil
}

// sumAll returns the dimensions key of every candidate and their sums per
// rollup row.
func sumAll(cands []candidate) ([]string, rollup.Rows) {
	dims := make([]string, len(cands))
	rows := make(rollup.Rows, len(cands)/4)
	var cache rollup.DimsCache
	for i := range cands {
		e := cands[i].e
		dims[i] = cache.Get(e.Dimensions)
		rows.AddEvent(e, dims[i])
	}
	return dims, rows
}

// closeConns closes the connections to the servers.
func (s *Store) closeConns() error {
	err := s.read.Close()
	if s.cluster != nil {
		err = errors.Join(err, s.cluster.close())
	}
	return err
}

// WriterChanged tells the store that another process may have written
// since its last write: the next write checks the intent log first, as after
// a crash (see the package documentation).
func (s *Store) WriterChanged() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pending, s.prepared = true, false
	s.open = nil // our last intent is open in the log, or the other writer closed it
}

// send sends b's data unless ctx's deadline passed (aggregator.CheckDeadline).
func send(ctx context.Context, b driver.Batch) error {
	if err := aggregator.CheckDeadline(ctx); err != nil {
		return err
	}
	return b.Send()
}

// randomID returns n random bytes in hex.
func randomID(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// parallel runs fs concurrently and returns the first of their errors.
func parallel(fs ...func() error) error {
	errs := make([]error, len(fs))
	var wg sync.WaitGroup
	for i, f := range fs[1:] {
		wg.Go(func() { errs[i+1] = f() })
	}
	errs[0] = fs[0]()
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// openIntent records in (sign 1) and, in the same block and therefore the
// same part, closes the intent of the previous write (sign -1): both land or
// neither does. in is then the open intent.
func (s *Store) openIntent(ctx context.Context, in intent) error {
	rows := []intentRow{{in, 1}}
	if s.open != nil {
		rows = append(rows, intentRow{*s.open, -1})
	}
	if err := s.insertIntents(ctx, rows...); err != nil {
		return err
	}
	s.open = &in
	return nil
}

// intentRow is a row of applies: an intent opened (sign 1) or closed (-1).
type intentRow struct {
	in   intent
	sign int8
}

// insertIntents inserts rows into applies in one block.
func (s *Store) insertIntents(ctx context.Context, rows ...intentRow) error {
	b, err := s.conn.PrepareBatch(ctx, `INSERT INTO applies (apply_id, sign, started_at, tenants, first_hour, end_hour, usage_partition)`)
	if err != nil {
		return fmt.Errorf("record intent: %w", err)
	}
	defer b.Close()
	for _, r := range rows {
		in := r.in
		if err := b.Append(in.id, r.sign, in.startedAt, in.tenants, rollup.Time(in.hours.From), rollup.Time(in.hours.To), in.partition); err != nil {
			return fmt.Errorf("record intent: %w", err)
		}
	}
	if err := send(ctx, b); err != nil {
		return fmt.Errorf("record intent: %w", err)
	}
	return nil
}

// insertEvents inserts the new events in one block, with a query id the
// recovery can wait for.
func (s *Store) insertEvents(ctx context.Context, applyID string, news []candidate) error {
	n := len(news)
	var (
		tenants, ids, meters, dims, batchIDs = make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
		values                               = make([]int64, n)
		times                                = make([]time.Time, n)
		hashes                               = make([]uint64, n)
	)
	for i, c := range news {
		e := c.e
		tenants[i], ids[i], meters[i], values[i], dims[i], batchIDs[i], hashes[i] = e.Tenant, e.ID, e.Meter, e.Value, c.dims, c.batch, c.hash
		times[i] = time.Unix(rollup.Second(e.Time), 0)
	}
	ctx = clickhouse.Context(ctx, clickhouse.WithQueryID(applyID+"-events"))
	b, err := s.conn.PrepareBatch(ctx, `INSERT INTO events
		(tenant, id, meter, value, time, dims_key, batch_id, key_hash)`)
	if err != nil {
		return fmt.Errorf("insert events: %w", err)
	}
	defer b.Close()
	for i, col := range []any{tenants, ids, meters, values, times, dims, batchIDs, hashes} {
		if err := b.Column(i).Append(col); err != nil {
			return fmt.Errorf("insert events: column %d: %w", i, err)
		}
	}
	if err := send(ctx, b); err != nil {
		return fmt.Errorf("insert events: %w", err)
	}
	return nil
}

// insertRollups adds rows to rollups_hourly in one block, with queryID
// (the server makes one up for "").
func (s *Store) insertRollups(ctx context.Context, queryID string, rows rollup.Rows) error {
	n := len(rows)
	if n == 0 {
		return nil
	}
	tenants, meters, dims := make([]string, 0, n), make([]string, 0, n), make([]string, 0, n)
	hours := make([]time.Time, 0, n)
	values, events := make([]int64, 0, n), make([]int64, 0, n)
	for k, sum := range rows {
		tenants, meters, dims = append(tenants, k.Tenant), append(meters, k.Meter), append(dims, k.Dims)
		hours = append(hours, time.Unix(k.Hour, 0))
		values, events = append(values, sum.Value), append(events, sum.Events)
	}
	b, err := s.conn.PrepareBatch(clickhouse.Context(ctx, clickhouse.WithQueryID(queryID)),
		`INSERT INTO rollups_hourly (tenant, meter, hour, dims_key, value, events)`)
	if err != nil {
		return fmt.Errorf("insert rollups: %w", err)
	}
	defer b.Close()
	for i, col := range []any{tenants, meters, hours, dims, values, events} {
		if err := b.Column(i).Append(col); err != nil {
			return fmt.Errorf("insert rollups: column %d: %w", i, err)
		}
	}
	if err := send(ctx, b); err != nil {
		return fmt.Errorf("insert rollups: %w", err)
	}
	return nil
}

// recoverIntents repairs the rollups of every open intent, if an apply may
// have been interrupted, and adds the repairs to carry. A store scoped to a
// partition repairs its own partition's intents, and its own tenants' part
// of the intents of a writer of every partition (an aggregator before the
// partitions were shared), which it leaves open for the other partitions.
func (s *Store) recoverIntents(ctx context.Context) error {
	if !s.pending {
		return nil
	}
	open, err := s.settledIntents(ctx)
	if err != nil {
		return err
	}
	for _, in := range open {
		shared := s.scope.partitions > 0 && in.partition < 0
		if shared {
			in.tenants = s.scope.own(in.tenants)
		}
		var deltas rollup.Rows
		if len(in.tenants) > 0 {
			if deltas, err = s.diff(ctx, in.hours, in.tenants); err != nil {
				return fmt.Errorf("repair apply %s: %w", in.id, err)
			}
			if err := s.insertRollups(ctx, in.id+"-repair-"+randomID(4), deltas); err != nil {
				return fmt.Errorf("repair apply %s: %w", in.id, err)
			}
			s.carry.Merge(deltas)
		}
		if !shared {
			if err := s.insertIntents(ctx, intentRow{in, -1}); err != nil {
				return err
			}
		}
		// The intent of the last write before a crash is open whether or
		// not that write finished; only a difference tells.
		log := s.log.Info
		if len(deltas) > 0 {
			log = s.log.Warn
		}
		log("repaired the rollups of an open intent", "apply_id", in.id, "started_at", in.startedAt, "rows", len(deltas),
			"intent_partition", in.partition)
	}
	if s.index != nil {
		margin := catchUpMargin
		if s.prepared {
			margin = preparedMargin
		}
		if err := s.syncIndex(ctx, margin); err != nil {
			return err
		}
	}
	s.pending, s.prepared = false, false
	s.open = nil
	return nil
}

// settledIntents returns the open intents of the store's scope once no
// query of any of them still runs, on a cluster after settling the shard:
// every insert of this or an earlier writer has then landed or never will.
// It writes nothing.
func (s *Store) settledIntents(ctx context.Context) ([]intent, error) {
	if s.cluster != nil {
		if err := s.settle(ctx); err != nil {
			return nil, err
		}
	}
	rows, err := s.conn.Query(ctx, `SELECT apply_id, anyIf(started_at, sign = 1), anyIf(tenants, sign = 1),
			toUInt32(minIf(first_hour, sign = 1)), toUInt32(maxIf(end_hour, sign = 1)), any(usage_partition)
		FROM applies`+s.scope.intentsWhere()+` GROUP BY apply_id HAVING sum(sign) > 0`)
	if err != nil {
		return nil, fmt.Errorf("read intents: %w", err)
	}
	var open []intent
	for rows.Next() {
		var in intent
		var from, to uint32
		if err := rows.Scan(&in.id, &in.startedAt, &in.tenants, &from, &to, &in.partition); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read intents: %w", err)
		}
		in.hours = rollup.Range{From: int64(from), To: int64(to)}
		open = append(open, in)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read intents: %w", err)
	}
	for _, in := range open {
		if err := waitQueries(ctx, s.conn, in.id); err != nil {
			return nil, err
		}
	}
	return open, nil
}

// waitQueries waits until no query of the apply runs on conn's server: an
// insert whose client gave up may still be writing.
func waitQueries(ctx context.Context, conn driver.Conn, applyID string) error {
	for {
		var n uint64
		if err := conn.QueryRow(ctx, `SELECT count() FROM system.processes WHERE query_id LIKE ?`, applyID+"-%").Scan(&n); err != nil {
			return fmt.Errorf("wait for the queries of apply %s: %w", applyID, err)
		}
		if n == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// diff returns, per rollup row of the hours h (and of the tenants, if any),
// the raw sums less the rollup sums where they differ: the deltas that
// repair the rollups.
func (s *Store) diff(ctx context.Context, h rollup.Range, tenants []string) (rollup.Rows, error) {
	scope := ""
	if tenants != nil {
		var err error
		if ctx, err = withTenants(ctx, tenants); err != nil {
			return nil, err
		}
		scope = " AND tenant IN scope"
	}
	// The rollups' parts are negated rather than their values: the parts
	// are bounded by 2^32, a value may be -2^63.
	from, to := strconv.FormatInt(h.From, 10), strconv.FormatInt(h.To, 10)
	rows, err := s.conn.Query(ctx, `SELECT tenant, meter, h, dims_key, sum(vh), sum(vl), sum(nh), sum(nl) FROM (
			SELECT tenant, meter, toUInt32(intDiv(toUInt32(time), 3600) * 3600) AS h, dims_key,
				`+hiPart("value")+` AS vh, `+loPart("value")+` AS vl, toInt64(0) AS nh, toInt64(1) AS nl
			FROM events WHERE time >= toDateTime(`+from+`) AND time < toDateTime(`+to+`)`+scope+`
			UNION ALL
			SELECT tenant, meter, toUInt32(hour) AS h, dims_key,
				-`+hiPart("value")+` AS vh, -`+loPart("value")+` AS vl, -`+hiPart("events")+` AS nh, -`+loPart("events")+` AS nl
			FROM rollups_hourly WHERE hour >= toDateTime(`+from+`) AND hour < toDateTime(`+to+`)`+scope+`
		) GROUP BY tenant, meter, h, dims_key HAVING sum(vh) != 0 OR sum(vl) != 0 OR sum(nh) != 0 OR sum(nl) != 0`)
	if err != nil {
		return nil, fmt.Errorf("compare rollups: %w", err)
	}
	defer rows.Close()
	deltas := rollup.Rows{}
	for rows.Next() {
		var k rollup.Key
		var hour uint32
		var parts rollup.Parts
		if err := rows.Scan(append([]any{&k.Tenant, &k.Meter, &hour, &k.Dims}, parts.Dest()...)...); err != nil {
			return nil, err
		}
		k.Hour = int64(hour)
		if d := parts.Sum(); d != (rollup.Sum{}) {
			deltas[k] = d
		}
	}
	return deltas, rows.Err()
}

// Reconcile implements aggregator.Store: it inserts the deltas that make the
// rollups of the hours equal to the sums of the raw events.
func (s *Store) Reconcile(ctx context.Context, from, to time.Time) (int, error) {
	hours := rollup.Covering(from, to)
	if hours.Empty() {
		return 0, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.recoverIntents(ctx); err != nil {
		return 0, fmt.Errorf("clickhouse: reconcile: %w", err)
	}
	var tenants []string // nil: all
	if s.scope.partitions > 0 {
		var err error
		if tenants, err = s.scopeTenants(ctx, `SELECT DISTINCT tenant FROM events WHERE time >= toDateTime(`+strconv.FormatInt(hours.From, 10)+
			`) AND time < toDateTime(`+strconv.FormatInt(hours.To, 10)+`) UNION ALL SELECT DISTINCT tenant FROM rollups_hourly WHERE hour >= toDateTime(`+
			strconv.FormatInt(hours.From, 10)+`) AND hour < toDateTime(`+strconv.FormatInt(hours.To, 10)+`)`); err != nil {
			return 0, fmt.Errorf("clickhouse: reconcile: %w", err)
		}
		if len(tenants) == 0 {
			return 0, nil
		}
	}
	deltas, err := s.diff(ctx, hours, tenants)
	if err != nil {
		return 0, fmt.Errorf("clickhouse: reconcile: %w", err)
	}
	if err := s.insertRollups(ctx, "reconcile-"+randomID(8), deltas); err != nil {
		return 0, fmt.Errorf("clickhouse: reconcile: %w", err)
	}
	return len(deltas), nil
}

// sums selects tenant, meter and the Parts of the sum of values and of the
// number of events in [from, to): rollups for the whole hours, raw events for the edges, each
// narrowed by filter. It returns the query and how many times it holds
// filter; "" for an empty range. tables names the tables it reads.
func sums(tables readTables, from, to time.Time, filter string) (string, int) {
	sp := rollup.Split(from, to)
	var parts []string
	if !sp.Hours.Empty() {
		parts = append(parts, `SELECT tenant, meter, value AS v, events AS n FROM `+tables.rollups+` WHERE hour >= toDateTime(`+
			strconv.FormatInt(sp.Hours.From, 10)+`) AND hour < toDateTime(`+strconv.FormatInt(sp.Hours.To, 10)+`)`+filter)
	}
	if len(sp.Edges) > 0 {
		var conds []string
		for _, e := range sp.Edges {
			conds = append(conds, `time >= toDateTime(`+strconv.FormatInt(e.From, 10)+`) AND time < toDateTime(`+strconv.FormatInt(e.To, 10)+`)`)
		}
		parts = append(parts, `SELECT tenant, meter, value AS v, toInt64(1) AS n FROM `+tables.events+` WHERE (`+
			strings.Join(conds, " OR ")+`)`+filter)
	}
	if len(parts) == 0 {
		return "", 0
	}
	return `SELECT tenant, meter, ` + sumParts + ` FROM (` + strings.Join(parts, " UNION ALL ") +
		`) GROUP BY tenant, meter HAVING ` + partsNonZero + ` ORDER BY tenant, meter`, len(parts)
}

// hiPart and loPart split the Int64 column col into the parts that sum
// without overflow (internal/saturating.PartBits): intDiv and % truncate,
// as saturating.Join expects.
func hiPart(col string) string {
	return fmt.Sprintf("intDiv(%s, toInt64(%d))", col, saturating.PartDivisor)
}

func loPart(col string) string {
	return fmt.Sprintf("(%s %% toInt64(%d))", col, saturating.PartDivisor)
}

// sumParts selects the rollup.Parts of the sums of the columns v and n:
// sum() of Int64 values wraps silently past int64, which turned a total of
// 2^63 − 1 and 1 into -2^63, a tenant never blocked.
var sumParts = "sum(" + hiPart("v") + ") AS vh, sum(" + loPart("v") + ") AS vl, sum(" + hiPart("n") + ") AS nh, sum(" + loPart("n") + ") AS nl"

// partsNonZero keeps the groups whose sums may not be zero (all parts zero
// means both sums are); the caller drops the rest once joined.
const partsNonZero = "(vh != 0 OR vl != 0 OR nh != 0 OR nl != 0)"

// sumsOf is the rollup.SumsFunc of the store.
func (s *Store) sumsOf(ctx context.Context, from, to time.Time, tenant, meter string) ([]aggregator.Increment, error) {
	var filter string
	var args []any
	if tenant != "" {
		filter += " AND tenant = ?"
		args = append(args, tenant)
	}
	if meter != "" {
		filter += " AND meter = ?"
		args = append(args, meter)
	}
	q, n := sums(s.tables, from, to, filter)
	if n == 0 {
		return nil, nil
	}
	// Each part of the query holds the filter's placeholders.
	rows, err := s.read.Query(ctx, q, slices.Repeat(args, n)...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	return rollup.ScanIncrements(rows, from)
}

// Ping implements aggregator.Store.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.read.Ping(ctx); err != nil {
		return fmt.Errorf("clickhouse: ping: %w", err)
	}
	return nil
}

// Close closes the intent of the last Apply and the connections; it is
// idempotent.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.open != nil && !s.pending {
			// Left open, the intent costs the next start a repair.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if err := s.insertIntents(ctx, intentRow{*s.open, -1}); err != nil {
				s.log.Info("the intent of the last apply stays open; the next start checks its rollups", "apply_id", s.open.id, "err", err)
			}
			cancel()
			s.open = nil
		}
		s.closeErr = s.closeConns()
		if s.index != nil {
			if s.unregister != nil {
				s.unregister()
			}
			s.stopExpiry()
			<-s.expired
			s.closeErr = errors.Join(s.closeErr, s.index.Close())
		}
	})
	return s.closeErr
}
