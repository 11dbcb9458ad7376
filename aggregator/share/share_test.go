package share_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meterd/meterd/aggregator/share"
	"github.com/meterd/meterd/internal/jstest"
)

// TestMain fails the package's tests if a goroutine outlives them.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// board records which member runs which partition.
type board struct {
	mu      sync.Mutex
	running map[int][]string
}

type worker struct {
	b      *board
	member string
	p      int
}

func (w worker) Run(ctx context.Context) error {
	w.b.mu.Lock()
	w.b.running[w.p] = append(w.b.running[w.p], w.member)
	w.b.mu.Unlock()
	<-ctx.Done()
	w.b.mu.Lock()
	defer w.b.mu.Unlock()
	for i, m := range w.b.running[w.p] {
		if m == w.member {
			w.b.running[w.p] = append(w.b.running[w.p][:i], w.b.running[w.p][i+1:]...)
			break
		}
	}
	return nil
}

func (worker) Ready(context.Context) error { return nil }

// settled waits until every partition runs on exactly one member, and n
// members run them, and returns how many each member runs.
func (b *board) settled(t *testing.T, partitions, n int, within time.Duration) map[string]int {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		b.mu.Lock()
		per, ok := map[string]int{}, true
		for p := range partitions {
			if len(b.running[p]) != 1 {
				ok = false
				break
			}
			per[b.running[p][0]]++
		}
		state := fmt.Sprint(b.running)
		b.mu.Unlock()
		if ok && len(per) == n {
			return per
		}
		if time.Now().After(deadline) {
			t.Fatalf("partitions not settled within %s: %s", within, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Members that join share the partitions in balance; one that leaves
// cleanly hands its partitions over within a poll.
func TestGroupRebalances(t *testing.T) {
	ns := jstest.Start(t, jstest.Config{NoSync: true})
	const partitions = 16
	b := &board{running: map[int][]string{}}
	type member struct {
		stop context.CancelFunc
		done chan struct{}
	}
	join := func(name string) member {
		g, err := share.New(t.Context(), share.Config{JS: ns.JetStream(), Member: name, Partitions: partitions,
			TTL: 2 * time.Second, Poll: 100 * time.Millisecond,
			Worker: func(p int) (share.Worker, error) { return worker{b, name, p}, nil }})
		if err != nil {
			t.Fatal(err)
		}
		ctx, stop := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { defer close(done); g.Run(ctx) }()
		return member{stop, done}
	}
	ms := map[string]member{}
	for _, name := range []string{"a", "b", "c"} {
		ms[name] = join(name)
	}
	defer func() {
		for _, m := range ms {
			m.stop()
			<-m.done
		}
	}()
	check := func(n int) {
		t.Helper()
		per := b.settled(t, partitions, n, 5*time.Second)
		for m, k := range per {
			if k < partitions/n || k > (partitions+n-1)/n {
				t.Errorf("%s runs %d partitions, want %d..%d", m, k, partitions/n, (partitions+n-1)/n)
			}
		}
		t.Logf("%d members: %v", n, per)
	}
	check(3)
	ms["d"] = join("d")
	check(4)
	begin := time.Now()
	ms["a"].stop()
	<-ms["a"].done
	delete(ms, "a")
	check(3)
	if took := time.Since(begin); took > 2*time.Second {
		t.Errorf("a clean leave took %s to hand over, want within a few polls", took)
	}
}

// A member that stops heartbeating (here: its process is gone without
// leaving) is dropped once its key expires, and its partitions move.
func TestGroupExpiresSilentMember(t *testing.T) {
	ns := jstest.Start(t, jstest.Config{NoSync: true})
	b := &board{running: map[int][]string{}}
	g, err := share.New(t.Context(), share.Config{JS: ns.JetStream(), Member: "a", Partitions: 8,
		TTL: time.Second, Poll: 100 * time.Millisecond,
		Worker: func(p int) (share.Worker, error) { return worker{b, "a", p}, nil }})
	if err != nil {
		t.Fatal(err)
	}
	// A silent member: its key, then nothing.
	kv, err := ns.JetStream().KeyValue(t.Context(), share.DefaultBucket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(t.Context(), "ghost", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); g.Run(ctx) }()
	defer func() { stop(); <-done }()
	time.Sleep(300 * time.Millisecond)
	if owned, members := g.Owned(); len(members) != 2 || len(owned) != 4 {
		t.Fatalf("with the ghost: members %v, owned %v", members, owned)
	}
	per := b.settled(t, 8, 1, 3*time.Second)
	if per["a"] != 8 {
		t.Fatalf("after the ghost expired a runs %d of 8", per["a"])
	}
}
