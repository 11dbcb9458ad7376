// Package keyindex is a writer's local index of the events its store holds:
// a 128-bit key of each event's (tenant, id) and the minute it was first
// written, in an embedded LSM tree (github.com/cockroachdb/pebble) with a
// Bloom filter on every table and one in memory over all of them. It
// answers "which of these K events are held?" at a cost that does not grow
// with the number of keys held: a key that is absent is rejected by one
// probe of the in-memory filter (about 1 % of them then probe the table
// filter of each generation, and 1 % of those read one 4 KiB block), and a
// key that is present costs one block read per generation at most.
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
// # Recent keys
//
// The keys added since the last spill are held in memory, in a hash map:
// a lookup or an add there costs one probe, where the LSM's memtable (a
// skiplist of a million keys) costs two microseconds a key to search and to
// insert into. When they reach half of BufferBytes they are written,
// sorted, as a generation of their own with the Mark of the last Add, and
// ingested into the LSM (a spill; gens.go). The table is written in the background while the next
// keys fill a new map, and both maps answer lookups until it is ingested.
// Flush and Close spill every key in memory before they return, Expire
// before its sweep, a Loader's Finish its Mark; lookups and Adds go on
// while they wait. A crash loses the keys added since the
// last spill together with their Mark, so the Mark read back still
// describes exactly what the index holds, and the store's catch-up adds
// them again (aggregator/BENCHMARKS.md, "The index's steady state").
//
// # In-memory filter
//
// In front of the LSM, a Bloom filter in memory holds every key the LSM
// holds (filter.go): a key it has not seen, which is most keys looked up,
// costs one cache miss instead of a probe of each level's filter. Close
// saves it, and Open reads it back when it was saved for the generations
// the LSM holds; else (a crash, a file lost or torn) Open builds it by a
// scan of the LSM in the background, as a filter that fills up is rebuilt.
// It gets each spill's and each Loader's keys as they are written; until
// one is in use, lookups go to the LSM.
//
// # Generations
//
// Each spill is a generation, a key range of its own, so it is ingested
// into the LSM's last level without overlapping anything: keys are never
// compacted with the rest of the tree. Generations of about one size are
// merged in the background, eight at a time, up to about 256 million keys;
// a Loader writes one per eighth of the horizon. Expire excises a
// generation whose keys have all expired, whole (gens.go).
//
// # Cost
//
// Per billion keys: about 21 GiB of disk (16-byte keys and 4-byte values,
// compressed by prefix sharing within blocks; up to a quarter more while a
// merge of the largest generations runs), 1.2 GiB of the LSM's Bloom
// filters (10 bits a key), which must fit in the block cache (CacheBytes)
// for the keys the in-memory filter lets through to stay free of reads, and
// about 1.6 GiB for the in-memory filter (twice that while a new one is
// built). aggregator/BENCHMARKS.md has the
// measurements.
package keyindex

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
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

// DefaultBufferBytes is the default memory of the recent keys: two
// sets of about four million keys each, one being written while the
// other takes the Adds (27 seconds each at 150 000 events a second). The
// larger the spills, the fewer the generations and their merges.
const DefaultBufferBytes = 512 << 20

// bufferBytesPerKey is what a recent key costs at most: 20 bytes in the map's
// slot with its control byte and load factor, doubled while the map grows,
// and the 20-byte record a spill sorts. Two generations of keys are held
// while a spill writes one (the other takes the Adds meanwhile), so a spill
// starts at BufferBytes / (2 × bufferBytesPerKey) keys.
const bufferBytesPerKey = 64

// Options configures an Index.
type Options struct {
	// Dir is the index's directory; it is created if missing.
	Dir string
	// Horizon is how long a key is held after it was added (DefaultHorizon
	// if 0).
	Horizon time.Duration
	// CacheBytes is the block cache (DefaultCacheBytes if 0).
	CacheBytes int64
	// BufferBytes bounds the memory of the keys in memory: those added
	// since the last spill began and those it writes (DefaultBufferBytes if
	// 0).
	BufferBytes int64
	// Logger receives the index's log lines (at Info, the filter read
	// back, built by a scan or saved, and each merge, with their keys and
	// durations; at Error, what failed) and the LSM's (at Debug, its
	// errors at Error); nil discards them.
	Logger *slog.Logger

	// tune, if set, adjusts the LSM's options last (the benchmarks' A/B).
	tune func(*pebble.Options)
	// filterKeys, if set, is the least capacity of the in-memory filter
	// (minFilterKeys if 0; the tests' small filters fill up).
	filterKeys int64
	// noFilter leaves the in-memory filter out (the benchmarks' A/B).
	noFilter bool
}

