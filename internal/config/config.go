// Package config reads meterd's configuration: a YAML file (--config) for
// plans, tenants, API keys and component settings, overridden by METERD_*
// environment variables, overridden by command-line flags.
package config

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/auth"
)

// File is the YAML configuration file. Unknown keys are errors, so a typo
// never silently falls back to a default.
type File struct {
	APIKeys    []auth.Key `yaml:"api_keys"`
	NATS       NATS       `yaml:"nats"`
	Collector  Collector  `yaml:"collector"`
	Aggregator Aggregator `yaml:"aggregator"`
	Enforcer   Enforcer   `yaml:"enforcer"`
	// Plans and Tenants (docs/architecture.md#plans-and-billing-periods) are parsed into Catalog by Load: the
	// enforcer decides quotas from it, the aggregator reports billing periods.
	Plans   yaml.Node        `yaml:"plans"`
	Tenants yaml.Node        `yaml:"tenants"`
	Catalog *catalog.Catalog `yaml:"-"`
}

// NATS says how components reach JetStream.
type NATS struct {
	URL             string        `yaml:"url"`
	Creds           string        `yaml:"creds"`
	TLSCA           string        `yaml:"tls_ca"`
	TLSCert         string        `yaml:"tls_cert"`
	TLSKey          string        `yaml:"tls_key"`
	Replicas        int           `yaml:"replicas"`
	DuplicateWindow time.Duration `yaml:"duplicate_window"`
	UsageMaxBytes   int64         `yaml:"usage_max_bytes"`
	DLQMaxBytes     int64         `yaml:"dlq_max_bytes"`
}

// Collector holds the collector's settings.
type Collector struct {
	Name          string `yaml:"name"`
	SpoolDir      string `yaml:"spool_dir"`
	SpoolMaxBytes int64  `yaml:"spool_max_bytes"`
	Partitions    int    `yaml:"partitions"`
	MaxBodyBytes  int64  `yaml:"max_body_bytes"`
	// MaxInflightBodyBytes bounds the body bytes of all requests in flight.
	MaxInflightBodyBytes int64         `yaml:"max_inflight_body_bytes"`
	BatchMaxEvents       int           `yaml:"batch_max_events"`
	BatchMaxWait         time.Duration `yaml:"batch_max_wait"`
	PublishWorkers       int           `yaml:"publish_workers"`
	MaxEventAge          time.Duration `yaml:"max_event_age"`
	// The forward-auth check (/v1/check).
	TenantHeader        string        `yaml:"tenant_header"`
	UnknownTenantPolicy string        `yaml:"unknown_tenant_policy"` // allow | deny
	StaleAfter          time.Duration `yaml:"stale_after"`
	StalePolicy         string        `yaml:"stale_policy"` // allow | deny
	DontRecordChecks    bool          `yaml:"dont_record_checks"`
	// GRPCListen is the address of Envoy's gRPC ext_authz
	// (envoy.service.auth.v3.Authorization), answered as /v1/check; empty
	// serves none.
	GRPCListen string `yaml:"grpc_listen"`
}

