package aggregator_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/schemas"
)

// BenchmarkAggregator measures sustained consumption from JetStream into a
// store: b.N batches of 500 events (1000 tenants, 3 meters, 3 dimensions)
// are published first, then the clock runs until the aggregator committed
// them all. Everything is co-located on this machine.
func BenchmarkAggregator(b *testing.B) {
	for _, name := range []string{"sqlite", "clickhouse"} {
		b.Run(name, func(b *testing.B) {
			env := newIdleAggEnv(b, openStore(b, name), nil)
			{
				const perBatch = 500
				meters := []string{"api_calls", "tokens", "bytes_out"}
				payloads := make([][]byte, b.N)
				for i := range b.N {
					events := make([]schemas.Event, perBatch)
					for j := range events {
						n := i*perBatch + j
						events[j] = schemas.Event{
							ID: fmt.Sprintf("01JD%012d", n), Tenant: fmt.Sprintf("tenant-%04d", n%1000),
							Meter: meters[n%3], Value: int64(n%7 + 1), Time: t0.Add(time.Duration(n%3600) * time.Second),
							Dimensions: map[string]string{"route": fmt.Sprintf("/v1/r%d", n%20), "method": "GET", "status": "200"},
						}
					}
					data, err := schemas.EncodeBatch(&schemas.Batch{ID: fmt.Sprintf("bench-%d", i), Collector: "bench", SealedAt: t0, Events: events})
					if err != nil {
						b.Fatal(err)
					}
					payloads[i] = data
				}
				for i, data := range payloads {
					msg := &nats.Msg{Subject: schemas.UsageSubject(i % 16), Data: data, Header: nats.Header{}}
					msg.Header.Set(schemas.HeaderContentType, schemas.BatchContentType)
					if _, err := env.js.PublishMsgAsync(msg, jetstream.WithMsgID(fmt.Sprintf("bench-%d", i))); err != nil {
						b.Fatal(err)
					}
				}
				<-env.js.PublishAsyncComplete()
				b.ReportAllocs()
				b.ResetTimer()
				env.start()
				env.waitCommitted(b, float64(b.N), 0)
				b.StopTimer()
				b.ReportMetric(float64(b.N*perBatch)/b.Elapsed().Seconds(), "events/s")
			}
		})
	}
}
