// Package lease is a lease with a fencing token on a JetStream key-value
// bucket: at most one process at a time holds the lease of a key, and a
// holder that stopped renewing (crashed, cut off, or frozen past its lease:
// SIGSTOP, a long GC pause, a suspended VM) is replaced within the lease
// duration.
//
// # The protocol
//
// The lease of a key is the key's entry in the bucket (meterd-leases). Every
// write is a compare-and-set on the key's revision, which JetStream assigns
// and which only grows:
//
//   - A process acquires a missing (or deleted) key with Create (expected
//     revision 0). Its fencing token is the revision of that write.
//   - A process that finds the key held watches it on its own clock: when
//     the revision it reads has not changed for a whole lease duration since
//     it first read it, the holder stopped renewing, and the process takes
//     the key over with Update expecting that revision. Of several waiting
//     processes one wins the compare-and-set; the others see a new revision
//     and wait again.
//   - The holder renews with Update expecting the revision of its own last
//     write. If that fails because the revision moved, another process took
//     the lease: the holder has lost it and must not write again.
//   - A holder that stops cleanly deletes the key (expecting its revision),
//     so a waiting process takes over at its next poll.
//
// # Why a zombie cannot write
//
// No clocks are compared between machines: each side measures time on its
// own monotonic clock (which runs on during SIGSTOP), so only clock rates
// need to agree. Say a renewal request leaves the holder at its time s and
// succeeds with revision r. A waiter reads r no earlier than r was written,
// which is after s, and takes the key over no earlier than a lease duration
// D after that. So no one else holds the lease before s + D. The holder
// treats its lease as safe only until s + D − D/5 (the margin absorbs clock
// rate differences and the last bytes of a write in flight): Renew returns
// that time, and a writer bounds every store write by it (a context
// deadline, checked against the clock again just before data leaves the
// process, so a write frozen past it is abandoned when the process wakes).
//
// A holder therefore writes in one of two ways: renew-then-write, where each
// write is preceded by a successful compare-and-set on its own revision (a
// zombie's renewal fails: the revision moved when it was taken over) and ends
// before the lease it renewed can be taken; or, if the renewal failed for a
// transient reason (NATS unreachable), within the time left of its last
// renewal and only while at least a quarter of the lease is left. When
// neither holds, Renew reports ErrLost and the holder steps down.
//
// Writes that reached the store before the lease changed hands are the
// store's to finish or discard before the new holder writes
// (aggregator/clickhouse waits, before its first write as a new holder,
// until no insert of the previous holder still runs on the server; SQLite's
// transactions make them atomic). What remains is the moment between a
// holder's last clock check and its write reaching the store: a process
// frozen exactly there, for longer than the margin, would write after its
// lease. The window is the few microseconds between a clock read and a
// socket write; only a store that checks the token itself closes it.
package lease

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/bucket"
	"github.com/meterd/meterd/internal/ctxtime"
)

// Defaults of Config.
const (
	DefaultBucket   = "meterd-leases"
	DefaultDuration = 15 * time.Second
)

// ErrLost is returned by Renew once the lease is no longer held: another
// process took it over, or it could not be renewed in time.
var ErrLost = errors.New("lease: lost")

// Holder is what a single writer needs of its lease; *Lease implements it,
// and tests wrap it (to freeze renewals, for one).
type Holder interface {
	// Acquire blocks until the lease is held and returns its fencing token,
	// or returns ctx's error.
	Acquire(ctx context.Context) (uint64, error)
	// Renew extends the lease and returns the time every write must end
	// before; an error means the lease is lost.
	Renew(ctx context.Context) (time.Time, error)
	// Release gives the lease up for another process to take at once.
	Release(ctx context.Context) error
	// Duration is the lease duration: a holder that stops renewing is
	// replaced within it.
	Duration() time.Duration
	// Answered is when the lease's bucket last answered.
	Answered() time.Time
}

var _ Holder = (*Lease)(nil)

// Config configures a Lease.
type Config struct {
	// JS is the JetStream context of the bucket. Required.
	JS jetstream.JetStream
	// Bucket is the key-value bucket of the leases (default meterd-leases),
	// created if missing with Replicas replicas (default 1).
	Bucket   string
	Replicas int
	// Key names what the lease is for, one key per writer scope (a valid
	// key-value key: letters, digits, '-', '_', '/', '=', '.'). Required.
	Key string
	// Holder names this process in the entry, for operators (default
	// hostname-pid).
	Holder string
	// Duration is how long a lease lasts without renewal, so the longest a
	// waiting process takes to replace a holder that stopped (default 15s;
	// at least 1s). The holder renews every Duration/3.
	Duration time.Duration
	Logger   *slog.Logger
}

