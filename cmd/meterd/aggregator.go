package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/clickhouse"
	"github.com/meterd/meterd/aggregator/keyindex"
	"github.com/meterd/meterd/aggregator/report"
	"github.com/meterd/meterd/aggregator/share"
	"github.com/meterd/meterd/aggregator/sqlite"
	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/cmd/meterd/internal/cli"
	"github.com/meterd/meterd/internal/broker"
	"github.com/meterd/meterd/internal/config"
	"github.com/meterd/meterd/internal/lease"
	"github.com/meterd/meterd/internal/redact"
	"github.com/meterd/meterd/schemas"
)

// aggregatorCmdFlags defines the flags of `meterd aggregator` beyond the shared ones.
func aggregatorCmdFlags(fs *flag.FlagSet, s *settings) {
	streamFlags(fs, &s.file.NATS)
	storeFlags(fs, s)
	aggregatorFlags(fs, &s.file.Aggregator)
	s.checks = append(s.checks, func() error { return checkShared(s.file.Aggregator) })
}

// aggregatorComponents adds the components of `meterd aggregator` to a.
func aggregatorComponents(ctx context.Context, a *app, nc *nats.Conn) error {
	f := a.s.file
	if err := ensureStreams(ctx, nc, f.NATS, f.NATS.Replicas); err != nil {
		return err
	}
	// Shared, each partition's aggregator opens a store of its own, and
	// this one only reads.
	store, err := a.openStore(ctx, f.Aggregator, !f.Aggregator.SharePartitions)
	if err != nil {
		return err
	}
	if f.Aggregator.SharePartitions {
		if err := a.addSharedAggregators(ctx, nc, f.Aggregator, f.Collector.Partitions, max(f.NATS.Replicas, 1)); err != nil {
			return err
		}
	} else if err := a.addAggregator(ctx, nc, store, f.Aggregator, f.Collector.Partitions, max(f.NATS.Replicas, 1)); err != nil {
		return err
	}
	// Billing periods of the reports: the config file's catalog with the
	// enforcer's admin API changes merged, as the enforcer decides by.
	watch := a.addCatalogWatcher(nc)
	return a.addReports(store, watch.Catalog)
}

// storeFlags define the store of the aggregator and the enforcer, which
// one of them must name.
func storeFlags(fs *flag.FlagSet, s *settings) {
	c := &s.file.Aggregator
	s.checks = append(s.checks, func() error { return needStore(*c) })
	cli.SecretVar(fs, &c.ClickHouse, "clickhouse", c.ClickHouse, "ClickHouse `DSN` of the store, clickhouse://user:pass@host:9000/meterd", redact.Userinfo)
	fs.StringVar(&c.SQLitePath, "sqlite-path", c.SQLitePath, "file of the embedded store, used when no ClickHouse DSN is set")
	fs.StringVar(&c.ClickHouseCluster, "clickhouse-cluster", c.ClickHouseCluster,
		"ClickHouse cluster `NAME` (remote_servers of the DSN's server): replicated tables created ON CLUSTER, reports through Distributed tables (empty: one server)")
	fs.IntVar(&c.ClickHouseShard, "clickhouse-shard", cmp.Or(c.ClickHouseShard, 1),
		"with --clickhouse-cluster, the shard (shard_num, from 1) whose local tables the aggregator writes, through whichever of its replicas answers (with --share-partitions each partition's store writes its own shard, partition mod shards + 1)")
	fs.IntVar(&c.ClickHouseInsertQuorum, "clickhouse-insert-quorum", c.ClickHouseInsertQuorum,
		"with --clickhouse-cluster, the replicas of the shard that must hold a write before it is acknowledged (0: one; on ClickHouse before 20.10 only with one writer per shard)")
}

// needStore fails when no store is configured.
func needStore(c config.Aggregator) error {
	if c.ClickHouse == "" && c.SQLitePath == "" {
		return cli.Mistake(errors.New("set --clickhouse DSN (or --sqlite-path FILE for the embedded store)"))
	}
	if c.ClickHouseCluster != "" {
		if c.ClickHouse == "" {
			return cli.Mistake(errors.New("--clickhouse-cluster needs --clickhouse DSN"))
		}
		if err := clickhouseConfig(c).Validate(); err != nil {
			return cli.Mistake(err)
		}
	}
	return nil
}

