package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/cmd/meterd/internal/cli"
	"github.com/meterd/meterd/collector"
	"github.com/meterd/meterd/gate"
	"github.com/meterd/meterd/gate/gateprom"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/broker"
	"github.com/meterd/meterd/internal/config"
	"github.com/meterd/meterd/internal/redact"
	"github.com/meterd/meterd/internal/serve"
	"github.com/meterd/meterd/schemas"
)

// settings are the flags every subcommand shares; file values are their
// defaults, METERD_* variables override the file, flags override both.
type settings struct {
	cmd        string // the subcommand
	file       *config.File
	configPath string
	listen     string
	logFormat  string
	logLevel   string
	// insecure turns authentication off when no API key is configured
	// (--insecure; always for dev).
	insecure bool
	grace    time.Duration
	timeouts serve.Timeouts
	// checks run once the flags are parsed, before anything starts.
	checks []func() error
	// apiKeysFile holds more API keys, apart from the config file (a
	// Kubernetes Secret beside a ConfigMap of plans).
	apiKeysFile string
}

// newFlags reads the --config file named in args and defines the shared
// flags on a new FlagSet for cmd.
func newFlags(cmd string, args []string, stderr io.Writer, listen string) (*flag.FlagSet, *settings, error) {
	empty, _ := catalog.NewCatalog(nil, nil)
	s := &settings{cmd: cmd, file: &config.File{Catalog: empty}, configPath: config.ConfigPath(args)}
	if s.configPath != "" {
		f, err := config.Load(s.configPath)
		if err != nil {
			return nil, nil, cli.Mistake(err)
		}
		s.file = f
	}
	fs := flag.NewFlagSet("meterd "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&s.configPath, "config", s.configPath, "YAML file with plans, tenants, API keys and component settings")
	fs.StringVar(&s.listen, "listen", listen, "HTTP address to serve on (host:port)")
	fs.StringVar(&s.logFormat, "log-format", "json", "log format: json or text")
	fs.StringVar(&s.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fs.DurationVar(&s.grace, "shutdown-grace", 30*time.Second, "how long to wait for in-flight requests on shutdown")
	fs.DurationVar(&s.timeouts.ReadHeader, "read-header-timeout", serve.DefaultReadHeaderTimeout, "longest time a client may take to send a request's headers")
	fs.DurationVar(&s.timeouts.Read, "read-timeout", serve.DefaultReadTimeout, "longest time a client may take to send a whole request, headers and body (a 5 MiB body at ~90 KB/s takes 1m)")
	fs.DurationVar(&s.timeouts.Idle, "idle-timeout", serve.DefaultIdleTimeout, "how long a keep-alive connection may wait for its next request")
	return fs, s, nil
}

// masked shows a secret as the mask.
func masked(string) string { return redact.Mask }

// origins shows a comma-separated list of URLs by their origins.
func origins(list string) string {
	var out []string
	for _, u := range splitList(list) {
		out = append(out, redact.Origin(u)+"/…")
	}
	return strings.Join(out, ",")
}

// defaultReplicas is the replication of the streams and KV buckets
// meterd creates: a production billing stream needs R3
// (docs/architecture.md#exactly-once). The components' own default, for
// tests and dev, is 1.
const defaultReplicas = 3

func natsFlags(fs *flag.FlagSet, n *config.NATS) {
	cli.NATSConnFlags(fs, n)
	fs.IntVar(&n.Replicas, "nats-replicas", cmp.Or(n.Replicas, defaultReplicas), "replicas of the streams meterd creates")
}

// streamFlags define the settings of the streams on the subcommands that
// create METERD_USAGE and METERD_DLQ (aggregator, dev), where they take effect.
func streamFlags(fs *flag.FlagSet, n *config.NATS) {
	fs.DurationVar(&n.DuplicateWindow, "duplicate-window", cmp.Or(n.DuplicateWindow, broker.DefaultDuplicateWindow), "how long JetStream remembers a batch_id (a setting of the METERD_USAGE stream this command creates)")
	fs.Int64Var(&n.UsageMaxBytes, "usage-max-bytes", cmp.Or(n.UsageMaxBytes, broker.DefaultUsageMaxBytes),
		"bound of METERD_USAGE (no age limit): when full, publishes fail and collectors spool, then answer 429")
	fs.Int64Var(&n.DLQMaxBytes, "dlq-max-bytes", cmp.Or(n.DLQMaxBytes, broker.DefaultDLQMaxBytes),
		"bound of METERD_DLQ: when full, a batch that cannot be processed stays in METERD_USAGE")
}

// refuseStreamFlags defines the stream settings on a subcommand that does
// not create the streams (collector, enforcer), where they could take no
// effect: setting one (or its METERD_ variable) is a usage error naming
// where it belongs, instead of being silently ignored. The config file's
// nats section, shared by every component, stays the aggregator's.
func refuseStreamFlags(fs *flag.FlagSet, cmd string) {
	for _, name := range []string{"duplicate-window", "usage-max-bytes", "dlq-max-bytes"} {
		fs.Func(name, "not a setting of the "+cmd+": set it on the aggregator, which creates the streams", func(string) error {
			return fmt.Errorf("--%s is a setting of the streams, which `meterd aggregator` creates; "+
				"`meterd %s` does not create them, so set it on the aggregator (or change the stream with `nats stream edit`)", name, cmd)
		})
	}
}

func collectorFlags(fs *flag.FlagSet, c *config.Collector, spoolDir string) {
	fs.StringVar(&c.Name, "collector-name", c.Name, "name of this collector in batches (default: host name)")
	fs.StringVar(&c.SpoolDir, "spool-dir", cmp.Or(c.SpoolDir, spoolDir), "directory of the on-disk spool used while NATS is away")
	fs.Int64Var(&c.SpoolMaxBytes, "spool-max-bytes", cmp.Or(c.SpoolMaxBytes, collector.DefaultSpoolMaxBytes), "bound of the spool; past it requests get 429")
	fs.IntVar(&c.Partitions, "partitions", cmp.Or(c.Partitions, schemas.DefaultPartitions), "usage partitions P of meterd.usage.<partition>")
	fs.Int64Var(&c.MaxBodyBytes, "max-body-bytes", cmp.Or(c.MaxBodyBytes, collector.DefaultMaxBodyBytes), "largest accepted request body")
	fs.Int64Var(&c.MaxInflightBodyBytes, "max-inflight-body-bytes", c.MaxInflightBodyBytes, fmt.Sprintf("bound of the body bytes of all requests in flight; past it requests get 503 + Retry-After (default: a sixteenth of GOMEMLIMIT, or %d MiB without one)", collector.DefaultMaxInflightBodyBytes>>20))
	fs.IntVar(&c.BatchMaxEvents, "batch-max-events", cmp.Or(c.BatchMaxEvents, collector.DefaultBatchMaxEvents), "seal a batch at this many events")
	fs.DurationVar(&c.BatchMaxWait, "batch-max-wait", cmp.Or(c.BatchMaxWait, collector.DefaultBatchMaxWait), "seal a batch this long after its first event")
	fs.IntVar(&c.PublishWorkers, "publish-workers", cmp.Or(c.PublishWorkers, collector.DefaultPublishWorkers), "batches published concurrently")
	fs.DurationVar(&c.MaxEventAge, "max-event-age", cmp.Or(c.MaxEventAge, schemas.DefaultMaxAge), "late-event bound: older events are rejected")
	fs.StringVar(&c.TenantHeader, "tenant-header", cmp.Or(c.TenantHeader, collector.DefaultTenantHeader), "header naming the tenant of a /v1/check call when no tenant API key does")
	fs.StringVar(&c.UnknownTenantPolicy, "unknown-tenant-policy", cmp.Or(c.UnknownTenantPolicy, gate.Allow.String()), "/v1/check for tenants without a plan: allow or deny")
	fs.DurationVar(&c.StaleAfter, "stale-after", cmp.Or(c.StaleAfter, gate.DefaultStaleAfter), "the blocklist is stale after this long without an update or heartbeat")
	fs.StringVar(&c.StalePolicy, "stale-policy", cmp.Or(c.StalePolicy, gate.Allow.String()), "/v1/check for tenants without a decision while the blocklist is stale: allow or deny (503)")
	fs.BoolVar(&c.DontRecordChecks, "dont-record-checks", c.DontRecordChecks, "do not record allowed /v1/check calls as usage events")
	fs.StringVar(&c.GRPCListen, "grpc-listen", c.GRPCListen, "address (host:port) of Envoy's gRPC ext_authz (envoy.service.auth.v3.Authorization), answered as /v1/check; empty serves none")
}

// policy parses an allow|deny flag.
func policy(name, v string) (gate.Policy, error) {
	switch v {
	case "allow":
		return gate.Allow, nil
	case "deny":
		return gate.Deny, nil
	}
	return 0, cli.Mistakef("--%s must be allow or deny, not %q", name, v)
}

// logger builds the logger of --log-format and --log-level. Whatever a
// component logs, the secrets of the configuration and the credentials of
// any URL are masked.
func (s *settings) logger(stderr io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(s.logLevel)); err != nil {
		return nil, cli.Mistakef("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch s.logFormat {
	case "json":
		h = slog.NewJSONHandler(stderr, opts)
	case "text":
		h = slog.NewTextHandler(stderr, opts)
	default:
		return nil, cli.Mistakef("--log-format must be json or text, not %q", s.logFormat)
	}
	return slog.New(redact.New(s.secrets()...).Handler(h)), nil
}

// secrets are the values of the configuration that must never be logged.
func (s *settings) secrets() []string {
	f := s.file
	out := []string{f.Enforcer.WebhookSecret, f.Enforcer.NotifySecret, redact.Password(f.Aggregator.ClickHouse)}
	for _, k := range f.APIKeys {
		out = append(out, k.Key)
	}
	for _, u := range splitList(f.NATS.URL) {
		out = append(out, redact.Password(u))
	}
	for _, u := range splitList(f.Enforcer.NotifyURLs) {
		out = append(out, u, redact.Password(u))
	}
	return out
}

// keysFlag defines --api-keys-file on the subcommands that authenticate.
func keysFlag(fs *flag.FlagSet, s *settings) {
	fs.StringVar(&s.apiKeysFile, "api-keys-file", "", "YAML file with more api_keys (same format as in --config), e.g. a mounted Secret")
}

// keys builds the API keys. Without keys, auth is off only when
// s.insecure says so.
func (s *settings) keys(log *slog.Logger) (*auth.Keys, error) {
	all := s.file.APIKeys
	if s.apiKeysFile != "" {
		more, err := config.LoadAPIKeys(s.apiKeysFile)
		if err != nil {
			return nil, cli.Mistake(err)
		}
		all = append(slices.Clip(all), more...)
	}
	k, err := auth.NewKeys(all)
	if err != nil {
		return nil, cli.Mistake(err)
	}
	if !k.Empty() {
		return k, nil
	}
	if s.insecure {
		log.Warn("no API keys configured: authentication is OFF, every request acts as admin")
		return auth.Open(), nil
	}
	return nil, cli.Mistake(errors.New("no api_keys in the config file; add keys or pass --insecure to run without authentication"))
}

// start is the start-up every serving subcommand shares: it parses args
// into fs, runs the checks, and builds the logger, the API keys and the app
// the subcommand adds its components to. The caller must close the app;
// run closes it when it returns.
func (s *settings) start(fs *flag.FlagSet, args []string, stderr io.Writer) (*app, error) {
	if err := cli.Parse(fs, args); err != nil {
		return nil, err
	}
	for _, check := range s.checks {
		if err := check(); err != nil {
			return nil, err
		}
	}
	log, err := s.logger(stderr)
	if err != nil {
		return nil, err
	}
	keys, err := s.keys(log)
	if err != nil {
		return nil, err
	}
	return &app{s: s, log: log, keys: keys, reg: serve.NewRegistry(), checks: map[string]serve.ReadyFunc{}}, nil
}

// component is a serving subcommand that runs one part of meterd against
// an external NATS.
type component struct {
	listen string // default of --listen
	open   string // what --insecure leaves open, for its help
	// flags defines the subcommand's own flags on fs.
	flags func(fs *flag.FlagSet, s *settings)
	// add adds the subcommand's components to a, on the connection nc.
	add func(ctx context.Context, a *app, nc *nats.Conn) error
}

// components are the subcommands that run one part of meterd each.
var components = map[string]component{
	"collector":  {listen: ":8080", open: "every request acts as admin", flags: collectorCmdFlags, add: collectorComponents},
	"aggregator": {listen: ":8081", open: "usage reports are open", flags: aggregatorCmdFlags, add: aggregatorComponents},
	"enforcer":   {listen: ":8082", open: "the admin API is open", flags: enforcerCmdFlags, add: enforcerComponents},
}

// runComponent is the start-up the subcommands of components share: the
// shared flags and c's own, the logger and keys, the NATS connection, c's
// components, then the app until ctx ends.
func runComponent(ctx context.Context, cmd string, args []string, stderr io.Writer) error {
	c := components[cmd]
	fs, s, err := newFlags(cmd, args, stderr, c.listen)
	if err != nil {
		return err
	}
	natsFlags(fs, &s.file.NATS)
	c.flags(fs, s)
	keysFlag(fs, s)
	fs.BoolVar(&s.insecure, "insecure", false, "run without API keys ("+c.open+")")
	a, err := s.start(fs, args, stderr)
	if err != nil {
		return err
	}
	defer a.close()
	nc, err := a.connect(s.file.NATS)
	if err != nil {
		return err
	}
	if err := c.add(ctx, a, nc); err != nil {
		return err
	}
	return a.run(ctx)
}

// worker is a long-running component.
type worker interface {
	Run(ctx context.Context) error
}

// app composes the components of one process around one HTTP server.
type app struct {
	s    *settings
	log  *slog.Logger
	keys *auth.Keys
	// nc is the NATS connection, once connect made it.
	nc *nats.Conn
	// ready is called once the server listens on addr; nil logs
	// "<subcommand> listening".
	ready   func(addr string)
	reg     *prometheus.Registry
	checks  map[string]serve.ReadyFunc
	routes  []func(*http.ServeMux)
	workers []worker
	closers []func() error
	// servers serve besides the HTTP server (the collector's gRPC
	// ext_authz) until their context ends, then stop within the grace.
	servers []func(ctx context.Context, grace time.Duration) error
}

// onClose registers fn to run at shutdown; closers run in reverse order.
func (a *app) onClose(fn func() error) { a.closers = append(a.closers, fn) }

func (a *app) close() {
	for i := len(a.closers) - 1; i >= 0; i-- {
		if err := a.closers[i](); err != nil {
			a.log.Warn("close", "err", err)
		}
	}
	a.closers = nil
}

// connect dials NATS with the settings of n and closes the connection at
// shutdown, after the workers stopped.
func (a *app) connect(n config.NATS, opts ...nats.Option) (*nats.Conn, error) {
	nc, err := broker.Connect(broker.ConnConfig{
		URL: n.URL, Creds: n.Creds, TLSCA: n.TLSCA, TLSCert: n.TLSCert, TLSKey: n.TLSKey,
		Name: "meterd", Logger: a.log, Options: opts,
	})
	if err != nil {
		return nil, err
	}
	a.onClose(func() error { return nc.Drain() })
	a.checks["nats"] = func(context.Context) error {
		if nc.IsConnected() {
			return nil
		}
		return errors.New("nats: " + strings.ToLower(nc.Status().String()))
	}
	a.nc = nc
	return nc, nil
}

// addCatalogWatcher adds the catalog every component reads: the config
// file's, with the admin API's changes (the enforcer's meterd-tenants
// bucket) merged, both followed live: the file is read again when it
// changes and on SIGHUP, as the enforcer reads it.
func (a *app) addCatalogWatcher(nc *nats.Conn) *catalog.Watcher {
	watch := catalog.NewWatcher(nc, a.s.file.Catalog, a.log)
	watch.Path = a.s.configPath
	a.workers = append(a.workers, watch)
	if watch.Path != "" {
		a.workers = append(a.workers, sighupReloader{watch})
	}
	return watch
}

// addCollector builds the collector, with the gate its /v1/check answers
// from, on nc and adds both to the app. The tenants of the current catalog
// have a plan: it must be the merged one (file and admin API, followed
// live), or a tenant the admin API created is unknown at the gate.
func (a *app) addCollector(nc *nats.Conn, c config.Collector, cat func() *catalog.Catalog) error {
	unknown, err := policy("unknown-tenant-policy", c.UnknownTenantPolicy)
	if err != nil {
		return err
	}
	stale, err := policy("stale-policy", c.StalePolicy)
	if err != nil {
		return err
	}
	obs, err := gateprom.New(a.reg)
	if err != nil {
		return err
	}
	g, err := gate.New(gate.Config{NATS: nc, StaleAfter: c.StaleAfter, StalePolicy: stale, Logger: a.log, Observer: obs})
	if err != nil {
		return err
	}
	a.checks["gate"] = g.Ready
	a.workers = append(a.workers, g)
	col, err := collector.New(collector.Config{
		Gate: g, TenantHeader: c.TenantHeader, UnknownTenantPolicy: unknown, DontRecordChecks: c.DontRecordChecks,
		KnownTenant: func(tenant string) bool { return cat().HasPlan(tenant) },
		Name:        c.Name, NATS: nc, Keys: a.keys,
		SpoolDir: c.SpoolDir, SpoolMaxBytes: c.SpoolMaxBytes,
		Partitions: c.Partitions, MaxBodyBytes: c.MaxBodyBytes, MaxInflightBodyBytes: c.MaxInflightBodyBytes,
		BatchMaxEvents: c.BatchMaxEvents, BatchMaxWait: c.BatchMaxWait,
		PublishWorkers: c.PublishWorkers, MaxEventAge: c.MaxEventAge,
		Logger: a.log, Registerer: a.reg,
	})
	if err != nil {
		return err
	}
	a.onClose(col.Close)
	a.checks["collector"] = col.Ready
	a.routes = append(a.routes, col.Register)
	a.workers = append(a.workers, col)
	if c.GRPCListen != "" {
		ln, err := net.Listen("tcp", c.GRPCListen)
		if err != nil {
			return fmt.Errorf("grpc-listen %s: %w", c.GRPCListen, err)
		}
		a.log.Info("serving Envoy gRPC ext_authz (envoy.service.auth.v3.Authorization)", "addr", ln.Addr().String())
		a.onClose(func() error { ln.Close(); return nil }) // if run never starts; ServeGRPC closes it too
		a.servers = append(a.servers, func(ctx context.Context, grace time.Duration) error {
			return col.ServeGRPC(ctx, ln, grace)
		})
	}
	return nil
}

// run runs the workers and the HTTP server on --listen until ctx ends; then it
// stops the server first (no new requests, in-flight ones finish), the
// workers next (they flush), and closes everything in reverse order.
func (a *app) run(ctx context.Context) error {
	defer a.close()
	s := a.s
	ln, err := net.Listen("tcp", s.listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", s.listen, err)
	}
	mux := serve.NewMux(a.reg, a.checks)
	for _, r := range a.routes {
		r(mux)
	}
	wctx, stopWorkers := context.WithCancel(context.Background())
	defer stopWorkers()
	var wg sync.WaitGroup
	errc := make(chan error, len(a.workers)+len(a.servers)+1)
	for _, w := range a.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := w.Run(wctx); err != nil {
				errc <- err
			}
		}()
	}
	sctx, stopServer := context.WithCancel(ctx)
	defer stopServer()
	go func() { // a failing worker stops the process
		select {
		case err := <-errc:
			a.log.Error("component failed; shutting down", "err", err)
			errc <- err
			stopServer()
		case <-sctx.Done():
		}
	}()
	// The other servers stop with the HTTP server, before the workers: an
	// allowed gRPC check is recorded into the collector's pipeline, which
	// the workers flush.
	var servers sync.WaitGroup
	for _, srv := range a.servers {
		servers.Add(1)
		go func() {
			defer servers.Done()
			if err := srv(sctx, s.grace); err != nil {
				errc <- err
			}
		}()
	}
	if a.ready != nil {
		a.ready(ln.Addr().String())
	} else {
		a.log.Info(s.cmd+" listening", "addr", ln.Addr().String(), "nats", a.nc.ConnectedUrlRedacted())
	}
	err = serve.Server(sctx, ln, serve.NotFound(mux), s.timeouts, s.grace, a.log)
	stopServer() // the HTTP server may have stopped by itself
	servers.Wait()
	a.log.Info("shutting down: HTTP stopped, flushing")
	stopWorkers()
	wg.Wait()
	select {
	case werr := <-errc:
		err = errors.Join(err, werr)
	default:
	}
	return err
}
