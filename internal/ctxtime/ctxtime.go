// Package ctxtime holds the waits every long-running component shares:
// a sleep that a cancelled context cuts short, a periodic round (from now or
// from the next tick), and the backoff between retries of NATS and the
// store.
package ctxtime

import (
	"context"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// Backoff returns the backoff every component waits by between retries of
// NATS or the store that go on until they succeed or the context ends:
// from 100 ms, growing to at most 5 s, never giving up by itself.
func Backoff() *backoff.ExponentialBackOff {
	return backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second),
		backoff.WithMaxElapsedTime(0),
	)
}

// Sleep waits d or until ctx ends, whichever comes first, and reports
// whether d passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// Every calls fn at once and then every d until ctx ends; it returns when
// ctx ends, never while fn runs. A call that overruns d delays the next one
// rather than piling them up.
func Every(ctx context.Context, d time.Duration, fn func()) { every(ctx, d, true, fn) }

// Tick is Every without the call at once: fn is first called d from now,
// for a round whose first turn would be wasted, such as renewing what was
// just taken.
func Tick(ctx context.Context, d time.Duration, fn func()) { every(ctx, d, false, fn) }

// every is Every, or Tick when now is false.
func every(ctx context.Context, d time.Duration, now bool, fn func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for ; ; now = true {
		if now {
			fn()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
