package collector

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkIngest measures HTTP batch ingest into JetStream: requests of 500
// events POSTed by concurrent clients over loopback to the collector, which
// publishes to an embedded JetStream in the same process (fsync on every
// write, as `meterd dev` runs it, or on the server's default interval).
// Each op is one request of 500 events.
func BenchmarkIngest(b *testing.B) {
	b.Run("fsync=always", func(b *testing.B) { benchmarkIngest(b, true) })
	b.Run("fsync=interval", func(b *testing.B) { benchmarkIngest(b, false) })
}

func benchmarkIngest(b *testing.B, fsync bool) {
	const perRequest = 500
	env := newIngestEnvSync(b, fsync, func(c *Config) {
		c.BatchMaxEvents = perRequest
		c.BatchMaxWait = 5 * time.Millisecond
		c.Partitions = 1 // one tenant mix per batch; see BENCHMARKS.md
		c.Now = time.Now
	})
	bodies := make([][]byte, 64)
	for i := range bodies {
		var sb strings.Builder
		sb.WriteByte('[')
		for j := range perRequest {
			if j > 0 {
				sb.WriteByte(',')
			}
			fmt.Fprintf(&sb, `{"id":"01JD%08d%06d","tenant":"tenant-%03d","meter":"api_calls","value":1,"dimensions":{"route":"/v1/items","method":"GET","status":"200"}}`,
				i, j, (i*perRequest+j)%200)
		}
		sb.WriteByte(']')
		bodies[i] = []byte(sb.String())
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	var next atomic.Int64
	b.SetBytes(int64(len(bodies[0])))
	b.ReportAllocs()
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			body := bodies[next.Add(1)%int64(len(bodies))]
			req, _ := http.NewRequest(http.MethodPost, env.srv.URL+"/v1/events", bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("X-API-Key", ingestAdminKey)
			resp, err := client.Do(req)
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusAccepted {
				b.Fatalf("status %d", resp.StatusCode)
			}
		}
	})
	b.ReportMetric(float64(b.N*perRequest)/b.Elapsed().Seconds(), "events/s")
}