func aggregatorFlags(fs *flag.FlagSet, c *config.Aggregator) {
	fs.StringVar(&c.Durable, "durable", cmp.Or(c.Durable, aggregator.DefaultDurable), "name of the durable JetStream consumer")
	fs.IntVar(&c.FetchBatch, "fetch-batch", cmp.Or(c.FetchBatch, aggregator.DefaultFetchBatch), "batches written per store flush")
	fs.IntVar(&c.CatchUpBatch, "catch-up-batch", c.CatchUpBatch, "batches written per store flush while at least that many wait (default: "+
		strconv.Itoa(aggregator.CatchUpFactor)+" × fetch-batch; fetch-batch or less: off)")
	fs.DurationVar(&c.FetchWait, "fetch-wait", cmp.Or(c.FetchWait, aggregator.DefaultFetchWait), "longest wait to fill a flush")
	fs.DurationVar(&c.AckWait, "ack-wait", cmp.Or(c.AckWait, aggregator.DefaultAckWait), "JetStream redelivery timer")
	fs.DurationVar(&c.LeaseDuration, "lease-duration", cmp.Or(c.LeaseDuration, lease.DefaultDuration),
		"writer lease: a second aggregator of the same durable stands by and replaces one that stopped renewing within this; every store write must end within 4/5 of it (at least 1s)")
	fs.StringVar(&c.DedupIndexDir, "dedup-index-dir", c.DedupIndexDir,
		"directory of the local dedup index on ClickHouse, rebuilt from ClickHouse when lost (empty: look events up in ClickHouse, slower as history grows)")
	fs.DurationVar(&c.DedupHorizon, "dedup-horizon", cmp.Or(c.DedupHorizon, keyindex.DefaultHorizon),
		"how long after its first copy the dedup index drops a copy of an event (events that carry their own time can arrive no later than the late-event bound)")
	fs.Int64Var(&c.DedupIndexCacheBytes, "dedup-index-cache-bytes", cmp.Or(c.DedupIndexCacheBytes, keyindex.DefaultCacheBytes),
		"block cache of the dedup index: it must hold the index's Bloom filters, 1.2 GiB per billion events within the horizon "+
			"(with --share-partitions, of all partitions: each partition's index gets 1/partitions of it)")
	fs.Int64Var(&c.DedupIndexBufferBytes, "dedup-index-buffer-bytes", cmp.Or(c.DedupIndexBufferBytes, keyindex.DefaultBufferBytes),
		"memory of the keys the dedup index added since it last wrote them to disk as a generation: larger generations, fewer to probe and merge "+
			"(with --share-partitions, of all partitions: each partition's index gets 1/partitions of it, at least 4 MiB)")
	fs.BoolVar(&c.SharePartitions, "share-partitions", c.SharePartitions,
		"share the usage partitions with the other aggregators started with this flag (ClickHouse only): each writes the partitions assigned to it, one writer per partition")
	fs.StringVar(&c.Member, "member", c.Member, "name of this aggregator among those sharing the partitions, unique (default: the host name, a StatefulSet's pod name)")
	fs.DurationVar(&c.MemberTTL, "member-ttl", cmp.Or(c.MemberTTL, share.DefaultTTL),
		"with --share-partitions: a member that stops heartbeating loses its partitions after this; failover takes at most this + --lease-duration + 3s")
}

// checkShared refuses --share-partitions on the embedded store: its one
// file has one writing process.
func checkShared(c config.Aggregator) error {
	if c.SharePartitions && c.ClickHouse == "" {
		return cli.Mistake(errors.New("--share-partitions needs ClickHouse (--clickhouse DSN): the embedded store is one file written by one process, so its partitions cannot be shared"))
	}
	return nil
}

// ensureStreams declares METERD_USAGE and METERD_DLQ.
func ensureStreams(ctx context.Context, nc *nats.Conn, n config.NATS, replicas int) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	return broker.EnsureStreams(ctx, js, broker.StreamsConfig{Replicas: replicas, DuplicateWindow: n.DuplicateWindow,
		UsageMaxBytes: n.UsageMaxBytes, DLQMaxBytes: n.DLQMaxBytes})
}

