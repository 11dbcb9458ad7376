package broker_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/broker"
	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/schemas"
)

// EnsureStreams gives both streams the replicas asked for (3 in production,
// docs/architecture.md#exactly-once) on a real 3-server cluster, also when the streams already exist
// with one replica (a deployment that started unreplicated is scaled up), and
// a cluster too small for the replicas is an error, never a silent R1.
func TestEnsureStreamsReplicas(t *testing.T) {
	js := jstest.StartCluster(t, 3).JetStream()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	// Streams within the test servers' max_file_store.
	sized := func(replicas int) broker.StreamsConfig {
		return broker.StreamsConfig{Replicas: replicas, UsageMaxBytes: 256 << 20, DLQMaxBytes: 64 << 20}
	}
	ensure := func(replicas int) error {
		// The cluster elects its meta leader a few seconds after it formed.
		for {
			actx, cancel := context.WithTimeout(ctx, 2*time.Second)
			err := broker.EnsureStreams(actx, js, sized(replicas))
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
	if err := broker.EnsureStreams(ctx, js, sized(5)); err == nil || !strings.Contains(err.Error(), "placement") {
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
	js := jstest.Start(t, jstest.Config{}).JetStream()
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
	if err := broker.EnsureStreams(ctx, js, broker.StreamsConfig{Replicas: 1}); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int64{schemas.UsageStream: broker.DefaultUsageMaxBytes, schemas.DLQStream: broker.DefaultDLQMaxBytes} {
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
	if err := broker.EnsureStreams(ctx, js, broker.StreamsConfig{Replicas: 1, UsageMaxBytes: bound}); err != nil {
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
