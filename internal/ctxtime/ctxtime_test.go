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

// Every calls at once and Tick a period from now, then both once per
// period, and both return once the context ends.
func TestEveryAndTick(t *testing.T) {
	const period = 20 * time.Millisecond
	for _, tc := range []struct {
		name   string
		round  func(context.Context, time.Duration, func())
		atOnce bool
	}{
		{"Every", Every, true},
		{"Tick", Tick, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(t.Context())
			calls := 0
			start := time.Now()
			tc.round(ctx, period, func() {
				calls++
				if d := time.Since(start); calls == 1 && tc.atOnce && d > period/2 {
					t.Errorf("first call after %s, want at once", d)
				} else if calls == 1 && !tc.atOnce && d < period*3/4 {
					t.Errorf("first call after %s, want a period (%s)", d, period)
				}
				if calls == 3 {
					cancel()
				}
			})
			if calls != 3 {
				t.Errorf("fn called %d times, want 3: %s must return once the context ended", calls, tc.name)
			}
			periods := 3
			if tc.atOnce {
				periods = 2
			}
			if d := time.Since(start); d < time.Duration(periods)*period {
				t.Errorf("3 calls took %s, want at least %d periods (%s)", d, periods, time.Duration(periods)*period)
			}
		})
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
