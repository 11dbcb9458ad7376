package aggregator_test

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/schemas"
)

// BenchmarkAggregator measures sustained consumption from JetStream into a
// store: b.N batches of 500 events (1000 tenants, 3 meters, 3 dimensions)
// are published first, then the clock runs until the aggregator committed
// them all. Everything is co-located on this machine. Besides events/s it
// reports the CPU seconds per 50 000 events of this process (the aggregator
// and the embedded NATS server) and of the private ClickHouse server, which
// are steadier than wall-clock figures on a shared machine.
//
// flush=20 writes flushes of the default FetchBatch only, as the aggregator
// does while it keeps up; catch-up drains the backlog as it does when it is
// behind (flushes of CatchUpBatch, 100 batches).
func BenchmarkAggregator(b *testing.B) {
	for _, name := range []string{"sqlite", "clickhouse"} {
		b.Run(name, func(b *testing.B) {
			b.Run("flush=20", func(b *testing.B) {
				benchmarkAggregator(b, name, func(c *aggregator.Config) { c.FetchBatch, c.CatchUpBatch = 20, 20 })
			})
			b.Run("catch-up", func(b *testing.B) { benchmarkAggregator(b, name, nil) })
		})
	}
}

// processCPU is the CPU time (user + system) this process has used.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func benchmarkAggregator(b *testing.B, name string, mutate func(*aggregator.Config)) {
	env := newIdleAggEnv(b, openStore(b, name), mutate)
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
	client, server, serverOK := processCPU(b), time.Duration(0), false
	if name == "clickhouse" {
		server, serverOK = chtest.ServerCPU()
	}
	env.start()
	env.waitCommitted(b, float64(b.N), 0)
	b.StopTimer()
	events := float64(b.N * perBatch)
	b.ReportMetric(events/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric((processCPU(b)-client).Seconds()*50_000/events, "client-cpu-s/50k")
	if now, ok := chtest.ServerCPU(); serverOK && ok {
		b.ReportMetric((now-server).Seconds()*50_000/events, "server-cpu-s/50k")
	}
}
