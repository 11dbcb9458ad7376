package aggregator_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/schemas"
)

// An aggregator of one partition started where one aggregator of every
// partition consumed before (the move to shared partitions) starts after
// the old consumer's acknowledgement floor: what the old one acknowledged
// is not delivered again, and nothing after it is lost.
func TestConsumerStartsAfterOldFloor(t *testing.T) {
	const durable = "meterd-aggregator-p0"
	env := newIdleAggEnv(t, openStore(t, "sqlite"), func(c *aggregator.Config) {
		c.Durable, c.Subject, c.StartAfter = durable, schemas.UsageSubject(0), aggregator.DefaultDurable
	})
	old, err := env.js.CreateOrUpdateConsumer(t.Context(), schemas.UsageStream, jetstream.ConsumerConfig{
		Durable: aggregator.DefaultDurable, FilterSubject: schemas.UsageSubjects, AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		env.publish(t, fmt.Sprint("b", i), ev("acme", fmt.Sprint("e", i), 1, 0))
	}
	batch, err := old.Fetch(6, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for m := range batch.Messages() {
		if err := m.DoubleAck(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	if info, err := old.Info(t.Context()); err != nil || info.AckFloor.Stream != 6 {
		t.Fatalf("old consumer's floor: %+v %v", info, err)
	}
	env.start()
	env.waitCommitted(t, 4, 0)
	if got := env.total(t, "acme"); got != 4 {
		t.Errorf("the new consumer counted %d events, want the 4 after the old floor", got)
	}
	cons, err := env.js.Consumer(t.Context(), schemas.UsageStream, durable)
	if err != nil {
		t.Fatal(err)
	}
	if c := cons.CachedInfo().Config; c.OptStartSeq != 7 || c.FilterSubject != schemas.UsageSubject(0) {
		t.Errorf("new consumer starts at %d on %q, want 7 on %q", c.OptStartSeq, c.FilterSubject, schemas.UsageSubject(0))
	}
}
