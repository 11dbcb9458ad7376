// Package share divides the usage partitions between N aggregator
// replicas started with identical flags (meterd aggregator
// --share-partitions), and moves them when a replica joins, leaves or stops
// responding.
//
// # Membership
//
// Each replica (a member) puts its key in a JetStream key-value bucket
// (meterd-aggregators) every Poll, and the bucket's TTL removes the key of a
// member that stopped doing so (crashed, cut off, frozen) within TTL. A
// member that stops cleanly deletes its key. Every Poll each member lists
// the keys and computes, from the live members alone, the same assignment
// (Assign: rendezvous hashing with bounded loads), then starts the workers
// of the partitions assigned to it and stops those no longer assigned.
// Nothing else is coordinated: no leader, no home-made consensus; the bucket
// is JetStream's (replicated like the streams).
//
// # One writer per partition
//
// Views of the membership may differ for a moment (a key expired for one
// member's list and not yet for another's, a member that just woke from a
// freeze), so two members may both believe they own a partition. That is
// safe because the worker of a partition writes only while it holds the
// partition's writer lease (internal/lease, one key per partition, with a
// fencing token): of two members that both run partition p, one holds the
// lease and writes, the other waits for it. The assignment only decides who
// tries; the lease decides who writes. A member that stops a partition
// releases its lease, so the new owner takes it at its next poll; the lease
// of a member that died expires after the lease duration.
//
// # Failover time
//
// A member that stopped responding is replaced, for each of its partitions,
// after its key expired (at most TTL after its last heartbeat), the new
// owner's next Poll, and a whole lease duration of the new owner watching
// the lease stand still (internal/lease): at most TTL + Poll + lease
// duration + the lease's poll, 6 s + 1 s + 15 s + 1.5 s ≈ 24 s by default
// (README, "Several aggregators" has the measured figure). A clean stop or a
// join moves partitions within a Poll and a lease poll.
package share

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/internal/bucket"
	"github.com/meterd/meterd/internal/ctxtime"
	"github.com/meterd/meterd/internal/promreg"
	"github.com/meterd/meterd/internal/quiet"
	"github.com/meterd/meterd/schemas"
)

// Defaults of Config.
const (
	DefaultBucket = "meterd-aggregators"
	DefaultTTL    = 6 * time.Second
)

// Worker runs one partition while this member owns it.
type Worker interface {
	// Run works on the partition until ctx ends, then releases it (its
	// writer lease) and returns nil; it may be called again later.
	Run(ctx context.Context) error
	// Ready fails while the worker cannot make progress.
	Ready(ctx context.Context) error
}

