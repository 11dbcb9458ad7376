package main

import (
	"context"
	"io"

	"github.com/meterd/meterd/catalog"
)

// runCollector runs the collector against an external NATS.
func runCollector(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, s, err := newFlags("collector", args, stderr, ":8080")
	if err != nil {
		return err
	}
	f := s.file
	natsFlags(fs, &f.NATS)
	refuseStreamFlags(fs, "collector")
	collectorFlags(fs, &f.Collector, "./meterd-spool")
	keysFlag(fs, s)
	fs.BoolVar(&s.insecure, "insecure", false, "run without API keys (every request acts as admin)")
	a, err := s.start(fs, args, stderr)
	if err != nil {
		return err
	}
	defer a.close()
	nc, err := a.connect(f.NATS)
	if err != nil {
		return err
	}
	// The tenants with a plan: the config file's catalog with the admin
	// API's changes, followed in the enforcer's meterd-tenants bucket.
	// Denying unknown tenants, the collector is not ready before it read
	// the bucket, so a restart never refuses a tenant the admin API
	// created; allowing them, it has nothing to wait for.
	watch := catalog.NewWatcher(nc, f.Catalog, a.log)
	a.workers = append(a.workers, watch)
	if f.Collector.UnknownTenantPolicy == "deny" {
		a.checks["catalog"] = watch.Ready
	}
	if err := a.addCollector(nc, f.Collector, watch.Catalog); err != nil {
		return err
	}
	// Nothing else here needs NATS: the collector's own check says whether
	// it spools while NATS is away (ready, degraded) or cannot take events.
	delete(a.checks, "nats")
	return a.run(ctx)
}
