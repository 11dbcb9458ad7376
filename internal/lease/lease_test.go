package lease_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/jstest"
	"github.com/meterd/meterd/internal/lease"
)

func newJS(t *testing.T) jetstream.JetStream {
	t.Helper()
	return jstest.Start(t, jstest.Config{}).JetStream()
}

const d = time.Second

func newLease(t *testing.T, js jetstream.JetStream, holder string) *lease.Lease {
	t.Helper()
	l, err := lease.New(t.Context(), lease.Config{JS: js, Key: "aggregator.test.all", Holder: holder, Duration: d})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// acquireWithin calls Acquire with a timeout and returns the token, or 0 if
// the timeout passed first.
func acquireWithin(t *testing.T, l *lease.Lease, within time.Duration) (uint64, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), within)
	defer cancel()
	start := time.Now()
	token, err := l.Acquire(ctx)
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatal(err)
	}
	return token, time.Since(start)
}

// While the holder renews, nobody else gets the lease, however long they
// wait; once it releases, the next waiter has it at its next poll.
func TestHeldWhileRenewedReleasedAtOnce(t *testing.T) {
	js := newJS(t)
	a, b := newLease(t, js, "a"), newLease(t, js, "b")
	ta, _ := acquireWithin(t, a, time.Second)
	if ta == 0 || !a.Held() {
		t.Fatal("a did not acquire a free lease")
	}
	renewing, stop := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for renewing.Err() == nil {
			until, err := a.Renew(renewing)
			if err != nil && renewing.Err() == nil {
				t.Errorf("renew: %v", err)
				return
			}
			if left := time.Until(until); renewing.Err() == nil && (left < d/2 || left > d) {
				t.Errorf("a renewed lease is safe for %s, want between %s and %s", left, d/2, d)
			}
			time.Sleep(d / 3)
		}
	}()
	if tb, _ := acquireWithin(t, b, 3*d); tb != 0 {
		t.Fatalf("b acquired (token %d) while a renewed", tb)
	}
	stop()
	<-done
	if err := a.Release(t.Context()); err != nil {
		t.Fatal(err)
	}
	tb, took := acquireWithin(t, b, 3*d)
	if tb <= ta {
		t.Fatalf("b's token %d after a's %d, want a greater one", tb, ta)
	}
	if took > d/2 {
		t.Errorf("b acquired %s after a released, want within a poll (%s)", took, d/10)
	}
	if _, err := a.Renew(t.Context()); !errors.Is(err, lease.ErrLost) {
		t.Errorf("a renewing after its release: %v, want ErrLost", err)
	}
}

// A holder that stops renewing is replaced within the lease duration (and a
// poll), and its renewal afterwards fails with ErrLost.
func TestTakeOverFromAHolderThatStopped(t *testing.T) {
	js := newJS(t)
	a, b, c := newLease(t, js, "a"), newLease(t, js, "b"), newLease(t, js, "c")
	ta, _ := acquireWithin(t, a, time.Second)
	if _, err := a.Renew(t.Context()); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	// Two waiters: one of them wins, the other keeps waiting.
	type result struct {
		token uint64
		at    time.Time
	}
	results := make(chan result, 2)
	end := time.Now().Add(4 * d)
	for _, l := range []*lease.Lease{b, c} {
		go func() {
			token, _ := acquireWithin(t, l, time.Until(end))
			results <- result{token, time.Now()}
			for token != 0 && time.Now().Before(end) { // the winner renews
				if _, err := l.Renew(t.Context()); err != nil {
					t.Errorf("the new holder's renewal: %v", err)
					return
				}
				time.Sleep(d / 3)
			}
		}()
	}
	first, second := <-results, <-results
	if first.token == 0 || second.token != 0 {
		t.Fatalf("tokens of the waiters %d and %d, want exactly one", first.token, second.token)
	}
	if first.token <= ta {
		t.Errorf("token %d after %d, want a greater one", first.token, ta)
	}
	if took := first.at.Sub(stopped); took < d || took > d+d/2 {
		t.Errorf("taken over %s after the last renewal, want between the lease (%s) and the lease and a poll", took, d)
	}
	if _, err := a.Renew(t.Context()); !errors.Is(err, lease.ErrLost) {
		t.Fatalf("the old holder's renewal: %v, want ErrLost", err)
	}
	if a.Held() {
		t.Error("the old holder still believes it holds the lease")
	}
}

func TestConfigValidate(t *testing.T) {
	js := newJS(t)
	for _, c := range []lease.Config{
		{Key: "k"},
		{JS: js},
		{JS: js, Key: "k", Duration: time.Millisecond},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v: valid, want an error", c)
		}
	}
	c := lease.Config{JS: js, Key: "k"}
	if err := c.Validate(); err != nil || c.Duration != lease.DefaultDuration || c.Bucket != lease.DefaultBucket || c.Holder == "" {
		t.Errorf("defaults: %+v, %v", c, err)
	}
}

// A renewal whose answer was lost (written, but the holder saw a timeout or
// a cancelled context) leaves the entry at a revision the holder does not
// know: its next renewal and its release still work, since the entry is
// its own; an entry of another holder is not.
func TestRenewalWithLostAnswer(t *testing.T) {
	js := newJS(t)
	a, b := newLease(t, js, "a"), newLease(t, js, "b")
	token, _ := acquireWithin(t, a, time.Second)
	kv, err := js.KeyValue(t.Context(), lease.DefaultBucket)
	if err != nil {
		t.Fatal(err)
	}
	lostRenewal := func() {
		data, _ := json.Marshal(lease.Entry{Holder: "a", Token: token, Duration: d.String(), RenewedAt: time.Now()})
		if _, err := kv.Put(t.Context(), "aggregator.test.all", data); err != nil {
			t.Fatal(err)
		}
	}
	lostRenewal()
	if _, err := a.Renew(t.Context()); err != nil {
		t.Fatalf("renewal after a lost answer: %v", err)
	}
	lostRenewal()
	if err := a.Release(t.Context()); err != nil {
		t.Fatalf("release after a lost answer: %v", err)
	}
	if tb, took := acquireWithin(t, b, 3*d); tb == 0 || took > d/2 {
		t.Fatalf("b acquired token %d %s after the release, want at once", tb, took)
	}
	// b's entry is not a's, whatever a believes.
	if _, err := a.Renew(t.Context()); !errors.Is(err, lease.ErrLost) {
		t.Fatalf("a renewing b's lease: %v, want ErrLost", err)
	}
}
