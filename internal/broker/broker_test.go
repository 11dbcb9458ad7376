package broker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/schemas"
)

// startCluster starts a JetStream cluster of n real servers in this process,
// each syncing every write like the production servers (sync_interval:
// always), and returns their client URLs.
func startCluster(t *testing.T, n int) string {
	t.Helper()
	ports := make([]int, n)
	routes := make([]string, n)
	for i := range ports {
		ports[i] = freePort(t)
		routes[i] = fmt.Sprintf("nats://127.0.0.1:%d", ports[i])
	}
	urls := make([]string, n)
	for i := range n {
		s, err := server.NewServer(&server.Options{
			ServerName: fmt.Sprintf("meterd-%d", i),
			Host:       "127.0.0.1",
			Port:       -1,
			JetStream:  true,
			StoreDir:   filepath.Join(t.TempDir(), "js"),
			SyncAlways: true,
			Cluster:    server.ClusterOpts{Name: "meterd", Host: "127.0.0.1", Port: ports[i]},
			Routes:     server.RoutesFromStr(strings.Join(routes, ",")),
			NoSigs:     true,
			NoLog:      true,
		})
		if err != nil {
			t.Fatal(err)
		}
		go s.Start()
		t.Cleanup(func() {
			s.Shutdown()
			s.WaitForShutdown()
		})
		if !s.ReadyForConnections(10 * time.Second) {
			t.Fatalf("server %d not ready", i)
		}
		urls[i] = s.ClientURL()
	}
	return strings.Join(urls, ",")
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// EnsureStreams gives both streams the replicas asked for (3 in production,
// docs/architecture.md#exactly-once) on a real 3-server cluster, also when the streams already exist
// with one replica (a deployment that started unreplicated is scaled up), and
// a cluster too small for the replicas is an error, never a silent R1.
func TestEnsureStreamsReplicas(t *testing.T) {
	nc, err := nats.Connect(startCluster(t, 3))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	ensure := func(replicas int) error {
		// The cluster elects its meta leader a few seconds after it formed.
		for {
			actx, cancel := context.WithTimeout(ctx, 2*time.Second)
			err := EnsureStreams(actx, js, StreamsConfig{Replicas: replicas})
			cancel()
			if err == nil || !isNotReady(err) || ctx.Err() != nil {
				return err
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	if err := ensure(1); err != nil {
		t.Fatal(err)
	}
	if err := ensure(3); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{schemas.UsageStream, schemas.DLQStream} {
		var info *jetstream.StreamInfo
		// Followers of a scaled-up stream catch up within moments.
		for give := time.Now().Add(10 * time.Second); ; {
			s, err := js.Stream(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			if info, err = s.Info(ctx); err != nil {
				t.Fatal(err)
			}
			if info.Cluster != nil && len(info.Cluster.Replicas) == 2 || time.Now().After(give) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if info.Config.Replicas != 3 || info.Config.Storage != jetstream.FileStorage || info.Cluster == nil || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != 2 {
			t.Errorf("%s: replicas %d, storage %v, cluster %+v; want R3 on file storage with a leader and 2 followers",
				name, info.Config.Replicas, info.Config.Storage, info.Cluster)
		}
	}
	// Straight to EnsureStreams: the retries of ensure would wait out
	// "insufficient resources" as a cluster still forming.
	if err := EnsureStreams(ctx, js, StreamsConfig{Replicas: 5}); err == nil || !strings.Contains(err.Error(), "placement") {
		t.Errorf("5 replicas on 3 servers: %v, want an error about placement", err)
	}
}

// isNotReady reports whether err is the transient answer of a cluster that
// has no JetStream meta leader yet.
func isNotReady(err error) bool {
	return errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse) ||
		strings.Contains(err.Error(), "JetStream system temporarily unavailable") ||
		strings.Contains(err.Error(), "insufficient resources")
}

// METERD_USAGE never ages out: no MaxAge, a byte bound with DiscardNew, so a
// full stream refuses new batches (the collector spools, then answers 429)
// and keeps every batch it holds; a stream created by an earlier release
// with MaxAge 7 days is updated in place. METERD_DLQ is bounded the same way.
func TestEnsureStreamsNeverAgeOut(t *testing.T) {
	ns, err := StartEmbedded(EmbeddedConfig{Dir: t.TempDir(), Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	// Shutdown returns before the file store's goroutines end: wait for them.
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	// The previous release's METERD_USAGE, with a batch in it.
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: schemas.UsageStream, Subjects: []string{schemas.UsageSubjects}, Storage: jetstream.FileStorage,
		Duplicates: 10 * time.Minute, MaxAge: 7 * 24 * time.Hour, MaxMsgSize: 8 << 20,
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, schemas.UsageSubject(0), []byte("old")); err != nil {
		t.Fatal(err)
	}
	if err := EnsureStreams(ctx, js, StreamsConfig{Replicas: 1}); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int64{schemas.UsageStream: DefaultUsageMaxBytes, schemas.DLQStream: DefaultDLQMaxBytes} {
		s, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		c := s.CachedInfo().Config
		if c.MaxAge != 0 || c.MaxBytes != want || c.Discard != jetstream.DiscardNew {
			t.Errorf("%s: MaxAge %v, MaxBytes %d, Discard %v; want 0, %d, DiscardNew", name, c.MaxAge, c.MaxBytes, c.Discard, want)
		}
		if name == schemas.UsageStream && s.CachedInfo().State.Msgs != 1 {
			t.Errorf("%s: %d messages after the update, want the 1 it held", name, s.CachedInfo().State.Msgs)
		}
	}

	// A full stream refuses the next batch and keeps the ones it holds.
	const bound = 64 << 10
	if err := EnsureStreams(ctx, js, StreamsConfig{Replicas: 1, UsageMaxBytes: bound}); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, 4<<10)
	accepted := 1 // the old batch
	for i := 0; ; i++ {
		if i > 100 {
			t.Fatal("a stream bounded to 64 KiB took 400 KiB")
		}
		if _, err := js.Publish(ctx, schemas.UsageSubject(1), payload); err != nil {
			if !strings.Contains(err.Error(), "maximum bytes") {
				t.Fatalf("publish to a full stream: %v, want maximum bytes exceeded", err)
			}
			break
		}
		accepted++
	}
	s, err := js.Stream(ctx, schemas.UsageStream)
	if err != nil {
		t.Fatal(err)
	}
	if st := s.CachedInfo().State; st.Msgs != uint64(accepted) || st.FirstSeq != 1 {
		t.Fatalf("full stream holds %d messages from seq %d; want all %d accepted from seq 1", st.Msgs, st.FirstSeq, accepted)
	}
}
