package collector

import (
	"errors"
	"io"
	"math"
	"runtime/debug"
	"sync/atomic"
)

// DefaultMaxInflightBodyBytes is the bound of body bytes held by requests in
// flight when the process has no memory limit (GOMEMLIMIT); with one, the
// default is a sixteenth of it (16 MiB under the sidecar's 256 MiB).
const DefaultMaxInflightBodyBytes = 64 << 20

// defaultMaxInflightBodyBytes derives Config.MaxInflightBodyBytes from the
// memory limit. While a request is in flight its body costs about four
// times its size (the body, the events decoded from it, the batches encoded
// from those, and the copy the NATS client writes out), and the garbage
// collector lets the heap grow to twice what is live (GOGC=100) before it
// collects: a sixteenth of the limit for bodies keeps the process's peak
// RSS under three quarters of it (BENCHMARKS.md).
func defaultMaxInflightBodyBytes(maxBody int64) int64 {
	limit := debug.SetMemoryLimit(-1)
	if limit == math.MaxInt64 {
		return max(DefaultMaxInflightBodyBytes, maxBody)
	}
	return max(limit/16, maxBody)
}

// errOverBudget is the error of a body read that would take the bytes in
// flight past Config.MaxInflightBodyBytes.
var errOverBudget = errors.New("collector: in-flight body bytes at their bound")

// bodyBudget bounds the body bytes all requests in flight hold, so many
// concurrent large requests are shed (503 + Retry-After) instead of growing
// the heap past the memory limit. Reservations never wait: a request either
// gets its bytes at once or is answered, so no set of requests can hold part
// of the budget while waiting for the rest.
type bodyBudget struct {
	limit int64
	used  atomic.Int64
}

// take reserves n bytes, or reports false when they would exceed the limit.
func (b *bodyBudget) take(n int64) bool {
	for {
		u := b.used.Load()
		if u+n > b.limit {
			return false
		}
		if b.used.CompareAndSwap(u, u+n) {
			return true
		}
	}
}

func (b *bodyBudget) give(n int64) { b.used.Add(-n) }

// bodyReservation is one request's share of the budget. It grows as the
// bytes read (after decompression) outgrow it, up to max.
type bodyReservation struct {
	budget *bodyBudget
	held   int64
	max    int64
}

// minReservation is the first share of a body whose size is unknown up front
// (chunked, or gzip whose decompressed size only reading tells).
const minReservation = 64 << 10

// grow makes the reservation hold at least n bytes, doubling it (the way the
// body's buffer grows) up to max; false when the budget has no room.
func (r *bodyReservation) grow(n int64) bool {
	if n <= r.held {
		return true
	}
	want := min(max(n, 2*r.held), r.max)
	if want < n {
		want = n // past max: the caller answers 413 after reading one byte more
	}
	if !r.budget.take(want - r.held) {
		return false
	}
	r.held = want
	return true
}

// release gives the reservation back; it is idempotent.
func (r *bodyReservation) release() {
	r.budget.give(r.held)
	r.held = 0
}

// budgetReader reads from r, growing res by the bytes it passes on: placed
// after decompression, it accounts for what the body costs in memory.
type budgetReader struct {
	r    io.Reader
	res  *bodyReservation
	read int64
}

func (b *budgetReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.read += int64(n)
	if !b.res.grow(b.read) {
		return n, errOverBudget
	}
	return n, err
}
