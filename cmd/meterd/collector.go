package main

import (
	"context"
	"flag"

	"github.com/nats-io/nats.go"
)

// collectorCmdFlags defines the flags of `meterd collector` beyond the shared ones.
func collectorCmdFlags(fs *flag.FlagSet, s *settings) {
	refuseStreamFlags(fs, "collector")
	collectorFlags(fs, &s.file.Collector, "./meterd-spool")
}

// collectorComponents adds the components of `meterd collector` to a.
func collectorComponents(_ context.Context, a *app, nc *nats.Conn) error {
	f := a.s.file
	// The tenants with a plan: the config file's catalog with the admin
	// API's changes, followed in the enforcer's meterd-tenants bucket.
	// Denying unknown tenants, the collector is not ready before it read
	// the bucket, so a restart never refuses a tenant the admin API
	// created; allowing them, it has nothing to wait for.
	watch := a.addCatalogWatcher(nc)
	if f.Collector.UnknownTenantPolicy == "deny" {
		a.checks["catalog"] = watch.Ready
	}
	if err := a.addCollector(nc, f.Collector, watch.Catalog); err != nil {
		return err
	}
	// Nothing else here needs NATS: the collector's own check says whether
	// it spools while NATS is away (ready, degraded) or cannot take events.
	delete(a.checks, "nats")
	return nil
}
