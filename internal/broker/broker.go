// Package broker connects meterd to NATS JetStream: it runs the embedded
// server of `meterd dev` and the tests, dials external servers, and declares
// the streams and buckets of docs/architecture.md#nats-names-and-stores.
package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/redact"
	"github.com/meterd/meterd/schemas"
)

// EmbeddedConfig configures an in-process JetStream server.
type EmbeddedConfig struct {
	// Dir holds the JetStream file store. Required.
	Dir string
	// Host and Port to listen on; Port -1 picks a free port, 0 => 4222.
	Host string
	Port int
	// DontListen serves in-process connections only (nats.InProcessServer).
	DontListen bool
	// NoSync leaves the server's default 2-minute fsync interval in place.
	// The default (false) fsyncs every write: acknowledged means on disk
	// (docs/architecture.md#exactly-once); benchmarks may set NoSync to measure the difference.
	NoSync bool
}

// StartEmbedded starts a real nats-server with JetStream in this process and
// waits until it accepts connections. Stop it with Shutdown.
func StartEmbedded(cfg EmbeddedConfig) (*server.Server, error) {
	if cfg.Dir == "" {
		return nil, errors.New("broker: embedded server needs a store directory")
	}
	host := cfg.Host
	if host == "" {
		host = "127.0.0.1"
	}
	opts := &server.Options{
		ServerName: "meterd-embedded",
		Host:       host,
		Port:       cfg.Port,
		JetStream:  true,
		StoreDir:   cfg.Dir,
		SyncAlways: !cfg.NoSync,
		DontListen: cfg.DontListen,
		NoSigs:     true,
		NoLog:      true,
		// Batches are up to a few MiB; leave headroom over the 1 MiB default.
		MaxPayload: 8 << 20,
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("broker: new embedded server: %w", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		return nil, errors.New("broker: embedded server not ready after 10s")
	}
	return s, nil
}

// ConnConfig says how to reach NATS.
type ConnConfig struct {
	URL   string // nats://host:port[,…]
	Creds string // optional credentials file
	// Optional TLS: CA bundle to verify the server, client certificate and key.
	TLSCA, TLSCert, TLSKey string
	Name                   string // connection name shown by the server
	// Logger receives disconnects and reconnects; nil discards them.
	Logger *slog.Logger
	// Options are appended last, e.g. nats.InProcessServer for `meterd dev`.
	Options []nats.Option
}

// Connect dials NATS and keeps reconnecting forever: callers that must not
// wait on NATS (spool, gate) rely on the connection coming back by itself.
func Connect(cfg ConnConfig) (*nats.Conn, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	opts := []nats.Option{
		nats.Name(cfg.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.RetryOnFailedConnect(true),
		// While disconnected, fail publishes at once (the caller spools)
		// instead of buffering them in memory.
		nats.ReconnectBufSize(-1),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) { log.Info("nats reconnected", "url", c.ConnectedUrlRedacted()) }),
	}
	if cfg.Creds != "" {
		opts = append(opts, nats.UserCredentials(cfg.Creds))
	}
	if cfg.TLSCA != "" || cfg.TLSCert != "" {
		tc, err := tlsConfig(cfg)
		if err != nil {
			return nil, err
		}
		opts = append(opts, nats.Secure(tc))
	}
	nc, err := nats.Connect(cfg.URL, append(opts, cfg.Options...)...)
	if err != nil {
		// The URL may hold a password, and so may the client's error.
		return nil, fmt.Errorf("broker: connect %s: %w", redact.Userinfo(cfg.URL), redact.New().Error(err))
	}
	return nc, nil
}

func tlsConfig(cfg ConnConfig) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.TLSCA != "" {
		pem, err := os.ReadFile(cfg.TLSCA)
		if err != nil {
			return nil, fmt.Errorf("broker: read TLS CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("broker: no certificate in %s", cfg.TLSCA)
		}
		tc.RootCAs = pool
	}
	if cfg.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("broker: load TLS client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// StreamsConfig sizes the streams meterd declares.
type StreamsConfig struct {
	// Replicas of each stream; 3 in production, 1 embedded.
	Replicas int
	// DuplicateWindow is how long JetStream remembers a batch_id; 0 => 10m.
	// Replays older than this are absorbed by the store.
	DuplicateWindow time.Duration
	// UsageMaxBytes bounds METERD_USAGE; 0 => DefaultUsageMaxBytes. The
	// stream has no MaxAge: usage answered 202 never ages out, however long
	// the aggregator is away. When it is full, publishes fail (DiscardNew),
	// collectors spool and then answer 429: the loss is refused at the door
	// instead of taken silently. The aggregator trims what it committed.
	UsageMaxBytes int64
	// DLQMaxBytes bounds METERD_DLQ; 0 => DefaultDLQMaxBytes. When it is
	// full, dead-lettering fails (DiscardNew) and the message stays in
	// METERD_USAGE, redelivered, until the DLQ is replayed or purged.
	DLQMaxBytes int64
}

// Defaults of StreamsConfig. Both streams fit, with room, in the 9 GiB
// max_file_store of deploy/nats: JetStream reserves a stream's MaxBytes when
// it is created.
const (
	DefaultDuplicateWindow       = 10 * time.Minute
	DefaultUsageMaxBytes   int64 = 4 << 30
	DefaultDLQMaxBytes     int64 = 256 << 20
)

// MaxMsgSize is the largest message of METERD_USAGE, equal to the embedded
// server's max_payload.
const MaxMsgSize = 8 << 20

// Streams returns the configurations of METERD_USAGE and METERD_DLQ.
func Streams(cfg StreamsConfig) []jetstream.StreamConfig {
	replicas := max(cfg.Replicas, 1)
	dup := cfg.DuplicateWindow
	if dup <= 0 {
		dup = DefaultDuplicateWindow
	}
	usageBytes := cfg.UsageMaxBytes
	if usageBytes <= 0 {
		usageBytes = DefaultUsageMaxBytes
	}
	dlqBytes := cfg.DLQMaxBytes
	if dlqBytes <= 0 {
		dlqBytes = DefaultDLQMaxBytes
	}
	return []jetstream.StreamConfig{{
		Name:        schemas.UsageStream,
		Description: "meterd sealed usage batches",
		Subjects:    []string{schemas.UsageSubjects},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		Replicas:    replicas,
		Duplicates:  dup,
		MaxBytes:    usageBytes,
		Discard:     jetstream.DiscardNew,
		MaxMsgSize:  MaxMsgSize,
	}, {
		Name:        schemas.DLQStream,
		Description: "meterd messages that can never be processed, reason in a header",
		Subjects:    []string{schemas.DLQSubjects},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		Replicas:    replicas,
		MaxBytes:    dlqBytes,
		Discard:     jetstream.DiscardNew,
	}}
}

// EnsureStreams creates or updates METERD_USAGE and METERD_DLQ to the
// configurations of Streams: an existing stream gets the new limits (a
// METERD_USAGE created with MaxAge loses it).
func EnsureStreams(ctx context.Context, js jetstream.JetStream, cfg StreamsConfig) error {
	for _, sc := range Streams(cfg) {
		if _, err := js.CreateOrUpdateStream(ctx, sc); err != nil {
			return fmt.Errorf("broker: ensure stream %s: %w", sc.Name, err)
		}
	}
	return nil
}