// openStore opens ClickHouse when a DSN is set, else the embedded store. A
// writer (the aggregator) opens ClickHouse with its dedup index.
func (a *app) openStore(ctx context.Context, c config.Aggregator, writer bool) (aggregator.Store, error) {
	var store aggregator.Store
	if c.ClickHouse != "" {
		cfg := clickhouseConfig(c)
		cfg.Logger = a.log
		if writer {
			cfg.IndexDir, cfg.Horizon, cfg.IndexCacheBytes = c.DedupIndexDir, c.DedupHorizon, c.DedupIndexCacheBytes
			cfg.IndexBufferBytes, cfg.Registerer = c.DedupIndexBufferBytes, a.reg
			if c.DedupIndexDir == "" {
				a.log.Warn("no --dedup-index-dir: every write looks its events up in ClickHouse, which slows down as history grows")
			}
		}
		st, err := clickhouse.New(ctx, cfg)
		if err != nil {
			return nil, err
		}
		store = st
	} else {
		if err := os.MkdirAll(filepath.Dir(c.SQLitePath), 0o755); err != nil {
			return nil, fmt.Errorf("store dir: %w", err)
		}
		st, err := sqlite.New(sqlite.Config{Path: c.SQLitePath, Logger: a.log})
		if err != nil {
			return nil, err
		}
		store = st
	}
	a.onClose(store.Close)
	return store, nil
}

// clickhouseConfig is the ClickHouse store of c, without its logger and
// dedup index.
func clickhouseConfig(c config.Aggregator) clickhouse.Config {
	cfg := clickhouse.Config{DSN: c.ClickHouse}
	if c.ClickHouseCluster != "" {
		cfg.Cluster, cfg.Shard, cfg.InsertQuorum = c.ClickHouseCluster, c.ClickHouseShard, c.ClickHouseInsertQuorum
	}
	return cfg
}

// addAggregator adds the consumer writing into store. With leaseReplicas > 0
// it consumes only while it holds the writer lease of its durable (in a
// bucket of that many replicas); 0 runs it without a lease, for meterd dev,
// whose embedded NATS and store make it the only writer by construction.
func (a *app) addAggregator(ctx context.Context, nc *nats.Conn, store aggregator.Store, c config.Aggregator, partitions, leaseReplicas int) error {
	cfg := aggregator.Config{
		NATS: nc, Store: store, Durable: c.Durable, Partitions: partitions,
		FetchBatch: c.FetchBatch, CatchUpBatch: c.CatchUpBatch, FetchWait: c.FetchWait, AckWait: c.AckWait,
		Logger: a.log, Registerer: a.reg,
	}
	if leaseReplicas > 0 {
		js, err := jetstream.New(nc)
		if err != nil {
			return err
		}
		// One lease for all partitions of the durable's consumer
		// (aggregators sharing the partitions take one per partition).
		l, err := lease.New(ctx, lease.Config{JS: js, Replicas: leaseReplicas, Key: allLeaseKey(cmp.Or(c.Durable, aggregator.DefaultDurable)),
			Duration: c.LeaseDuration, Logger: a.log.With("component", "aggregator")})
		if err != nil {
			return err
		}
		// Checked again each time the lease is taken: members that started
		// meanwhile wait for this lease with their keys already written.
		cfg.Lease = besideShared{Holder: l, nc: nc}
	}
	agg, err := aggregator.New(cfg)
	if err != nil {
		return err
	}
	rec, err := aggregator.NewReconciler(aggregator.ReconcilerConfig{Store: agg.Writer(), Logger: a.log, Registerer: a.reg})
	if err != nil {
		return err
	}
	trim, err := aggregator.NewTrimmer(aggregator.TrimmerConfig{NATS: nc, Durables: []string{cfg.Durable}, Logger: a.log, Registerer: a.reg})
	if err != nil {
		return err
	}
	if leaseReplicas > 0 {
		if err := refuseBesideShared(ctx, nc); err != nil {
			return err
		}
	}
	a.checks["aggregator"] = agg.Ready
	a.workers = append(a.workers, agg, rec, trim)
	return nil
}

// allLeaseKey is the writer lease of the aggregator of every partition of
// durable's consumer, which shared members also wait for (an upgrade).
func allLeaseKey(durable string) string { return "aggregator." + durable + ".all" }

