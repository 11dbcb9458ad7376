package aggregator_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/internal/broker"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// The trimmer removes what the aggregator's consumer acknowledged and keeps
// everything else: METERD_USAGE, bounded by bytes without an age limit, must
// not fill with committed batches.
func TestTrimmerRemovesOnlyAcknowledged(t *testing.T) {
	// The message delivered and not acknowledged comes back after AckWait.
	env := newIdleAggEnv(t, openStore(t, "sqlite"), func(c *aggregator.Config) { c.AckWait = time.Second })
	for _, id := range []string{"a", "b", "c"} {
		env.publish(t, id, ev("acme", id, 1, 0))
	}
	trim, err := aggregator.NewTrimmer(aggregator.TrimmerConfig{NATS: env.nc, Registerer: env.reg})
	if err != nil {
		t.Fatal(err)
	}
	msgs := func() uint64 {
		s, err := env.js.Stream(t.Context(), schemas.UsageStream)
		if err != nil {
			t.Fatal(err)
		}
		return s.CachedInfo().State.Msgs
	}
	if err := trim.Trim(t.Context()); err != nil {
		t.Fatal(err)
	}
	if n := msgs(); n != 3 {
		t.Fatalf("no consumer yet: %d messages left, want 3", n)
	}
	if b, l := metrictest.Value(t, env.reg, "meterd_aggregator_usage_stream_bytes"), metrictest.Value(t, env.reg, "meterd_aggregator_usage_stream_limit_bytes"); b <= 0 || l != float64(broker.DefaultUsageMaxBytes) {
		t.Fatalf("usage stream %v of %v bytes, want > 0 of %d", b, l, broker.DefaultUsageMaxBytes)
	}
	cons, err := env.js.CreateOrUpdateConsumer(t.Context(), schemas.UsageStream, env.agg.ConsumerConfig())
	if err != nil {
		t.Fatal(err)
	}
	first, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second)); err != nil { // delivered, not acknowledged
		t.Fatal(err)
	}
	if err := first.DoubleAck(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := trim.Trim(t.Context()); err != nil {
		t.Fatal(err)
	}
	if n := msgs(); n != 2 {
		t.Fatalf("one of 3 acknowledged: %d messages left, want 2", n)
	}
	if got := metrictest.Value(t, env.reg, "meterd_aggregator_batches_committed_total"); got != 0 {
		t.Fatal(got)
	}
	// The aggregator commits the rest; the trimmer then empties the stream.
	env.start()
	env.waitCommitted(t, 2, 0)
	waitFor(t, func() bool { return trim.Trim(t.Context()) == nil && msgs() == 0 }, "committed batches not trimmed: %d left", msgs())
	if b, d := metrictest.Value(t, env.reg, "meterd_aggregator_usage_stream_bytes"), metrictest.Value(t, env.reg, "meterd_aggregator_dlq_messages"); b != 0 || d != 0 {
		t.Fatalf("after the trim: usage stream %v bytes, DLQ %v messages; want 0 and 0", b, d)
	}
	if got := env.total(t, "acme"); got != 2 {
		t.Fatalf("acme total %d, want 2 (a was acknowledged outside the aggregator)", got)
	}
}
