package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/cmd/meterd/internal/cli"
	"github.com/meterd/meterd/enforcer"
	"github.com/meterd/meterd/internal/broker"
	"github.com/meterd/meterd/internal/redact"
)

// runDev runs every component in one process on an embedded JetStream that
// fsyncs every write, serving every API on one address.
func runDev(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	start := time.Now()
	fs, s, err := newFlags("dev", args, stderr, cli.DevAddr)
	if err != nil {
		return err
	}
	f := s.file
	var dataDir, natsListen string
	fs.StringVar(&dataDir, "data-dir", "./meterd-data", "directory for the embedded JetStream store and the spool")
	fs.StringVar(&natsListen, "nats-listen", "", "also serve the embedded NATS on host:port (default: in-process only)")
	cli.SecretVar(fs, &f.Aggregator.ClickHouse, "clickhouse", f.Aggregator.ClickHouse, "ClickHouse `DSN` for the store (default: the embedded store)", redact.Userinfo)
	streamFlags(fs, &f.NATS)
	collectorFlags(fs, &f.Collector, "")
	enforcerFlags(fs, &f.Enforcer)
	keysFlag(fs, s)
	s.logFormat = "text"
	s.insecure = true // without API keys, dev runs with authentication off, and says so
	a, err := s.start(fs, args, stderr)
	if err != nil {
		return err
	}
	defer a.close()
	if f.Collector.SpoolDir == "" {
		f.Collector.SpoolDir = filepath.Join(dataDir, "spool")
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	emb := broker.EmbeddedConfig{Dir: filepath.Join(dataDir, "nats"), Port: -1}
	if natsListen != "" {
		host, port, err := net.SplitHostPort(natsListen)
		if err != nil {
			return cli.Mistakef("--nats-listen: %w", err)
		}
		emb.Host = host
		if _, err := fmt.Sscan(port, &emb.Port); err != nil {
			return cli.Mistakef("--nats-listen: bad port %q", port)
		}
	} else {
		emb.DontListen = true
	}
	ns, err := broker.StartEmbedded(emb)
	if err != nil {
		return err
	}
	a.onClose(func() error { // after the connection drained
		ns.Shutdown()
		ns.WaitForShutdown()
		return nil
	})
	nc, err := a.connect(f.NATS, nats.InProcessServer(ns))
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := ensureStreams(sctx, nc, f.NATS, 1); err != nil {
		return err
	}
	// The gate knows the tenants of the enforcer's own catalog (file and
	// admin API merged). enf is set below, before anything serves.
	var enf *enforcer.Enforcer
	if err := a.addCollector(nc, f.Collector, func() *catalog.Catalog { return enf.Catalog() }); err != nil {
		return err
	}
	f.Aggregator.SQLitePath = cmp.Or(f.Aggregator.SQLitePath, filepath.Join(dataDir, "meterd.db"))
	f.Aggregator.DedupIndexDir = cmp.Or(f.Aggregator.DedupIndexDir, filepath.Join(dataDir, "dedup-index"))
	store, err := a.openStore(ctx, f.Aggregator, true)
	if err != nil {
		return err
	}
	if err := a.addAggregator(ctx, nc, store, f.Aggregator, f.Collector.Partitions, 0); err != nil {
		return err
	}
	f.NATS.Replicas = 1
	enf, err = a.addEnforcer(ctx, nc, store, 0)
	if err != nil {
		return err
	}
	if err := a.addReports(store, enf.Catalog); err != nil {
		return err
	}
	a.ready = func(addr string) {
		a.log.Info("meterd dev ready", "addr", "http://"+addr, "data_dir", dataDir,
			"nats", cmp.Or(natsListen, "in-process"), "startup", time.Since(start).Round(time.Millisecond))
		fmt.Fprintf(stdout, "meterd dev listening on http://%s\n", addr)
	}
	return a.run(ctx)
}