// Validate checks c and fills in defaults.
func (c *Config) Validate() error {
	if c.JS == nil {
		return errors.New("lease: JetStream is required")
	}
	if c.Key == "" {
		return errors.New("lease: key is required")
	}
	if c.Bucket == "" {
		c.Bucket = DefaultBucket
	}
	if c.Holder == "" {
		host, _ := os.Hostname()
		c.Holder = host + "-" + strconv.Itoa(os.Getpid())
	}
	if c.Duration == 0 {
		c.Duration = DefaultDuration
	}
	if c.Duration < time.Second {
		return fmt.Errorf("lease: duration %s is below 1s", c.Duration)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Entry is the value of a lease's key.
type Entry struct {
	Holder string `json:"holder"`
	// Token is the revision at which Holder acquired the lease; it stays the
	// same through renewals and grows from one holder to the next.
	Token uint64 `json:"token"`
	// Duration is the holder's lease duration, for operators reading the
	// entry; waiters use their own.
	Duration string `json:"duration"`
	// RenewedAt is the holder's clock at its last renewal, for operators
	// only: no decision compares it with another clock.
	RenewedAt time.Time `json:"renewed_at"`
}

// Lease is one process's lease on one key. Acquire, Renew and Release may be
// called from different goroutines.
type Lease struct {
	cfg Config
	kv  jetstream.KeyValue
	log *slog.Logger

	mu        sync.Mutex
	rev       uint64 // revision of our last write, 0 when not held
	token     uint64
	safeUntil time.Time

	// answered is when the bucket last answered a read or write (unix
	// nanos): a waiter that cannot read the lease cannot take it over.
	answered atomic.Int64
	held     atomic.Bool
}

// New creates (or updates) the bucket and returns a Lease that is not held.
func New(ctx context.Context, cfg Config) (*Lease, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	kv, err := bucket.Ensure(ctx, cfg.JS, bucket.Spec{
		Name:        cfg.Bucket,
		Description: "meterd leases of single writers: key = writer scope, value = holder and fencing token",
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("lease: %w", err)
	}
	l := &Lease{cfg: cfg, kv: kv, log: cfg.Logger.With("lease", cfg.Key)}
	l.answered.Store(time.Now().UnixNano())
	return l, nil
}

// Duration is the lease duration.
func (l *Lease) Duration() time.Duration { return l.cfg.Duration }

// margin is the part of a lease the holder never writes in.
func (l *Lease) margin() time.Duration { return l.cfg.Duration / 5 }

// poll is how often a waiting process reads the key.
func (l *Lease) poll() time.Duration { return max(l.cfg.Duration/10, 50*time.Millisecond) }

func (l *Lease) entry(token uint64) []byte {
	data, _ := json.Marshal(Entry{Holder: l.cfg.Holder, Token: token, Duration: l.cfg.Duration.String(), RenewedAt: time.Now().UTC()})
	return data
}

// Acquire blocks until the lease is held and returns its fencing token, or
// returns ctx's error. A missing key is taken at once; a held one once its
// revision stood still for a whole lease duration.
func (l *Lease) Acquire(ctx context.Context) (uint64, error) {
	var (
		seenRev    uint64
		seenAt     time.Time
		lastHolder string
	)
	for {
		sent := time.Now()
		e, err := l.get(ctx)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
			rev, err := l.kv.Create(ctx, l.cfg.Key, l.entry(0))
			if err == nil {
				l.won(rev, sent, "")
				return rev, nil
			}
			if !errors.Is(err, jetstream.ErrKeyExists) && ctx.Err() == nil {
				l.log.Warn("create lease; retrying", "err", err)
			}
		case err != nil:
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			l.log.Warn("read lease; retrying", "err", err)
		case e.Revision() != seenRev:
			seenRev, seenAt = e.Revision(), time.Now()
			var cur Entry
			_ = json.Unmarshal(e.Value(), &cur)
			if cur.Holder != lastHolder {
				lastHolder = cur.Holder
				l.log.Info("lease held by another process; standing by", "holder", cur.Holder, "token", cur.Token)
			}
		case time.Since(seenAt) >= l.cfg.Duration:
			// The holder did not renew for a whole lease: take it over,
			// unless someone else did first.
			sent = time.Now()
			rev, err := l.kv.Update(ctx, l.cfg.Key, l.entry(0), seenRev)
			if err == nil {
				l.won(rev, sent, lastHolder)
				return rev, nil
			}
			if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) && ctx.Err() == nil {
				l.log.Warn("take over lease; retrying", "err", err)
			}
		}
		if !ctxtime.Sleep(ctx, l.poll()) {
			return 0, ctx.Err()
		}
	}
}

// won records the lease acquired with revision rev by a write sent at sent.
// The entry written names token 0 (the revision is not known before the
// write); the first renewal writes the token.
func (l *Lease) won(rev uint64, sent time.Time, from string) {
	l.mu.Lock()
	l.rev, l.token, l.safeUntil = rev, rev, sent.Add(l.cfg.Duration-l.margin())
	l.mu.Unlock()
	l.held.Store(true)
	l.answered.Store(time.Now().UnixNano())
	if from != "" {
		l.log.Warn("took over the lease of a holder that stopped renewing", "previous_holder", from, "token", rev)
	} else {
		l.log.Info("acquired the lease", "token", rev)
	}
}

func (l *Lease) get(ctx context.Context) (jetstream.KeyValueEntry, error) {
	e, err := l.kv.Get(ctx, l.cfg.Key)
	if err == nil || errors.Is(err, jetstream.ErrKeyNotFound) {
		l.answered.Store(time.Now().UnixNano())
	}
	return e, err
}

// Renew extends the lease and returns the time until which the holder may
// write, as the package documentation explains: a writer must finish every
// write before it. A renewal that fails for a transient reason leaves the
// time of the last one, as long as a quarter of the lease is left. Renew
// returns an error wrapping ErrLost when the lease is not held (any more);
// it is never held again by this Lease until Acquire.
func (l *Lease) Renew(ctx context.Context) (time.Time, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.rev == 0 {
		return time.Time{}, ErrLost
	}
	sent := time.Now()
	rctx, cancel := context.WithDeadline(ctx, l.safeUntil)
	defer cancel()
	rev, err := l.kv.Update(rctx, l.cfg.Key, l.entry(l.token), l.rev)
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		// A renewal whose answer was lost (a timeout, a cancelled
		// context) may have been written: then the entry is still ours.
		if cur, ok := l.ours(rctx); ok {
			l.rev = cur
			sent = time.Now()
			rev, err = l.kv.Update(rctx, l.cfg.Key, l.entry(l.token), l.rev)
		}
	}
	switch {
	case err == nil:
		l.rev, l.safeUntil = rev, sent.Add(l.cfg.Duration-l.margin())
		l.answered.Store(time.Now().UnixNano())
		return l.safeUntil, nil
	case errors.Is(err, jetstream.ErrKeyRevisionMismatch):
		l.lose()
		return time.Time{}, fmt.Errorf("%w: another process took it over (token %d)", ErrLost, l.token)
	case ctx.Err() != nil:
		return time.Time{}, ctx.Err()
	case time.Until(l.safeUntil) < l.cfg.Duration/4:
		l.lose()
		return time.Time{}, fmt.Errorf("%w: not renewed in time: %w", ErrLost, err)
	}
	l.log.Warn("renew lease failed; still held", "err", err, "safe_for", time.Until(l.safeUntil).Round(time.Millisecond))
	return l.safeUntil, nil
}