// Aggregator holds the aggregator's settings. ClickHouse, when set, is the
// store; otherwise the embedded store at SQLitePath.
type Aggregator struct {
	ClickHouse   string        `yaml:"clickhouse"`
	SQLitePath   string        `yaml:"sqlite_path"`
	Durable      string        `yaml:"durable"`
	FetchBatch   int           `yaml:"fetch_batch"`
	CatchUpBatch int           `yaml:"catch_up_batch"`
	FetchWait    time.Duration `yaml:"fetch_wait"`
	AckWait      time.Duration `yaml:"ack_wait"`
	// LeaseDuration is the writer lease's duration: the longest a standby
	// aggregator waits before replacing a holder that stopped renewing.
	LeaseDuration time.Duration `yaml:"lease_duration"`
	// DedupIndexDir is the directory of the aggregator's local dedup index
	// on ClickHouse (aggregator/keyindex); empty looks events up in
	// ClickHouse, at a cost that grows with history.
	DedupIndexDir string `yaml:"dedup_index_dir"`
	// DedupHorizon is how long after its first copy an event is
	// deduplicated by the index.
	DedupHorizon time.Duration `yaml:"dedup_horizon"`
	// DedupIndexCacheBytes is the index's block cache.
	DedupIndexCacheBytes int64 `yaml:"dedup_index_cache_bytes"`
	// DedupIndexBufferBytes bounds the memory of the index's recent keys.
	DedupIndexBufferBytes int64 `yaml:"dedup_index_buffer_bytes"`
	// SharePartitions makes aggregators started with identical settings
	// share the usage partitions (aggregator/share), each written by one
	// of them at a time.
	SharePartitions bool `yaml:"share_partitions"`
	// Member names this aggregator among those sharing the partitions
	// (default: the host name); MemberTTL is how long a member that stopped
	// heartbeating keeps its partitions.
	Member    string        `yaml:"member"`
	MemberTTL time.Duration `yaml:"member_ttl"`
	// ClickHouseCluster, if set, runs the ClickHouse store on the cluster
	// of that name (aggregator/clickhouse, "On a cluster"); the aggregator
	// writes the local tables of ClickHouseShard, with an insert quorum of
	// ClickHouseInsertQuorum replicas (0: ClickHouse's default, one).
	ClickHouseCluster      string `yaml:"clickhouse_cluster"`
	ClickHouseShard        int    `yaml:"clickhouse_shard"`
	ClickHouseInsertQuorum int    `yaml:"clickhouse_insert_quorum"`
}

// Enforcer holds the enforcer's settings; its store is the aggregator's.
type Enforcer struct {
	WebhookSecret    string        `yaml:"webhook_secret"`
	WebhookTolerance time.Duration `yaml:"webhook_tolerance"`
	BlockOn          string        `yaml:"block_on"` // comma-separated billing statuses
	NotifyURLs       string        `yaml:"notify_urls"`
	NotifySecret     string        `yaml:"notify_secret"`
	HeartbeatEvery   time.Duration `yaml:"heartbeat_every"`
	ReconcileEvery   time.Duration `yaml:"reconcile_every"`
	// LeaseDuration is the enforcer lease's duration: the longest a
	// standby enforcer waits before replacing an active one that stopped
	// renewing.
	LeaseDuration time.Duration `yaml:"lease_duration"`
}

// Load reads and strictly decodes the YAML file at path.
func Load(path string) (*File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) { // io.EOF: empty file
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if _, err := auth.NewKeys(f.APIKeys); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if f.Catalog, err = catalog.ParseCatalog(&f.Plans, &f.Tenants); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return &f, nil
}

// LoadAPIKeys reads a file that holds only api_keys, in the format of the
// config file, so the keys can live apart from the plans (in a Kubernetes
// Secret, while the plans stay in a ConfigMap).
func LoadAPIKeys(path string) ([]auth.Key, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("api keys: %w", err)
	}
	var f struct {
		APIKeys []auth.Key `yaml:"api_keys"`
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("api keys %s: %w", path, err)
	}
	if _, err := auth.NewKeys(f.APIKeys); err != nil {
		return nil, fmt.Errorf("api keys %s: %w", path, err)
	}
	return f.APIKeys, nil
}

// ConfigPath finds --config FILE (or --config=FILE) in args, else
// METERD_CONFIG; the file is read before the other flags are defined so its
// values become their defaults.
func ConfigPath(args []string) string {
	for i, a := range args {
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "config" {
			continue
		}
		if hasVal {
			return val
		}
		if i+1 < len(args) {
			return args[i+1]
		}
	}
	return os.Getenv("METERD_CONFIG")
}

// EnvName is the environment variable of flag name: METERD_ + NAME with
// dashes as underscores.
func EnvName(flagName string) string {
	return "METERD_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// ApplyEnv sets every flag of fs whose METERD_* variable is set, before the
// command line is parsed (so flags still win), and adds the variable's name
// to each flag's usage.
func ApplyEnv(fs *flag.FlagSet) error {
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		env := EnvName(f.Name)
		f.Usage += " (env " + env + ")"
		if v, ok := os.LookupEnv(env); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %w", env, v, err))
			}
		}
	})
	return errors.Join(errs...)
}
