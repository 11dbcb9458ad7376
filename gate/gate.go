// Package gate answers "is this tenant blocked?" from memory, in
// nanoseconds and without a network call, for gateways and the collector's
// /v1/check (docs/architecture.md#freshness-and-the-gate).
//
// A Gate watches the blocklist KV bucket the enforcer writes (key = tenant,
// value = schemas.Decision JSON; a delete or purge unblocks the tenant) and
// keeps an immutable snapshot of the blocks behind an atomic pointer, in
// pages of about 128 blocks so that an update copies one page, not every
// block (snapshot.go). Each
// block's 402 answer is rendered once, when its decision arrives, so Check
// allocates nothing and a caller writes the answer without encoding.
//
// Entries apply in bucket order. A decision with a lower version than the
// one held for its tenant is ignored (a reload or a restored bucket may
// replay older values); a value that is not a valid decision for its key is
// logged, counted and ignored, so it neither unblocks nor blocks anyone.
// Whatever arrives at once makes one new snapshot. After a
// reconnect, a failed watch, or a watch silent for 2×StaleAfter, the gate
// watches anew and, once the replay is complete, swaps in exactly what the
// bucket holds; until then it answers from the previous snapshot.
//
// The gate also tracks staleness: the time since it last received anything
// from the bucket, a decision or the enforcer's heartbeat
// (schemas.HeartbeatKey). Past Config.StaleAfter its verdicts are marked
// stale; tenants it holds a block for stay blocked, and the others get
// Config.StalePolicy.
package gate

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/schemas"
)

// Policy is what a stale gate answers for tenants it holds no decision for.
type Policy uint8

// The stale policies. Allow keeps an API up while the enforcer is away (an
// overshoot bounded by the outage); Deny protects revenue first.
const (
	// Allow lets requests of tenants without a decision through.
	Allow Policy = iota
	// Deny answers them with the shared stale block (503, reason "stale").
	Deny
)

// String returns "allow" or "deny".
func (p Policy) String() string {
	switch p {
	case Allow:
		return "allow"
	case Deny:
		return "deny"
	default:
		return fmt.Sprintf("Policy(%d)", uint8(p))
	}
}

// DefaultStaleAfter is the default of Config.StaleAfter: a few missed
// heartbeats of the enforcer.
const DefaultStaleAfter = 15 * time.Second

// ErrNotReady is returned by Ready until the gate loaded the bucket once.
var ErrNotReady = errors.New("gate: blocklist not loaded yet")

// Config configures a Gate.
type Config struct {
	// NATS is the connection the bucket is watched on. Required. The gate
	// relies on it reconnecting by itself (broker.Connect does) and stops
	// only when it is closed.
	NATS *nats.Conn
	// Bucket is the KV bucket of decisions (default schemas.BlocklistBucket).
	// The gate never creates it: it waits until the enforcer has.
	Bucket string
	// StaleAfter is how long the gate may receive nothing, neither a
	// decision nor a heartbeat, before its verdicts are stale (default
	// 15s). Keep it several heartbeat intervals long. A watch silent for
	// twice as long is replaced, in case it broke without saying so.
	StaleAfter time.Duration
	// StalePolicy is what a stale gate answers for tenants it holds no
	// decision for (default Allow).
	StalePolicy Policy
	// Now is the clock staleness is measured with (default time.Now).
	Now func() time.Time
	// Logger receives the gate's logs; nil discards them.
	Logger *slog.Logger
	// Observer receives the gate's measurements (default: none kept);
	// gateprom.New returns one that exports them to Prometheus.
	Observer Observer
}