// Index is the key index. Its methods are safe for concurrent use.
type Index struct {
	db      *pebble.DB
	opts    *pebble.Options
	log     *slog.Logger
	horizon time.Duration
	dir     string
	// spillKeys is how many recent keys start a spill.
	spillKeys int

	// mu orders Add against Expire's deletions (a key re-added while a sweep
	// found it expired must not be deleted), every ingest against both,
	// every use of db against Reset, which replaces it, and guards the
	// fields below.
	mu sync.Mutex
	// recent holds the keys added since the last spill began, with their
	// minute.
	recent map[Key]uint32
	// pending is the Mark of the last Add, not yet spilled (nil if none).
	pending *Mark
	// frozen holds the keys a spill writes (or, after it failed, will
	// write again) as generation frozenGen, recent when it began, and
	// frozenMark their Mark; nil when no spill is under way.
	frozen     map[Key]uint32
	frozenMark *Mark
	frozenGen  uint64
	// writing is true while a goroutine writes frozen's table, outside mu;
	// nothing changes frozen meanwhile. written is signalled when it ends.
	writing bool
	written *sync.Cond

	// filter, if not nil, holds every key in the LSM (filter.go); building
	// is the one a build's scan fills, stopped by stopBuild. Builds run in
	// builds until buildCtx ends (stop), and start no more once closing.
	filter    *filter
	building  *filter
	stopBuild context.CancelFunc
	minFilter int64
	noFilter  bool
	builds    sync.WaitGroup
	buildCtx  context.Context
	stop      context.CancelFunc
	closing   bool
	// scanned counts the keys the builds that ended scanned, and merges
	// the merges that ended (Stats).
	scanned atomic.Int64
	merges  int64

	// gens are the generations in the LSM, in id order (gens.go), and
	// nextGen the next one's id; mergeIn are the inputs of the merge
	// under way (nil if none).
	// mark is the Mark of the latest spill in the LSM, written with
	// generation markSeq.
	gens    []gen
	nextGen uint64
	mergeIn []gen
	mark    *Mark
	markSeq uint64
}

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
	if o.BufferBytes <= 0 {
		o.BufferBytes = DefaultBufferBytes
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "keyindex")
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("keyindex: %w", err)
	}
	popts := &pebble.Options{
		Cache: pebble.NewCache(o.CacheBytes),
		// Nothing goes through the memtable: keys come in as whole tables
		// and generations leave by excise.
		MemTableSize: 4 << 20,
		Logger:       logger{log},
		// Lookups are of whole keys; every level filters them.
		Comparer: pebble.DefaultComparer,
	}
	for i := range popts.Levels {
		popts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
		popts.Levels[i].FilterType = pebble.TableFilter
		// Snappy, pebble's default, is kept: the keys are random, but the
		// values (minutes) repeat, and without it the index took 45 % more
		// disk for a few per cent less CPU (aggregator/BENCHMARKS.md).
	}
	if o.tune != nil {
		o.tune(popts)
	}
	// Excise (dropping a generation's tables whole) needs virtual tables.
	popts.FormatMajorVersion = pebble.FormatVirtualSSTables
	popts.EnsureDefaults()
	db, gens, err := openDB(o.Dir, popts, log)
	if err != nil {
		popts.Cache.Unref()
		return nil, fmt.Errorf("keyindex: open %s: %w", o.Dir, err)
	}
	removeSpills(o.Dir)
	spillKeys := int(max(o.BufferBytes/(2*bufferBytesPerKey), 1))
	ix := &Index{db: db, opts: popts, log: log, horizon: o.Horizon, dir: o.Dir, spillKeys: spillKeys,
		recent: make(map[Key]uint32), minFilter: cmp.Or(o.filterKeys, minFilterKeys), noFilter: o.noFilter}
	ix.written = sync.NewCond(&ix.mu)
	ix.mu.Lock()
	ix.setGens(gens)
	ix.restartBuilds()
	ix.readFilter()
	ix.maybeMerge()
	ix.mu.Unlock()
	return ix, nil
}

