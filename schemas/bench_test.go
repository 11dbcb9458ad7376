package schemas

import (
	"fmt"
	"testing"
	"time"
)

// benchEvents returns n realistic events: a 26-character ULID-like id, a
// tenant, a meter, a value, an RFC 3339 time with milliseconds and three
// dimensions.
func benchEvents(n int) []Event {
	base := time.Date(2026, 11, 20, 9, 30, 0, 0, time.UTC)
	routes := []string{"/v1/orders", "/v1/orders/{id}", "/v1/customers", "/v1/search"}
	methods := []string{"GET", "POST", "PUT", "DELETE"}
	events := make([]Event, n)
	for i := range events {
		events[i] = Event{
			ID:     fmt.Sprintf("01JDA7K3Q9ZP4M8X2B%08d", i),
			Tenant: fmt.Sprintf("tenant-%03d", i%100),
			Meter:  "api_calls",
			Value:  int64(1 + i%7),
			Time:   base.Add(time.Duration(i) * 1500 * time.Microsecond),
			Dimensions: map[string]string{
				"route":  routes[i%len(routes)],
				"method": methods[i%len(methods)],
				"status": fmt.Sprint(200 + i%3),
			},
		}
	}
	return events
}

// benchBody is the JSON array a gateway sidecar would POST for events.
func benchBody(events []Event) []byte {
	b := []byte{'['}
	for i, e := range events {
		if i > 0 {
			b = append(b, ',')
		}
		b = fmt.Appendf(b, `{"id":%q,"tenant":%q,"meter":%q,"value":%d,"time":%q,"dimensions":{"route":%q,"method":%q,"status":%q}}`,
			e.ID, e.Tenant, e.Meter, e.Value, e.Time.Format(time.RFC3339Nano),
			e.Dimensions["route"], e.Dimensions["method"], e.Dimensions["status"])
	}
	return append(b, ']')
}

func BenchmarkDecodeValidate(b *testing.B) {
	events := benchEvents(500)
	body := benchBody(events)
	now := events[len(events)-1].Time
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	var errs []FieldError
	for b.Loop() {
		d, err := DecodeEvents(MediaJSON, body)
		if err != nil || len(d.Errors) > 0 || len(d.Events) != 500 {
			b.Fatalf("decode: %v %v %d", err, d.Errors, len(d.Events))
		}
		w := Window{Now: now}
		errs = errs[:0]
		for i := range d.Events {
			errs = d.Events[i].Validate(i, w, errs)
		}
		if len(errs) > 0 {
			b.Fatalf("validate: %v", errs)
		}
	}
	b.ReportMetric(float64(500*b.N)/b.Elapsed().Seconds(), "events/s")
}

// benchBatch is a batch of 500 events as a collector seals it.
func benchBatch() *Batch {
	return &Batch{ID: "01JDA7K3Q9ZP4M8X2BBATCH001", Collector: "collector-0", SealedAt: time.Date(2026, 11, 20, 9, 31, 0, 0, time.UTC), Events: benchEvents(500)}
}

func BenchmarkEncodeBatch(b *testing.B) {
	batch := benchBatch()
	data, err := EncodeBatch(batch)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := EncodeBatch(batch); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(500*b.N)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkAppendBatch encodes into one buffer, as a collector that reuses
// its buffers would: the cost of the encoding without that of new memory.
func BenchmarkAppendBatch(b *testing.B) {
	batch := benchBatch()
	var buf []byte
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if buf, err = AppendBatch(buf[:0], batch); err != nil {
			b.Fatal(err)
		}
	}
	b.SetBytes(int64(len(buf)))
	b.ReportMetric(float64(500*b.N)/b.Elapsed().Seconds(), "events/s")
}

func BenchmarkDecodeBatch(b *testing.B) {
	data, err := EncodeBatch(benchBatch())
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		batch, err := DecodeBatch(BatchContentType, data)
		if err != nil || len(batch.Events) != 500 {
			b.Fatalf("decode: %v", err)
		}
	}
	b.ReportMetric(float64(500*b.N)/b.Elapsed().Seconds(), "events/s")
}