// ours returns the key's revision if its entry is this holder's of the
// current token: no other process wrote it since, whatever revision it has.
func (l *Lease) ours(ctx context.Context) (uint64, bool) {
	e, err := l.get(ctx)
	if err != nil {
		return 0, false
	}
	var cur Entry
	if json.Unmarshal(e.Value(), &cur) != nil || cur.Holder != l.cfg.Holder {
		return 0, false
	}
	// The entry of the acquisition names token 0; renewals name the token.
	if cur.Token != l.token && !(cur.Token == 0 && e.Revision() == l.token) {
		return 0, false
	}
	return e.Revision(), true
}

func (l *Lease) lose() {
	l.rev = 0
	l.held.Store(false)
}

// Held reports whether the lease is held, as of the last Acquire or Renew.
func (l *Lease) Held() bool { return l.held.Load() }

// Answered is when the bucket last answered a read or write of the lease.
func (l *Lease) Answered() time.Time { return time.Unix(0, l.answered.Load()) }

// Release gives the lease up at once, so a waiting process takes over at
// its next poll instead of after a lease duration. It does nothing when the
// lease is not held; a failed release leaves the lease to expire.
func (l *Lease) Release(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.rev == 0 {
		return nil
	}
	rev := l.rev
	err := l.kv.Delete(ctx, l.cfg.Key, jetstream.LastRevision(rev))
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		if cur, ok := l.ours(ctx); ok { // a renewal cut short was written
			err = l.kv.Delete(ctx, l.cfg.Key, jetstream.LastRevision(cur))
		}
	}
	l.lose()
	if err != nil {
		return fmt.Errorf("lease: release: %w", err)
	}
	l.log.Info("released the lease", "token", l.token)
	return nil
}
