package gate

import (
	"fmt"
	"log/slog"
	"net/http"
	"testing"
	"time"
)

const benchTenants = 10_000

// benchGates returns running gates loaded from a real bucket of 10k blocked
// tenants (tenant-00000 … tenant-09999): one current, one stale under the
// Deny policy.
func benchGates(b *testing.B) (current, staleDeny *Gate) {
	n := startNATS(b)
	n.createBucket()
	publishDecisions(b, n, benchTenants)
	n.heartbeat()
	quiet := slog.New(slog.DiscardHandler)
	current = startGate(b, n, Config{StaleAfter: time.Hour, Logger: quiet})
	ahead := &fakeClock{now: time.Now().Add(2 * time.Hour)}
	staleDeny = startGate(b, n, Config{StaleAfter: time.Hour, StalePolicy: Deny, Now: ahead.Now, Logger: quiet})
	for _, g := range []*Gate{current, staleDeny} {
		waitReady(b, g)
		if g.Version() != benchTenants {
			b.Fatalf("gate holds %d changes, want %d", g.Version(), benchTenants)
		}
	}
	return current, staleDeny
}

var sink Verdict

func BenchmarkCheck(b *testing.B) {
	current, staleDeny := benchGates(b)
	for _, bc := range []struct {
		name    string
		g       *Gate
		tenant  string
		blocked bool
		stale   bool
	}{
		{"blocked", current, "tenant-04242", true, false},
		{"allowed", current, "tenant-unknown", false, false},
		{"stale-deny-unknown", staleDeny, "tenant-unknown", true, true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			var v Verdict
			for b.Loop() {
				v = bc.g.Check(bc.tenant)
			}
			if (v.Block != nil) != bc.blocked || v.Stale != bc.stale {
				b.Fatalf("Check(%s) = %+v", bc.tenant, v)
			}
			sink = v
		})
	}
}

// BenchmarkCheckParallel checks a mix of blocked and allowed tenants from
// every P, as a gateway's request goroutines do.
func BenchmarkCheckParallel(b *testing.B) {
	g, _ := benchGates(b)
	tenants := make([]string, 64)
	for i := range tenants {
		if i%2 == 0 {
			tenants[i] = fmt.Sprintf("tenant-%05d", i*151)
		} else {
			tenants[i] = fmt.Sprintf("unknown-%d", i)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i, blocked := 0, 0
		for ; pb.Next(); i++ {
			if g.Check(tenants[i%len(tenants)]).Block != nil {
				blocked++
			}
		}
		if blocked != (i+1)/2 { // even indexes are blocked
			b.Errorf("%d of %d checks blocked, want %d", blocked, i, (i+1)/2)
		}
	})
}

// discardWriter is a ResponseWriter that keeps only its headers, so a
// benchmark measures the answer rather than a recorder.
type discardWriter struct{ h http.Header }

func (w *discardWriter) Header() http.Header         { return w.h }
func (w *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *discardWriter) WriteHeader(int)             {}

// BenchmarkCheckAnswer402 is what a gateway's handler does after Check
// blocked: write the prerendered 402 with its Retry-After and Link.
func BenchmarkCheckAnswer402(b *testing.B) {
	blk, err := newBlock(quota("acme", 42))
	if err != nil {
		b.Fatal(err)
	}
	w := &discardWriter{h: http.Header{}}
	now := periodEnd.Add(-734400 * time.Second)
	b.ReportAllocs()
	for b.Loop() {
		clear(w.h)
		blk.Write(w, now)
	}
}