// besideShared is the lease of an aggregator of every partition, which it
// gives up, failing, if it finds aggregators sharing the partitions once it
// holds it (refuseBesideShared): a member writes its key before it waits
// for this lease, so whichever of the two comes second sees the other, and
// an aggregator of every partition never writes beside the partitions'
// writers, under another lease.
type besideShared struct {
	lease.Holder
	nc *nats.Conn
}

func (b besideShared) Acquire(ctx context.Context) (uint64, error) {
	token, err := b.Holder.Acquire(ctx)
	if err != nil {
		return 0, err
	}
	if err := refuseBesideShared(ctx, b.nc); err != nil {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if rerr := b.Holder.Release(rctx); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return 0, err
	}
	return token, nil
}

// refuseBesideShared fails if aggregators share the partitions: an
// aggregator of every partition would write beside their writers, under
// another lease.
func refuseBesideShared(ctx context.Context, nc *nats.Conn) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	kv, err := js.KeyValue(ctx, share.DefaultBucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("membership bucket %s: %w", share.DefaultBucket, err)
	}
	members, err := kv.Keys(ctx)
	if errors.Is(err, jetstream.ErrNoKeysFound) || len(members) == 0 {
		return nil
	}
	if err != nil {
		return fmt.Errorf("membership bucket %s: %w", share.DefaultBucket, err)
	}
	return cli.Mistakef("%d aggregators share the partitions (%s): start this one with --share-partitions too, or stop them first", len(members), strings.Join(members, ", "))
}

// addSharedAggregators adds the member that shares the usage partitions
// with the other aggregators (aggregator/share): for each partition assigned
// to it, an aggregator of that partition alone, with its own durable
// consumer (<durable>-p<p>), writer lease (aggregator.<durable>.p<p>),
// ClickHouse store scoped to the partition, dedup index and reconciler.
func (a *app) addSharedAggregators(ctx context.Context, nc *nats.Conn, c config.Aggregator, partitions, replicas int) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	partitions = cmp.Or(partitions, schemas.DefaultPartitions)
	durable := cmp.Or(c.Durable, aggregator.DefaultDurable)
	member := c.Member
	if member == "" {
		host, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("--member: %w", err)
		}
		// A key of the membership bucket: an FQDN's dots become '_'.
		member = strings.Map(func(r rune) rune {
			if r == '-' || r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' {
				return r
			}
			return '_'
		}, host)
	}
	durables := make([]string, partitions)
	for p := range durables {
		durables[p] = durable + "-p" + strconv.Itoa(p)
	}
	// The lease of one aggregator of every partition: a shared member
	// starts once no such aggregator writes (an upgrade from one
	// aggregator), and never holds it for longer than that check.
	all, err := lease.New(ctx, lease.Config{JS: js, Replicas: replicas, Key: allLeaseKey(durable),
		Duration: c.LeaseDuration, Logger: a.log.With("component", "aggregator")})
	if err != nil {
		return err
	}
	// The partitions' stores, built concurrently as partitions are
	// assigned, close at shutdown after the workers stopped.
	var (
		storesMu sync.Mutex
		stores   []*clickhouse.Store
	)
	a.onClose(func() error {
		storesMu.Lock()
		defer storesMu.Unlock()
		var errs []error
		for _, st := range stores {
			errs = append(errs, st.Close())
		}
		return errors.Join(errs...)
	})
	newWorker := func(p int) (share.Worker, error) {
		w, st, err := a.partitionWorker(ctx, nc, js, c, partitions, p, durable, durables[p], replicas)
		if err == nil {
			storesMu.Lock()
			stores = append(stores, st)
			storesMu.Unlock()
		}
		return w, err
	}
	g, err := share.New(ctx, share.Config{JS: js, Replicas: replicas, Member: member, Partitions: partitions, TTL: c.MemberTTL,
		Worker: newWorker, Logger: a.log, Registerer: a.reg})
	if err != nil {
		return cli.Mistake(err)
	}
	trim, err := aggregator.NewTrimmer(aggregator.TrimmerConfig{NATS: nc, Durables: durables, Logger: a.log, Registerer: a.reg})
	if err != nil {
		return err
	}
	a.checks["aggregator"] = g.Ready
	a.workers = append(a.workers, sharedMember{g: g, all: all, log: a.log}, trim)
	return nil
}

