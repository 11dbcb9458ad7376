// Package keyindex is a writer's local index of the events its store holds:
// a 128-bit key of each event's (tenant, id) and the minute it was first
// written, in an embedded LSM tree (github.com/cockroachdb/pebble) with a
// Bloom filter on every table. It answers "which of these K events are
// held?" at a cost that does not grow with the number of keys held: a key
// that is absent is rejected by one in-memory filter probe per level of the
// tree (about 1 % of the probes then read one 4 KiB block), and a key that is
// present costs one block read per level at most.
//
// The index is never the source of truth. A store keeps its events, and the
// index can always be rebuilt from them (Load) or brought up to date with
// the events written since a point in time (Add of what the store reports);
// a store that uses it owns the argument that it is complete before each
// lookup (aggregator/clickhouse's package documentation gives it).
//
// # Keys
//
// Key is the first 128 bits of SHA-256 over tenant, NUL, id (a tenant name
// cannot hold NUL, so the encoding is unambiguous). Two different events
// share a key with probability below 2^-128 per pair: at a trillion events
// held and a trillion looked up, below 10^-14 in all. That is the bound
// ClickHouse itself accepts for its insert deduplication (128-bit SipHash of
// a block); a cryptographic hash is used rather than a fast one because a
// tenant chooses its own ids: with FNV or xxHash a tenant could craft two ids
// of one key and have the second event dropped, unbilled.
//
// # Horizon
//
// A key is held for Horizon after the minute it was added; a lookup later
// than that answers "not held" whether or not Expire has deleted it yet, so
// the answer never depends on when a sweep ran. Expire deletes expired keys
// to bound the disk.
//
// # Cost
//
// Per billion keys: about 21 GiB of disk (16-byte keys and 4-byte values,
// compressed by prefix sharing within blocks), and 1.2 GiB of Bloom filters
// (10 bits a key), which must fit in the block cache (CacheBytes) for absent
// keys to stay free of reads. aggregator/BENCHMARKS.md has the measurements.
package keyindex

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"

	"github.com/meterd/meterd/schemas"
)

// Key identifies an event: the first 16 bytes of SHA-256 of tenant, NUL, id.
type Key [16]byte

// KeyOf returns the key of the event id of tenant.
func KeyOf(tenant, id string) Key {
	var buf [256]byte
	b := append(append(append(buf[:0], tenant...), 0), id...)
	sum := sha256.Sum256(b)
	return Key(sum[:16])
}

// DefaultHorizon is how long a key is held by default: the late-event bound
// and 5 minutes of clock skew. An event that carries its own time is refused
// at ingest once that time is older than the late-event bound, so no copy of
// it can reach the store later than the horizon after its first copy.
const DefaultHorizon = schemas.DefaultMaxAge + 5*time.Minute

// DefaultCacheBytes is the default block cache: the Bloom filters of about
// 200 million keys.
const DefaultCacheBytes = 256 << 20

// Options configures an Index.
type Options struct {
	// Dir is the index's directory; it is created if missing.
	Dir string
	// Horizon is how long a key is held after it was added (DefaultHorizon
	// if 0).
	Horizon time.Duration
	// CacheBytes is the block cache (DefaultCacheBytes if 0).
	CacheBytes int64
	// Logger receives the LSM's log lines; nil discards them.
	Logger *slog.Logger
}

// Index is the key index. Its methods are safe for concurrent use.
type Index struct {
	db      *pebble.DB
	opts    *pebble.Options
	horizon time.Duration
	dir     string

	// mu orders Add against Expire's deletions (a key re-added while a sweep
	// found it expired must not be deleted) and every use of db against
	// Reset, which replaces it.
	mu sync.Mutex
}

// metaKey holds the Mark. Keys are 16 bytes, so a key of another length can
// never be an event's.
var metaKey = []byte("\x00meterd-keyindex-mark")

// Mark says what an index holds: the events of Store written before Through.
// It is written with every Add, atomically with the keys, so whatever prefix
// of the writes survives a crash, the Mark read back describes it.
type Mark struct {
	// Store identifies the store whose events the index holds.
	Store string `json:"store"`
	// Through is a time before which every event the store holds (and
	// wrote within the horizon) is in the index, on the store's clock.
	Through time.Time `json:"through"`
}

// Open opens (or creates) the index in o.Dir.
func Open(o Options) (*Index, error) {
	if o.Dir == "" {
		return nil, errors.New("keyindex: a directory is required")
	}
	if o.Horizon <= 0 {
		o.Horizon = DefaultHorizon
	}
	if o.CacheBytes <= 0 {
		o.CacheBytes = DefaultCacheBytes
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("keyindex: %w", err)
	}
	popts := &pebble.Options{
		Cache:        pebble.NewCache(o.CacheBytes),
		MemTableSize: 32 << 20,
		Logger:       logger{log.With("component", "keyindex")},
		// Lookups are of whole keys; every level filters them.
		Comparer: pebble.DefaultComparer,
	}
	for i := range popts.Levels {
		popts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
		popts.Levels[i].FilterType = pebble.TableFilter
	}
	popts.EnsureDefaults()
	db, err := pebble.Open(o.Dir, popts)
	if err != nil {
		popts.Cache.Unref()
		return nil, fmt.Errorf("keyindex: open %s: %w", o.Dir, err)
	}
	return &Index{db: db, opts: popts, horizon: o.Horizon, dir: o.Dir}, nil
}