// Config configures a Group.
type Config struct {
	// JS is the JetStream context of the membership bucket. Required.
	JS jetstream.JetStream
	// Bucket is the membership bucket (default meterd-aggregators), created
	// if missing with Replicas replicas (default 1).
	Bucket   string
	Replicas int
	// Member names this replica: unique among the members, and a valid
	// key-value key (letters, digits, '-', '_', '='). A replica restarted
	// under the same name (a StatefulSet's pod) gets the same partitions
	// back. Required.
	Member string
	// Partitions is P, the number of usage partitions (default 16).
	Partitions int
	// TTL is how long a member's key lives without a heartbeat: the time
	// to notice a member that stopped responding (default 6s, at least
	// 1s). Poll is how often a member heartbeats and reads the membership
	// (default min(TTL/4, 1s)).
	TTL  time.Duration
	Poll time.Duration
	// Worker returns the worker of partition p; it is called once per
	// partition, the first time p is assigned to this member, on a
	// goroutine of that partition (so it may take a while), concurrently
	// with other partitions' calls. Required.
	Worker     func(p int) (Worker, error)
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

var memberName = regexp.MustCompile(`^[-_=A-Za-z0-9]{1,128}$`)

// Validate checks c and fills in defaults.
func (c *Config) Validate() error {
	switch {
	case c.JS == nil:
		return errors.New("share: JetStream is required")
	case c.Worker == nil:
		return errors.New("share: Worker is required")
	case !memberName.MatchString(c.Member):
		return fmt.Errorf("share: member name %q must be 1-128 letters, digits, '-', '_' or '='", c.Member)
	}
	c.Bucket = cmp.Or(c.Bucket, DefaultBucket)
	if c.Partitions <= 0 {
		c.Partitions = schemas.DefaultPartitions
	}
	if c.TTL <= 0 {
		c.TTL = DefaultTTL
	}
	if c.TTL < time.Second {
		return fmt.Errorf("share: member TTL %s is below 1s", c.TTL)
	}
	if c.Poll <= 0 {
		c.Poll = min(c.TTL/4, time.Second)
	}
	if c.Poll >= c.TTL/2 {
		return fmt.Errorf("share: poll %s must be below half the member TTL %s", c.Poll, c.TTL)
	}
	quiet.Defaults(&c.Logger, &c.Registerer)
	return nil
}

// MemberEntry is the value of a member's key, for operators (nats kv get
// meterd-aggregators <member>): the partitions it was running at its last
// heartbeat.
type MemberEntry struct {
	Member     string `json:"member"`
	Partitions []int  `json:"partitions"`
}

// Group is this replica's membership and the workers of the partitions it
// owns.
type Group struct {
	cfg Config
	log *slog.Logger
	kv  jetstream.KeyValue

	workers map[int]*running // by partition; only Run's goroutine uses it

	mu      sync.Mutex
	members []string       // the live members of the last successful read
	owned   []int          // partitions assigned to this member
	built   map[int]Worker // the workers of workers, for Ready

	heartbeat atomic.Int64 // unix nanos of the last heartbeat the bucket acknowledged

	ownedGauge, membersGauge prometheus.Gauge
	moves                    prometheus.Counter
}

// running is the worker of a partition and its current run, if any.
type running struct {
	w    Worker             // nil until the first run built it
	stop context.CancelFunc // nil when not running
	done chan struct{}      // closed when the last run returned
}

// New creates (or updates) the membership bucket.
func New(ctx context.Context, cfg Config) (*Group, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	kv, err := bucket.Ensure(ctx, cfg.JS, bucket.Spec{
		Name:        cfg.Bucket,
		Description: "meterd aggregators sharing the usage partitions: key = member, expires without heartbeats",
		TTL:         cfg.TTL,
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("share: %w", err)
	}
	s := promreg.On(cfg.Registerer)
	g := &Group{cfg: cfg, log: cfg.Logger.With("component", "share", "member", cfg.Member), kv: kv, workers: map[int]*running{}, built: map[int]Worker{},
		ownedGauge:   s.Gauge("meterd_aggregator_partitions_assigned", "Usage partitions assigned to this aggregator by the shared membership (each written while its lease is held)."),
		membersGauge: s.Gauge("meterd_aggregator_members", "Aggregators sharing the usage partitions, as this one last read the membership."),
		moves:        s.Counter("meterd_aggregator_partition_moves_total", "Usage partitions this aggregator started or stopped because the membership changed."),
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	return g, nil
}

// Run heartbeats, follows the membership and runs the workers of the
// partitions assigned to this member until ctx ends; then it leaves the
// membership, stops every worker (which release their leases) and returns
// nil.
func (g *Group) Run(ctx context.Context) error {
	g.heartbeat.Store(time.Now().UnixNano())
	ctxtime.Every(ctx, g.cfg.Poll, func() { g.round(ctx) })
	// Leave first, so the other members start waiting for the leases that
	// the workers release next.
	dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	if err := g.kv.Delete(dctx, g.cfg.Member); err != nil {
		g.log.Warn("leave the membership; the key expires by itself", "err", err)
	}
	cancel()
	for _, r := range g.workers {
		if r.stop != nil {
			r.stop()
		}
	}
	for _, r := range g.workers {
		<-r.done
	}
	return nil
}

// Announce heartbeats this member's key, owning nothing, until the returned
// stop is called: a member waiting to start (for an aggregator of every
// partition to stop) is already seen by one, which checks the membership
// each time it takes its lease and steps down (the command's
// refuseBesideShared). Run's heartbeats take over from it.
func (g *Group) Announce(ctx context.Context) (stop func()) {
	entry, _ := json.Marshal(MemberEntry{Member: g.cfg.Member})
	put := func() {
		pctx, cancel := context.WithTimeout(ctx, g.cfg.TTL/2)
		defer cancel()
		if _, err := g.kv.Put(pctx, g.cfg.Member, entry); err != nil && ctx.Err() == nil {
			g.log.Warn("membership heartbeat failed while waiting to start", "err", err)
		}
	}
	put()
	actx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if ctxtime.Sleep(actx, g.cfg.Poll) {
			ctxtime.Every(actx, g.cfg.Poll, put)
		}
	}()
	return sync.OnceFunc(func() { cancel(); <-done })
}

// round heartbeats, reads the membership and applies the assignment.
func (g *Group) round(ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, g.cfg.TTL/2)
	defer cancel()
	g.mu.Lock()
	entry, _ := json.Marshal(MemberEntry{Member: g.cfg.Member, Partitions: slices.Clone(g.owned)})
	g.mu.Unlock()
	if _, err := g.kv.Put(rctx, g.cfg.Member, entry); err != nil {
		if ctx.Err() == nil {
			g.log.Warn("membership heartbeat failed; the partitions stay as they are", "err", err)
		}
		return
	}
	g.heartbeat.Store(time.Now().UnixNano())
	members, err := g.liveMembers(rctx)
	if err != nil {
		if ctx.Err() == nil {
			g.log.Warn("read the membership; the partitions stay as they are", "err", err)
		}
		return
	}
	owned := Assign(members, g.cfg.Partitions)[g.cfg.Member]
	g.mu.Lock()
	changed := !slices.Equal(members, g.members) || !slices.Equal(owned, g.owned)
	g.members, g.owned = members, owned
	g.mu.Unlock()
	g.membersGauge.Set(float64(len(members)))
	g.ownedGauge.Set(float64(len(owned)))
	if changed {
		g.log.Info("membership", "members", members, "partitions", owned)
	}
	g.apply(ctx, owned)
}

// liveMembers lists the live members: the keys of the bucket, whose TTL
// removed those that stopped heartbeating.
func (g *Group) liveMembers(ctx context.Context) ([]string, error) {
	keys, err := g.kv.Keys(ctx)
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		return []string{g.cfg.Member}, nil
	}
	if err != nil {
		return nil, err
	}
	// Our own heartbeat was acknowledged just before.
	if !slices.Contains(keys, g.cfg.Member) {
		keys = append(keys, g.cfg.Member)
	}
	slices.Sort(keys)
	return keys, nil
}