// Validate checks cfg and fills in defaults.
func (c *Config) Validate() error {
	var errs []error
	if c.NATS == nil {
		errs = append(errs, errors.New("gate: NATS connection is required"))
	}
	if c.StaleAfter < 0 {
		errs = append(errs, errors.New("gate: StaleAfter must not be negative"))
	}
	if c.StalePolicy > Deny {
		errs = append(errs, fmt.Errorf("gate: unknown stale policy %s", c.StalePolicy))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if c.Bucket == "" {
		c.Bucket = schemas.BlocklistBucket
	}
	if c.StaleAfter == 0 {
		c.StaleAfter = DefaultStaleAfter
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Observer == nil {
		c.Observer = nopObserver{}
	}
	return nil
}

// never is the lastSeen of a gate that has received nothing: stale at any
// clock value, and far enough from math.MinInt64 that subtracting it from
// the clock cannot overflow.
const never = math.MinInt64 / 2

// Gate is the in-memory view of the blocklist. Check, Ready, Snapshot and
// Version are safe for concurrent use; Run keeps the view current.
type Gate struct {
	// Read by every Check.
	snap       atomic.Pointer[snapshot]
	clock      atomic.Int64 // ns since born, refreshed by Run every clockTick
	lastSeen   atomic.Int64 // ns since born when the last entry was received, or never
	staleAfter int64        // ns
	staleBlock *Block       // nil under the Allow policy

	cfg  Config
	log  *slog.Logger
	js   jetstream.JetStream
	obs  Observer
	born time.Time

	ready   atomic.Bool
	running atomic.Bool
	lastErr atomic.Pointer[error] // why the last watch failed, for Ready
}

// New builds a gate. It holds no decision and is stale until Run loaded the
// bucket.
func New(cfg Config) (*Gate, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	js, err := jetstream.New(cfg.NATS)
	if err != nil {
		return nil, fmt.Errorf("gate: jetstream: %w", err)
	}
	g := &Gate{
		staleAfter: int64(cfg.StaleAfter),
		cfg:        cfg,
		log:        cfg.Logger.With("component", "gate"),
		js:         js,
		obs:        cfg.Observer,
		born:       cfg.Now(),
	}
	if cfg.StalePolicy == Deny {
		g.staleBlock = newStaleBlock(cfg.StaleAfter)
	}
	g.snap.Store(newSnapshot(maphash.MakeSeed()))
	g.lastSeen.Store(never)
	g.obs.WatchStaleness(g.staleness)
	return g, nil
}

// Check returns the verdict for tenant from the current snapshot. It
// allocates nothing and never waits: a gateway may call it on every request.
//
// A tenant the gate holds a block for is blocked, stale or not. Another
// tenant passes, unless the gate is stale under the Deny policy: then it
// gets the shared stale block (503). Staleness is measured on a clock Run
// advances every 100 ms (StaleAfter/10 when shorter); a gate whose Run has
// not loaded the bucket yet, or has returned, is stale.
func (g *Gate) Check(tenant string) Verdict {
	b := g.snap.Load().get(tenant)
	if g.clock.Load()-g.lastSeen.Load() <= g.staleAfter {
		return Verdict{Block: b}
	}
	if b == nil {
		b = g.staleBlock
	}
	return Verdict{Block: b, Stale: true}
}

// Ready returns nil once the watch delivered every value the bucket held
// when it started, and from then on: a later outage makes the gate stale
// (see Check), not unready, so gateways keep answering from the last
// snapshot. Before that it returns ErrNotReady, with the last watch error.
func (g *Gate) Ready(context.Context) error {
	if g.ready.Load() {
		return nil
	}
	if err := g.lastErr.Load(); err != nil {
		return fmt.Errorf("%w: %w", ErrNotReady, *err)
	}
	return ErrNotReady
}

// Snapshot returns the decisions the gate holds, sorted by tenant. The
// slice is the caller's.
func (g *Gate) Snapshot() []schemas.Decision {
	s := g.snap.Load()
	out := make([]schemas.Decision, 0, s.blocked)
	s.each(func(_ string, b *Block) { out = append(out, b.Decision) })
	slices.SortFunc(out, func(a, b schemas.Decision) int { return cmp.Compare(a.Tenant, b.Tenant) })
	return out
}

// Version grows with every change applied to the snapshot (a block added,
// replaced or removed) and stays put otherwise, so it can serve as an ETag.
// Read it before Snapshot: the decisions are then at least as new as the
// ETag, never older. It is local to this gate: two gates count differently.
func (g *Gate) Version() uint64 {
	return g.snap.Load().version
}

// Run watches the bucket and keeps the snapshot current until ctx ends,
// then returns nil; call it once. It waits for the bucket to exist, and
// outlives NATS restarts and broken watches: it watches again, with
// backoff, and after every reconnect. Meanwhile Check answers from the last
// snapshot. Run returns an error only when the NATS connection is closed;
// once Run has returned, the gate is stale.
func (g *Gate) Run(ctx context.Context) error {
	if !g.running.CompareAndSwap(false, true) {
		return errors.New("gate: Run called twice")
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
		g.lastSeen.Store(never)
	}()
	wg.Go(func() { g.tick(ctx) })
	g.log.Info("watching the blocklist", "bucket", g.cfg.Bucket, "stale_after", g.cfg.StaleAfter, "stale_policy", g.cfg.StalePolicy)
	return g.watchLoop(ctx)
}

// clockTick is how often Run refreshes the clock Check reads: reading the
// system clock in Check would cost as much as the rest of it.
func (g *Gate) clockTick() time.Duration {
	return max(min(100*time.Millisecond, g.cfg.StaleAfter/10), time.Millisecond)
}

// since converts t to the gate's clock: nanoseconds since New, using the
// monotonic clock when t carries it.
func (g *Gate) since(t time.Time) int64 {
	return max(int64(t.Sub(g.born)), never)
}

// tick advances the clock Check reads and logs when the gate turns stale or
// current again.
func (g *Gate) tick(ctx context.Context) {
	t := time.NewTicker(g.clockTick())
	defer t.Stop()
	stale := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		g.clock.Store(g.since(g.cfg.Now()))
		was := stale
		stale = g.ready.Load() && g.Check("").Stale // before, Ready tells
		switch {
		case stale && !was:
			g.log.Warn("blocklist stale: nothing received from the bucket", "for_more_than", g.cfg.StaleAfter, "stale_policy", g.cfg.StalePolicy)
		case !stale && was:
			g.log.Info("blocklist current again")
		}
	}
}

// staleness returns how long the gate has received nothing; before the
// first entry, the time since New.
func (g *Gate) staleness() time.Duration {
	last := g.lastSeen.Load()
	if last == never {
		last = 0
	}
	return time.Duration(g.since(g.cfg.Now()) - last)
}