// openDB opens the LSM in dir and reads its generations. An index of an
// earlier format is emptied: the store's catch-up finds no Mark and loads
// it again.
func openDB(dir string, opts *pebble.Options, log *slog.Logger) (*pebble.DB, []gen, error) {
	db, err := pebble.Open(dir, opts)
	if err != nil {
		return nil, nil, err
	}
	ok, err := currentFormat(db)
	if err == nil && !ok {
		log.Info("the index is of an earlier format: emptied, to be loaded again", "dir", dir)
		if err = db.Close(); err != nil {
			return nil, nil, err
		}
		if err := os.RemoveAll(dir); err != nil {
			return nil, nil, err
		}
		if db, err = pebble.Open(dir, opts); err != nil {
			return nil, nil, err
		}
	}
	var gens []gen
	if err == nil {
		gens, err = readGens(db)
	}
	if err != nil {
		db.Close()
		return nil, nil, err
	}
	return db, gens, nil
}

// setGens makes gens the index's generations; ix.mu is held.
func (ix *Index) setGens(gens []gen) {
	ix.gens, ix.nextGen, ix.mark, ix.markSeq = nil, 1, nil, 0
	for _, g := range gens {
		ix.addGen(g)
		ix.nextGen = max(ix.nextGen, g.id+1)
	}
}

// Reset empties the index: every key and the mark are gone.
func (ix *Index) Reset() error {
	ix.stopBuilds(false)
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.closing {
		return errors.New("keyindex: reset: the index is closed")
	}
	for ix.writing {
		ix.written.Wait()
	}
	clear(ix.recent)
	ix.pending, ix.frozen, ix.frozenMark = nil, nil, nil
	ix.filter, ix.building = nil, nil
	ix.setGens(nil)
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
	ix.restartBuilds()
	ix.startBuild(0)
	return nil
}

// Horizon returns how long a key is held.
func (ix *Index) Horizon() time.Duration { return ix.horizon }

// minuteOf is the value stored for a key added at t.
func minuteOf(t time.Time) uint32 { return uint32(max(t.Unix(), 0) / 60) }

// live reports whether a key added in minute m is held at now: until the
// horizon after the end of that minute.
func (ix *Index) live(m uint32, now time.Time) bool {
	return time.Unix((int64(m)+1)*60, 0).Add(ix.horizon).After(now)
}