// Reset empties the index: every key and the mark are gone.
func (ix *Index) Reset() error {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if err := ix.db.Close(); err != nil {
		return fmt.Errorf("keyindex: reset: %w", err)
	}
	if err := os.RemoveAll(ix.dir); err != nil {
		return fmt.Errorf("keyindex: reset: %w", err)
	}
	db, err := pebble.Open(ix.dir, ix.opts)
	if err != nil {
		return fmt.Errorf("keyindex: reset: %w", err)
	}
	ix.db = db
	return nil
}

// Horizon returns how long a key is held.
func (ix *Index) Horizon() time.Duration { return ix.horizon }

// minuteOf is the value stored for a key added at t.
func minuteOf(t time.Time) uint32 { return uint32(max(t.Unix(), 0) / 60) }

// live reports whether a key added in minute m is held at now: until the
// horizon after the end of that minute.
func (ix *Index) live(m uint32, now time.Time) bool {
	return time.Unix(int64(m+1)*60, 0).Add(ix.horizon).After(now)
}

// Held reports, for each key, whether the index holds it at now.
func (ix *Index) Held(keys []Key, now time.Time) ([]bool, error) {
	held := make([]bool, len(keys))
	if len(keys) == 0 {
		return held, nil
	}
	// Seeking in key order lets each seek continue from the last.
	order := make([]int32, len(keys))
	for i := range order {
		order[i] = int32(i)
	}
	slices.SortFunc(order, func(a, b int32) int { return compareKeys(&keys[a], &keys[b]) })
	ix.mu.Lock()
	defer ix.mu.Unlock()
	// Pebble skips the filters of the last level unless asked: there most
	// lookups of its users find their key. Here most keys are absent.
	it, err := ix.db.NewIter(&pebble.IterOptions{UseL6Filters: true})
	if err != nil {
		return nil, fmt.Errorf("keyindex: %w", err)
	}
	defer it.Close()
	for _, i := range order {
		k := keys[i][:]
		if !it.SeekPrefixGE(k) || string(it.Key()) != string(k) {
			continue
		}
		v, err := it.ValueAndErr()
		if err != nil {
			return nil, fmt.Errorf("keyindex: %w", err)
		}
		if len(v) == 4 && ix.live(binary.BigEndian.Uint32(v), now) {
			held[i] = true
		}
	}
	if err := it.Error(); err != nil {
		return nil, fmt.Errorf("keyindex: %w", err)
	}
	return held, nil
}

// compareKeys orders keys as bytes, compared as two big-endian integers.
func compareKeys(a, b *Key) int {
	be := binary.BigEndian
	return cmp.Or(cmp.Compare(be.Uint64(a[:8]), be.Uint64(b[:8])), cmp.Compare(be.Uint64(a[8:]), be.Uint64(b[8:])))
}

// Add records keys as added at at, and the mark m, in one atomic write. The
// write is not synced: a process crash keeps it (it is in the OS's cache),
// and after a machine crash the index holds a prefix of its writes whose
// Mark describes it.
func (ix *Index) Add(keys []Key, at time.Time, m Mark) error {
	mark, err := json.Marshal(m)
	if err != nil {
		return err
	}
	// In key order, the memtable inserts each key next to the one before
	// instead of searching its skiplist from the top: a third of the cost.
	sorted := slices.Clone(keys)
	slices.SortFunc(sorted, func(a, b Key) int { return compareKeys(&a, &b) })
	b := ix.db.NewBatchWithSize(len(keys)*30 + 64)
	defer b.Close()
	var v [4]byte
	binary.BigEndian.PutUint32(v[:], minuteOf(at))
	for i := range sorted {
		if err := b.Set(sorted[i][:], v[:], nil); err != nil {
			return fmt.Errorf("keyindex: add: %w", err)
		}
	}
	if err := b.Set(metaKey, mark, nil); err != nil {
		return fmt.Errorf("keyindex: add: %w", err)
	}
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if err := b.Commit(pebble.NoSync); err != nil {
		return fmt.Errorf("keyindex: add: %w", err)
	}
	return nil
}

// Mark returns the mark of the last Add; ok is false when there is none.
func (ix *Index) Mark() (m Mark, ok bool, err error) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	v, closer, err := ix.db.Get(metaKey)
	if errors.Is(err, pebble.ErrNotFound) {
		return Mark{}, false, nil
	}
	if err != nil {
		return Mark{}, false, fmt.Errorf("keyindex: read mark: %w", err)
	}
	defer closer.Close()
	if err := json.Unmarshal(v, &m); err != nil {
		return Mark{}, false, fmt.Errorf("keyindex: read mark: %w", err)
	}
	return m, true, nil
}

// Flush writes the memtable to disk and syncs it.
func (ix *Index) Flush() error {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if err := ix.db.Flush(); err != nil {
		return fmt.Errorf("keyindex: flush: %w", err)
	}
	return nil
}

// Close closes the index; it is idempotent.
func (ix *Index) Close() error {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.db == nil {
		return nil
	}
	err := ix.db.Close()
	ix.db = nil
	ix.opts.Cache.Unref()
	if err != nil {
		return fmt.Errorf("keyindex: close: %w", err)
	}
	return nil
}

// logger sends pebble's log lines to slog.
type logger struct{ log *slog.Logger }

func (l logger) Infof(format string, args ...any)  { l.log.Debug(fmt.Sprintf(format, args...)) }
func (l logger) Errorf(format string, args ...any) { l.log.Error(fmt.Sprintf(format, args...)) }
func (l logger) Fatalf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...))
	panic(fmt.Sprintf(format, args...))
}
