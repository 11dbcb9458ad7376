package main

import (
	"cmp"
	"context"
	"flag"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/cmd/meterd/internal/cli"
	"github.com/meterd/meterd/enforcer"
	"github.com/meterd/meterd/internal/config"
	"github.com/meterd/meterd/internal/lease"
)

// enforcerCmdFlags defines the flags of `meterd enforcer` beyond the shared ones.
func enforcerCmdFlags(fs *flag.FlagSet, s *settings) {
	refuseStreamFlags(fs, "enforcer")
	storeFlags(fs, s)
	enforcerFlags(fs, &s.file.Enforcer)
}

// enforcerComponents adds the components of `meterd enforcer` to a.
func enforcerComponents(ctx context.Context, a *app, nc *nats.Conn) error {
	store, err := a.openStore(ctx, a.s.file.Aggregator, false)
	if err != nil {
		return err
	}
	_, err = a.addEnforcer(ctx, nc, store, max(a.s.file.NATS.Replicas, 1))
	return err
}

func enforcerFlags(fs *flag.FlagSet, c *config.Enforcer) {
	cli.SecretVar(fs, &c.WebhookSecret, "webhook-secret", c.WebhookSecret, "Stripe signing `secret` (whsec_…) of POST /v1/billing/webhook; empty disables it", masked)
	fs.DurationVar(&c.WebhookTolerance, "webhook-tolerance", cmp.Or(c.WebhookTolerance, enforcer.DefaultWebhookTolerance), "oldest accepted webhook signature")
	fs.StringVar(&c.BlockOn, "block-on", cmp.Or(c.BlockOn, strings.Join(enforcer.DefaultBlockOn, ",")), "billing statuses that block a tenant, comma separated")
	cli.SecretVar(fs, &c.NotifyURLs, "notify-urls", c.NotifyURLs, "`URLs` that receive signed notifications, comma separated", origins)
	cli.SecretVar(fs, &c.NotifySecret, "notify-secret", c.NotifySecret, "`secret` signing the notifications (Meterd-Signature)", masked)
	fs.DurationVar(&c.HeartbeatEvery, "heartbeat-every", cmp.Or(c.HeartbeatEvery, enforcer.DefaultHeartbeatEvery), "period of the blocklist heartbeat")
	fs.DurationVar(&c.ReconcileEvery, "reconcile-every", cmp.Or(c.ReconcileEvery, enforcer.DefaultReconcileEvery), "period of recomputing usage from the store")
	fs.DurationVar(&c.LeaseDuration, "lease-duration", cmp.Or(c.LeaseDuration, enforcer.DefaultLeaseDuration),
		"enforcer lease: a second enforcer stands by and replaces an active one that stopped renewing within this (at least 1s; the gates' --stale-after should exceed it by a heartbeat period)")
}

func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

// addEnforcer adds the enforcer, reloading the catalog from the config file
// on change and on SIGHUP. With leaseReplicas > 0 it is active only while it
// holds the enforcer lease (in a bucket of that many replicas), so replicas
// can run side by side; 0 runs it without a lease, for meterd dev, whose
// embedded NATS makes it the only enforcer by construction.
func (a *app) addEnforcer(ctx context.Context, nc *nats.Conn, store aggregator.Store, leaseReplicas int) (*enforcer.Enforcer, error) {
	s := a.s
	e := s.file.Enforcer
	var l enforcer.Lease
	if leaseReplicas > 0 {
		js, err := jetstream.New(nc)
		if err != nil {
			return nil, err
		}
		ll, err := lease.New(ctx, lease.Config{JS: js, Replicas: leaseReplicas, Key: enforcer.LeaseKey,
			Duration: e.LeaseDuration, Logger: a.log.With("component", "enforcer")})
		if err != nil {
			return nil, err
		}
		l = ll
	}
	enf, err := enforcer.New(enforcer.Config{
		Lease: l,
		NATS:  nc, Store: store, Catalog: s.file.Catalog, CatalogPath: s.configPath, Keys: a.keys,
		WebhookSecret: e.WebhookSecret, WebhookTolerance: e.WebhookTolerance, BlockOn: splitList(e.BlockOn),
		NotifyURLs: splitList(e.NotifyURLs), NotifySecret: e.NotifySecret,
		HeartbeatEvery: e.HeartbeatEvery, ReconcileEvery: e.ReconcileEvery,
		Replicas: s.file.NATS.Replicas, Logger: a.log, Registerer: a.reg,
	})
	if err != nil {
		return nil, err
	}
	a.onClose(enf.Close)
	a.checks["enforcer"] = enf.Ready
	a.routes = append(a.routes, enf.Register)
	a.workers = append(a.workers, enf, sighupReloader{enf})
	return enf, nil
}

// sighupReloader reloads a catalog from the config file on every SIGHUP:
// the enforcer's, or a catalog.Watcher's.
type sighupReloader struct{ cat interface{ Reload() error } }

func (r sighupReloader) Run(ctx context.Context) error {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGHUP)
	defer signal.Stop(ch)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ch:
			r.cat.Reload() // the outcome is logged by the catalog
		}
	}
}