// sharedMember waits until no aggregator of every partition holds its
// lease, then runs the member.
type sharedMember struct {
	g   *share.Group
	all *lease.Lease
	log *slog.Logger
}

func (m sharedMember) Run(ctx context.Context) error {
	// The key first: an aggregator of every partition that takes its lease
	// from now on sees this member and steps down (besideShared).
	stop := m.g.Announce(ctx)
	m.log.Info("waiting until no aggregator of every partition writes (its lease is free)")
	_, err := m.all.Acquire(ctx)
	stop()
	if err != nil {
		return nil // ctx ended
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err = m.all.Release(rctx)
	cancel()
	if err != nil {
		return fmt.Errorf("release the lease of the aggregator of every partition: %w", err)
	}
	return m.g.Run(ctx)
}

// partitionWorker builds the aggregator of partition p of partitions and
// returns it with its store, which the caller closes.
func (a *app) partitionWorker(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, c config.Aggregator,
	partitions, p int, durable, pdurable string, replicas int) (share.Worker, *clickhouse.Store, error) {
	log := a.log.With("partition", p)
	reg := prometheus.WrapRegistererWith(prometheus.Labels{"partition": strconv.Itoa(p)}, a.reg)
	l, err := lease.New(ctx, lease.Config{JS: js, Replicas: replicas, Key: "aggregator." + durable + ".p" + strconv.Itoa(p),
		Duration: c.LeaseDuration, Logger: log.With("component", "aggregator")})
	if err != nil {
		return nil, nil, err
	}
	cfg := clickhouseConfig(c)
	// Sharded by usage partition: on a cluster the store of p writes shard
	// ShardOf(p, shards) (Shard 0), whatever --clickhouse-shard says.
	cfg.Shard = 0
	cfg.Logger, cfg.Registerer, cfg.Partitions, cfg.Partition = log, reg, partitions, p
	cfg.Horizon, cfg.IndexCacheBytes = c.DedupHorizon, max(c.DedupIndexCacheBytes/int64(partitions), 8<<20)
	// Each partition's index takes a share of the traffic, and of memory.
	cfg.IndexBufferBytes = max(cmp.Or(c.DedupIndexBufferBytes, keyindex.DefaultBufferBytes)/int64(partitions), 4<<20)
	if c.DedupIndexDir != "" {
		cfg.IndexDir = filepath.Join(c.DedupIndexDir, "p"+strconv.Itoa(p))
	}
	store, err := clickhouse.New(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	agg, err := aggregator.New(aggregator.Config{
		NATS: nc, Store: store, Durable: pdurable, Subject: schemas.UsageSubject(p), StartAfter: durable, Partitions: partitions,
		FetchBatch: c.FetchBatch, CatchUpBatch: c.CatchUpBatch, FetchWait: c.FetchWait, AckWait: c.AckWait,
		Lease: l, Logger: log, Registerer: reg,
	})
	var rec *aggregator.Reconciler
	if err == nil {
		rec, err = aggregator.NewReconciler(aggregator.ReconcilerConfig{Store: agg.Writer(), Logger: log, Registerer: reg})
	}
	if err != nil {
		// Closed, the store frees its index's directory for the next try.
		store.Close()
		return nil, nil, err
	}
	return partitionWorker{agg: agg, rec: rec}, store, nil
}

// partitionWorker consumes and reconciles one partition while its member
// owns it.
type partitionWorker struct {
	agg *aggregator.Aggregator
	rec *aggregator.Reconciler
}

func (w partitionWorker) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Go(func() { w.rec.Run(ctx) })
	err := w.agg.Run(ctx)
	wg.Wait()
	return err
}

func (w partitionWorker) Ready(ctx context.Context) error { return w.agg.Ready(ctx) }

// addReports serves GET /v1/usage from store.
func (a *app) addReports(store aggregator.Store, cat func() *catalog.Catalog) error {
	h, err := report.New(report.Config{Store: store, Keys: a.keys, Catalog: cat, Logger: a.log})
	if err != nil {
		return err
	}
	a.routes = append(a.routes, h.Register)
	return nil
}