// apply starts the workers of the partitions in owned that do not run and
// stops those that run and are not in owned.
func (g *Group) apply(ctx context.Context, owned []int) {
	for p, r := range g.workers {
		if r.stop != nil && !slices.Contains(owned, p) {
			g.log.Info("partition moves away; releasing it", "partition", p)
			r.stop()
			r.stop = nil
			g.moves.Inc()
		}
	}
	for _, p := range owned {
		r := g.workers[p]
		if r == nil {
			r = &running{done: make(chan struct{})}
			close(r.done)
			g.workers[p] = r
		}
		if r.stop != nil {
			continue
		}
		wctx, stop := context.WithCancel(ctx)
		prev, done := r.done, make(chan struct{})
		r.stop, r.done = stop, done
		g.moves.Inc()
		g.log.Info("partition assigned; taking its lease", "partition", p)
		go func() {
			defer close(done)
			<-prev // a run stopped a moment ago releases its lease first
			// The runs of a partition follow each other (prev), so r.w
			// is theirs. Building a worker (a store, its index) takes
			// a while: here, not in the round, whose heartbeats must go on.
			for wctx.Err() == nil {
				if r.w == nil {
					w, err := g.cfg.Worker(p)
					if err != nil {
						g.log.Error("build the worker of a partition; retrying", "partition", p, "err", err)
						ctxtime.Sleep(wctx, g.cfg.Poll)
						continue
					}
					r.w = w
					g.mu.Lock()
					g.built[p] = w
					g.mu.Unlock()
				}
				// A worker that stops by itself while the partition is
				// still assigned is started again.
				err := r.w.Run(wctx)
				if wctx.Err() == nil {
					g.log.Error("partition worker stopped; starting it again", "partition", p, "err", err)
					ctxtime.Sleep(wctx, g.cfg.Poll)
				}
			}
		}()
	}
}

// Owned returns the partitions assigned to this member and the live
// members, as of the last round.
func (g *Group) Owned() (partitions []int, members []string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.owned), slices.Clone(g.members)
}

// Ready fails when the membership bucket has not acknowledged a heartbeat
// for TTL (the other members may have taken the partitions over), or a
// running worker is not ready.
func (g *Group) Ready(ctx context.Context) error {
	if since := time.Since(time.Unix(0, g.heartbeat.Load())); since > g.cfg.TTL {
		return fmt.Errorf("share: no membership heartbeat for %s", since.Round(time.Second))
	}
	g.mu.Lock()
	owned := slices.Clone(g.owned)
	g.mu.Unlock()
	var errs []error
	for _, p := range owned {
		g.mu.Lock()
		w := g.built[p]
		g.mu.Unlock()
		if w != nil {
			if err := w.Ready(ctx); err != nil {
				errs = append(errs, fmt.Errorf("partition %d: %w", p, err))
			}
		}
	}
	return errors.Join(errs...)
}