// Held reports, for each key, whether the index holds it at now.
func (ix *Index) Held(keys []Key, now time.Time) ([]bool, error) {
	held := make([]bool, len(keys))
	if len(keys) == 0 {
		return held, nil
	}
	ix.mu.Lock()
	defer ix.mu.Unlock()
	// A recent key's minute is its latest, and a frozen one's is later
	// than the LSM's, if any, so the answer is final. A key the filter
	// has not seen is not in the LSM.
	order := make([]int32, 0, len(keys))
	for i := range keys {
		if m, ok := ix.recent[keys[i]]; ok {
			held[i] = ix.live(m, now)
		} else if m, ok := ix.frozen[keys[i]]; ok {
			held[i] = ix.live(m, now)
		} else if ix.filter == nil || ix.filter.mayContain(&keys[i]) {
			order = append(order, int32(i))
		}
	}
	if len(order) == 0 {
		return held, nil
	}
	// Seeking in key order lets each seek continue from the last.
	order = sortedByKey(order, keys)
	// Pebble skips the filters of the last level unless asked: there most
	// lookups of its users find their key. Here most keys are absent.
	it, err := ix.db.NewIter(&pebble.IterOptions{UseL6Filters: true})
	if err != nil {
		return nil, fmt.Errorf("keyindex: %w", err)
	}
	defer it.Close()
	// A key is held if any generation holds it with a live minute; one
	// whose latest minute has expired holds none. Newest first: a key
	// held is most often a copy of a recent event.
	var k [genKeyLen]byte
	for _, g := range slices.Backward(ix.gens) {
		if !ix.live(g.Max, now) {
			continue
		}
		binary.BigEndian.PutUint64(k[:8], g.id)
		for _, i := range order {
			if held[i] {
				continue
			}
			copy(k[8:], keys[i][:])
			if !it.SeekPrefixGE(k[:]) || string(it.Key()) != string(k[:]) {
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

// Add records keys as added at at, and the mark m: in memory until the
// next spill, which writes them with m (the Mark of the last Add before it)
// as one generation, ingested at once, so whatever survives a crash, the
// Mark read back describes it. A key added again keeps the latest minute. A
// spill that the keys start runs in the background, while later Adds fill
// the next set; an Add waits for it only when that one is full too. A
// spill that failed is tried again then, its keys held meanwhile; an error
// then is returned and the keys stay, held.
func (ix *Index) Add(keys []Key, at time.Time, m Mark) error {
	minute := minuteOf(at)
	ix.mu.Lock()
	defer ix.mu.Unlock()
	for _, k := range keys {
		ix.recent[k] = minute
	}
	ix.pending = &m
	if len(ix.recent) < ix.spillKeys {
		return nil
	}
	if err := ix.settle(); err != nil {
		return err
	}
	if len(ix.recent) < ix.spillKeys {
		return nil // spilled meanwhile (Flush, Expire)
	}
	ix.startSpill()
	return nil
}

// startSpill freezes the recent keys and starts writing them in the
// background; ix.mu is held and nothing is frozen.
func (ix *Index) startSpill() {
	ix.freeze()
	ix.writing = true
	go ix.writeFrozen(ix.db, ix.frozen, ix.frozenMark, ix.frozenGen)
}

// freeze makes the recent keys and their Mark the ones a spill writes; ix.mu
// is held and nothing is frozen.
func (ix *Index) freeze() {
	ix.frozen, ix.frozenMark, ix.frozenGen = ix.recent, ix.pending, ix.newGen()
	ix.recent, ix.pending = make(map[Key]uint32, len(ix.frozen)), nil
}

// writeFrozen writes the frozen keys' table outside ix.mu, then ingests it
// under ix.mu (so that no Expire round or lookup sees half of it), and
// signals the end. On an error the frozen keys stay, held, for settle to
// write again.
func (ix *Index) writeFrozen(db *pebble.DB, keys map[Key]uint32, mark *Mark, id uint64) {
	paths, g, err := ix.writeTable(db, keys, mark, id)
	// The filters get the keys outside ix.mu too; ingest adds them to any
	// filter a build started meanwhile.
	ix.mu.Lock()
	done := ix.filters()
	ix.mu.Unlock()
	addToFilters(done, nil, keys)
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if err == nil {
		err = ix.ingest(paths, g, done)
	}
	if err != nil {
		ix.log.Error("spill failed, to be tried again", "err", err)
	}
	ix.writing = false
	ix.written.Broadcast()
}

// settle waits for the spill under way, and writes again, at once and
// under ix.mu (which is held), the keys of one that failed: then an Add
// waits for the disk, and returns its error, rather than hold more keys in
// memory. After it nothing is frozen, or it returns the error.
func (ix *Index) settle() error {
	for ix.writing {
		ix.written.Wait()
	}
	if ix.frozen == nil {
		return nil
	}
	paths, g, err := ix.writeTable(ix.db, ix.frozen, ix.frozenMark, ix.frozenGen)
	if err == nil {
		err = ix.ingest(paths, g, nil)
	}
	return err
}

// Mark returns the mark of the last Add; ok is false when there is none.
func (ix *Index) Mark() (m Mark, ok bool, err error) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if m := cmp.Or(ix.pending, ix.frozenMark, ix.mark); m != nil {
		return *m, true, nil
	}
	return Mark{}, false, nil
}

// Flush spills the recent keys: when it returns, they are on disk.
func (ix *Index) Flush() error {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	return ix.spill()
}

// Close spills the keys in memory, saves the in-memory filter if the spill
// succeeded and one is in use (a failed save is logged: the next Open
// scans; filter.go) and closes the index; it is idempotent.
func (ix *Index) Close() error {
	ix.stopBuilds(true)
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.db == nil {
		return nil
	}
	err := ix.spill()
	if err == nil && ix.filter != nil {
		start := time.Now()
		if err := saveFilter(ix.dir, ix.filter, ix.gens); err != nil {
			// The next Open scans instead.
			ix.log.Error("filter: save", "err", err)
		} else {
			ix.log.Info("filter: saved", "keys", ix.filter.added.Load(), "duration", time.Since(start).Round(time.Millisecond))
		}
	}
	err = errors.Join(err, ix.db.Close())
	ix.db = nil
	ix.opts.Cache.Unref()
	if err != nil {
		return fmt.Errorf("keyindex: close: %w", err)
	}
	return nil
}

// spill writes every key in memory, with the Mark of the last Add, to the
// LSM before it returns (ix.mu is held): the spill under way, one that
// failed, and the recent keys. It does nothing when there is nothing to
// write. On an error the keys stay in memory, held.
func (ix *Index) spill() error {
	if err := ix.settle(); err != nil {
		return err
	}
	if len(ix.recent) == 0 && ix.pending == nil {
		return nil
	}
	// Written in the background too: lookups and Adds go on meanwhile.
	ix.startSpill()
	return ix.settle()
}

// writeTable writes keys as generation id, sorted, with the Mark mark
// (if not nil) in its meta, as tables for db to ingest, and returns their
// paths and the generation. It does not change keys, and needs no lock:
// one spill is written at a time (ix.writing, or ix.mu held and nothing
// being written), and its tables are named by its generation.
func (ix *Index) writeTable(db *pebble.DB, keys map[Key]uint32, mark *Mark, id uint64) ([]string, gen, error) {
	recs := sortedRecords(keys)
	t := ix.newTableWriter(db, id, func(n int) string {
		return filepath.Join(ix.dir, fmt.Sprintf("%s%d-%d.sst", spillPrefix, id, n))
	})
	for i := range recs {
		if err := t.add(recs[i][:16], binary.BigEndian.Uint32(recs[i][16:])); err != nil {
			t.abort()
			return nil, gen{}, fmt.Errorf("keyindex: spill: %w", err)
		}
	}
	g := t.written()
	if mark != nil {
		g.Mark, g.MarkSeq = mark, id
	}
	paths, err := t.finish(g)
	if err != nil {
		return nil, gen{}, fmt.Errorf("keyindex: spill: %w", err)
	}
	return paths, g, nil
}

// sortedRecords returns keys as records (a key and its minute), in key
// order, placed straight from the map.
func sortedRecords(keys map[Key]uint32) [][recordSize]byte {
	return sortByKey(len(keys), func(yield func(Key, [recordSize]byte) bool) {
		for k, m := range keys {
			var r [recordSize]byte
			copy(r[:], k[:])
			binary.BigEndian.PutUint32(r[len(k):], m)
			if !yield(k, r) {
				return
			}
		}
	}, func(r *[recordSize]byte) *Key { return (*Key)(r[:len(Key{})]) })
}

// ingest adds the frozen keys to the filters but those of done (which have
// them), ingests their generation g's tables at paths and forgets them;
// ix.mu is held. The tables' files are removed either way (ingesting links
// them into the LSM's directory).
func (ix *Index) ingest(paths []string, g gen, done []*filter) error {
	defer removeAll(paths)
	addToFilters(ix.filters(), done, ix.frozen)
	if err := ix.db.Ingest(context.Background(), paths); err != nil {
		return fmt.Errorf("keyindex: spill: ingest: %w", err)
	}
	ix.addGen(g)
	ix.frozen, ix.frozenMark = nil, nil
	ix.rebuildFull()
	ix.maybeMerge()
	return nil
}

// spillPrefix names a spill's table before it is ingested.
const spillPrefix = "spill-"

// removeSpills removes the tables of spills and merges, and the files of
// loads, that a crash interrupted.
func removeSpills(dir string) {
	for _, pattern := range []string{spillPrefix + "*", "load-*"} {
		names, _ := filepath.Glob(filepath.Join(dir, pattern))
		for _, n := range names {
			os.RemoveAll(n)
		}
	}
}

// logger sends pebble's log lines to slog.
type logger struct{ log *slog.Logger }

func (l logger) Infof(format string, args ...any)  { l.log.Debug(fmt.Sprintf(format, args...)) }
func (l logger) Errorf(format string, args ...any) { l.log.Error(fmt.Sprintf(format, args...)) }
func (l logger) Fatalf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...))
	panic(fmt.Sprintf(format, args...))
}
