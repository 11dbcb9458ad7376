package aggregator_test

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/schemas"
)

// A stored batch whose ids differ only in invalid UTF-8 (which collectors
// refuse at ingest, so only a foreign writer makes one) is dead-lettered
// with the field named; it is never counted with its ids repaired into one.
func TestAggregatorDeadLettersInvalidUTF8(t *testing.T) {
	env := newAggEnv(t, openStore(t, "sqlite"), nil)
	const at = `"time":"2026-11-20T09:30:00Z"`
	raw := "{\"batch_id\":\"foreign-1\",\"events\":[" +
		"{\"id\":\"u\xff\",\"tenant\":\"acme\",\"meter\":\"api_calls\",\"value\":5," + at + "}," +
		"{\"id\":\"u\xfe\",\"tenant\":\"acme\",\"meter\":\"api_calls\",\"value\":5," + at + "}]}"
	env.publishRaw(t, "foreign-1", schemas.BatchContentType, []byte(raw))
	env.publish(t, "good-1", ev("acme", "u1", 1, 0))
	env.waitCommitted(t, 1, 1)
	if got := env.total(t, "acme"); got != 1 {
		t.Fatalf("acme total %d, want 1", got)
	}
	cons, err := env.js.OrderedConsumer(t.Context(), schemas.DLQStream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	m, err := cons.Next(jetstream.FetchMaxWait(2 * time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if r := m.Headers().Get(schemas.HeaderDLQReason); !strings.Contains(r, "event 0: id: must be valid UTF-8") {
		t.Fatalf("DLQ reason %q", r)
	}
}
