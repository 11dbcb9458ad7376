package ctxtime

import (
	"context"
	"testing"
	"time"
)

func TestSleep(t *testing.T) {
	if !Sleep(t.Context(), time.Millisecond) {
		t.Fatal("Sleep of 1ms with a live context reported it was cut short")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	start := time.Now()
	if Sleep(ctx, time.Hour) {
		t.Fatal("Sleep with a cancelled context reported that the hour passed")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("Sleep with a cancelled context took %s", d)
	}
}

// Every calls at once, then once per period, and returns once the context
// ends.
func TestEvery(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	calls := 0
	start := time.Now()
	Every(ctx, 20*time.Millisecond, func() {
		calls++
		if calls == 1 && time.Since(start) > 10*time.Millisecond {
			t.Errorf("first call after %s, want at once", time.Since(start))
		}
		if calls == 3 {
			cancel()
		}
	})
	if calls != 3 {
		t.Errorf("fn called %d times, want 3: Every must return once the context ended", calls)
	}
	if d := time.Since(start); d < 40*time.Millisecond {
		t.Errorf("3 calls took %s, want at least 2 periods (40ms)", d)
	}
}

// Backoff starts near 100 ms, grows to 5 s at most and never stops by
// itself: a retry of NATS or the store ends only with its context.
func TestBackoff(t *testing.T) {
	bo := Backoff()
	first := bo.NextBackOff()
	if first < 50*time.Millisecond || first > 150*time.Millisecond {
		t.Errorf("first wait %s, want 100ms ± the randomization", first)
	}
	for range 100 {
		if d := bo.NextBackOff(); d < 0 || d > 5*time.Second*3/2 {
			t.Fatalf("wait %s: want at most 5s ± the randomization, and never the end", d)
		}
	}
}
