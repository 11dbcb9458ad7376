package keyindex

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/objstorage/objstorageprovider"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"
)

// Generations
//
// The LSM holds keys by generation: each spill writes its keys as a new
// generation, and a Loader writes one per slice of the horizon its keys'
// minutes fall in. A generation is a range of the LSM of its own (its
// number, 8 bytes big-endian, comes before each key), so its tables overlap
// no other's and are ingested straight into the last level: keys are
// written once and never compacted with the rest. (Spilled into one key
// space, every spill spanned the whole range, being uniform, and was merged
// with the level below it, and that one with the next: the compactions'
// share of the CPU grew with the index, to a quarter of it at 357 M keys;
// aggregator/BENCHMARKS.md.)
//
// A lookup the in-memory filter lets through probes each generation that
// still holds a live key, through its tables' Bloom filters. So that their
// number stays small, generations of about the same size are merged,
// mergeFanIn at a time, in the background: each key is rewritten once per
// class it passes (at most maxMergeClass times), and a generation that
// reaches the last class (or a Loader's that rebuilt the index) is sealed,
// never merged again. A merge's generation replaces its inputs under ix.mu
// (one ingest, then an excise of each); a crash between the two leaves
// their keys twice, which costs only space.
//
// Each generation's table ends with its meta (gen): how many keys it holds,
// their minutes' range and the Mark of its last spill. Expire deletes a
// generation whose keys have all expired, and rewrites without them one
// only some of whose have (a merge of one), when its keys span more than a
// Loader's slice of the horizon. Generations are deleted by excising their
// key range: nothing is ever written into the LSM but whole tables, so the
// LSM never compacts.

// genKeyLen is the length of a key in the LSM: its generation and the key.
const genKeyLen = 8 + len(Key{})

// gen describes a generation; it is its meta's value, but for id.
type gen struct {
	id uint64
	// Keys is how many keys it holds, and Min and Max the earliest and
	// latest of their minutes; none changes after it is written (a saved
	// filter is matched to the generations by them: filter.go).
	Keys int64  `json:"keys"`
	Min  uint32 `json:"min"`
	Max  uint32 `json:"max"`
	// Sealed is true for a generation never to be merged: a Loader's
	// that rebuilt the index, and a merge's of the last class.
	Sealed bool `json:"sealed,omitempty"`
	// Mark is the latest Mark among the spills it holds, and MarkSeq the
	// generation that spill wrote (0 if none).
	Mark    *Mark  `json:"mark,omitempty"`
	MarkSeq uint64 `json:"mark_seq,omitempty"`
}

const (
	// mergeFanIn is how many generations of one class a merge takes.
	mergeFanIn = 8
	// maxMergeClass is the class of a sealed generation: with spills of
	// four million keys, merges of 8 make 32 million, then 256 million,
	// sealed. A lookup then probes about 14 unsealed generations (more
	// while a long merge runs, one at a time), one sealed per 256 million
	// keys and, after a rebuild, a Loader's (sealed, one per slice).
	maxMergeClass = 2
)

// genPrefix returns the first key of generation id's range.
func genPrefix(id uint64) []byte { return binary.BigEndian.AppendUint64(nil, id) }

// metaKeyOf returns the key of generation id's meta: after every key of
// the generation, and one byte longer, so never an event's.
func metaKeyOf(id uint64) []byte {
	return append(genPrefix(id), bytes.Repeat([]byte{0xff}, len(Key{})+1)...)
}

// newGen returns the id of a new generation; ix.mu is held.
func (ix *Index) newGen() uint64 {
	ix.nextGen++
	return ix.nextGen - 1
}

// class returns g's merge class: how many times mergeFanIn spills it holds,
// in powers (0 below mergeFanIn spills).
func (ix *Index) class(keys int64) int {
	c := 0
	for n := keys / int64(ix.spillKeys); n >= mergeFanIn && c < maxMergeClass; n /= mergeFanIn {
		c++
	}
	return c
}

// keysHeld returns how many keys the generations hold; ix.mu is held.
func (ix *Index) keysHeld() int64 {
	var n int64
	for _, g := range ix.gens {
		n += g.Keys
	}
	return n
}

// addGen records g, in id order, and its Mark if it is the latest; ix.mu
// is held.
func (ix *Index) addGen(g gen) {
	i, _ := slices.BinarySearchFunc(ix.gens, g.id, func(a gen, id uint64) int { return cmp.Compare(a.id, id) })
	ix.gens = slices.Insert(ix.gens, i, g)
	if g.Mark != nil && g.MarkSeq >= ix.markSeq {
		ix.mark, ix.markSeq = g.Mark, g.MarkSeq
	}
}

// readGens reads every generation's meta.
func readGens(db *pebble.DB) ([]gen, error) {
	it, err := db.NewIter(nil)
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var gens []gen
	for valid := it.First(); valid; {
		id := binary.BigEndian.Uint64(it.Key())
		g := gen{id: id}
		meta := metaKeyOf(id)
		if it.SeekGE(meta) && bytes.Equal(it.Key(), meta) {
			v, err := it.ValueAndErr()
			if err != nil {
				return nil, err
			}
			if err := json.Unmarshal(v, &g); err != nil {
				return nil, fmt.Errorf("generation %d: %w", id, err)
			}
		} else {
			// Not written by this code: held, never dropped whole, never
			// merged.
			g.Max, g.Sealed = math.MaxUint32, true
		}
		gens = append(gens, g)
		if id == math.MaxUint64 {
			break
		}
		valid = it.SeekGE(genPrefix(id + 1))
	}
	return gens, it.Error()
}

// currentFormat reports whether db holds keys by generation (or nothing):
// an index of an earlier version held 16-byte keys.
func currentFormat(db *pebble.DB) (bool, error) {
	it, err := db.NewIter(nil)
	if err != nil {
		return false, err
	}
	defer it.Close()
	if !it.First() {
		return true, it.Error()
	}
	n := len(it.Key())
	return n == genKeyLen || n == genKeyLen+1, nil
}

// tableWriter writes records of generation id, in key order, as tables of
// at most loadTableBytes, and counts them in g.
type tableWriter struct {
	opts   sstable.WriterOptions
	path   func(n int) string
	g      gen
	w      *sstable.Writer
	paths  []string
	key    [genKeyLen]byte
	minute [4]byte
}

// newTableWriter returns a writer of generation id's tables for db, named
// by path.
func (ix *Index) newTableWriter(db *pebble.DB, id uint64, path func(n int) string) *tableWriter {
	t := &tableWriter{opts: ix.opts.MakeWriterOptions(len(ix.opts.Levels)-1, db.TableFormat()), path: path,
		g: gen{id: id, Min: math.MaxUint32}}
	binary.BigEndian.PutUint64(t.key[:8], id)
	return t
}

func (t *tableWriter) open() error {
	path := t.path(len(t.paths))
	f, err := vfs.Default.Create(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return err
	}
	t.paths = append(t.paths, path)
	t.w = sstable.NewWriter(objstorageprovider.NewFileWritable(f), t.opts)
	return nil
}

// add writes key k (16 bytes), added in minute.
func (t *tableWriter) add(k []byte, minute uint32) error {
	if t.w == nil {
		if err := t.open(); err != nil {
			return err
		}
	}
	copy(t.key[8:], k)
	binary.BigEndian.PutUint32(t.minute[:], minute)
	if err := t.w.Set(t.key[:], t.minute[:]); err != nil {
		return err
	}
	t.g.Keys++
	t.g.Min, t.g.Max = min(t.g.Min, minute), max(t.g.Max, minute)
	if t.w.Raw().EstimatedSize() >= loadTableBytes {
		err := t.w.Close()
		t.w = nil
		return err
	}
	return nil
}

// written returns the generation of what was written so far: its keys and
// their minutes' range (0 to 0 if none).
func (t *tableWriter) written() gen {
	g := t.g
	if g.Keys == 0 {
		g.Min, g.Max = 0, 0
	}
	return g
}

// finish writes g's meta, after every key, and closes the last table; it
// returns the tables' paths.
func (t *tableWriter) finish(g gen) ([]string, error) {
	meta, err := json.Marshal(g)
	if err == nil && t.w == nil {
		err = t.open()
	}
	if err == nil {
		err = t.w.Set(metaKeyOf(t.g.id), meta)
	}
	return t.close(err)
}

// close closes the last table, if any; on err it removes the tables.
func (t *tableWriter) close(err error) ([]string, error) {
	if t.w != nil {
		err = cmp.Or(err, t.w.Close())
		t.w = nil
	}
	if err != nil {
		t.abort()
		return nil, err
	}
	return t.paths, nil
}

// abort closes and removes the tables.
func (t *tableWriter) abort() {
	if t.w != nil {
		t.w.Close()
		t.w = nil
	}
	removeAll(t.paths)
	t.paths = nil
}

// maybeMerge starts a merge of the mergeFanIn oldest unsealed generations
// of the lowest class that has as many, if no merge is under way; ix.mu is
// held. Merges run with the filter's builds (stopBuilds stops both).
func (ix *Index) maybeMerge() {
	if ix.mergeIn != nil || ix.buildCtx.Err() != nil {
		return
	}
	var byClass [maxMergeClass][]gen
	for _, g := range ix.gens {
		if c := ix.class(g.Keys); !g.Sealed && c < maxMergeClass {
			byClass[c] = append(byClass[c], g)
		}
	}
	for _, gs := range byClass {
		if len(gs) < mergeFanIn {
			continue
		}
		in := gs[:mergeFanIn]
		id := ix.newGen()
		ix.mergeIn = in
		ctx, db := ix.buildCtx, ix.db
		ix.builds.Go(func() { ix.merge(ctx, db, id, in) })
		return
	}
}

// merge writes generation id, the keys of in with each one's latest
// minute, outside ix.mu, then replaces in with it.
func (ix *Index) merge(ctx context.Context, db *pebble.DB, id uint64, in []gen) {
	start := time.Now()
	paths, out, err := ix.writeMerge(ctx, db, id, in, time.Time{})
	defer removeAll(paths)
	ix.mu.Lock()
	defer ix.mu.Unlock()
	ix.mergeIn = nil
	if err == nil && ctx.Err() == nil && ix.db == db {
		if err = ix.replace(paths, out, in); err == nil {
			ix.merges++
		}
	}
	if err != nil {
		if ctx.Err() == nil {
			ix.log.Error("merge", "err", err)
		}
		return
	}
	if ctx.Err() != nil || ix.db != db {
		return
	}
	ix.log.Info("merged", "generations", len(in), "keys", out.Keys, "duration", time.Since(start).Round(time.Millisecond))
	ix.maybeMerge()
}

// writeMerge writes the tables of generation id: the keys of in, merged,
// less those expired at now (none if now is zero).
func (ix *Index) writeMerge(ctx context.Context, db *pebble.DB, id uint64, in []gen, now time.Time) ([]string, gen, error) {
	its := make([]*pebble.Iterator, 0, len(in))
	defer func() {
		for _, it := range its {
			it.Close()
		}
	}()
	out := gen{id: id}
	for _, g := range in {
		it, err := db.NewIter(&pebble.IterOptions{LowerBound: genPrefix(g.id), UpperBound: genPrefix(g.id + 1)})
		if err != nil {
			return nil, out, err
		}
		its = append(its, it)
		if g.MarkSeq >= out.MarkSeq && g.Mark != nil {
			out.Mark, out.MarkSeq = g.Mark, g.MarkSeq
		}
	}
	// An iterator is at a key while it is at one of its generation's keys
	// (its meta comes after them all).
	at := func(it *pebble.Iterator, valid bool) bool { return valid && len(it.Key()) == genKeyLen }
	live := make([]*pebble.Iterator, 0, len(its))
	for _, it := range its {
		if at(it, it.First()) {
			live = append(live, it)
		}
	}
	t := ix.newTableWriter(db, id, func(n int) string {
		return filepath.Join(ix.dir, fmt.Sprintf("%smerge-%d-%d.sst", spillPrefix, id, n))
	})
	var err error
	for n := 0; len(live) > 0 && err == nil; n++ {
		if n%(1<<16) == 0 && ctx.Err() != nil {
			err = ctx.Err()
			break
		}
		// The least key among the generations, and its latest minute.
		least := live[0].Key()[8:]
		for _, it := range live[1:] {
			if bytes.Compare(it.Key()[8:], least) < 0 {
				least = it.Key()[8:]
			}
		}
		var k Key
		copy(k[:], least)
		minute := uint32(0)
		live = slices.DeleteFunc(live, func(it *pebble.Iterator) bool {
			if !bytes.Equal(it.Key()[8:], k[:]) {
				return false
			}
			if v, verr := it.ValueAndErr(); verr != nil {
				err = verr
			} else if len(v) == 4 {
				minute = max(minute, binary.BigEndian.Uint32(v))
			}
			return !at(it, it.Next())
		})
		if err == nil && (now.IsZero() || ix.live(minute, now)) {
			err = t.add(k[:], minute)
		}
	}
	for _, it := range its {
		err = cmp.Or(err, it.Error())
	}
	if err != nil {
		t.abort()
		return nil, out, err
	}
	w := t.written()
	out.Keys, out.Min, out.Max = w.Keys, w.Min, w.Max
	// A sealed generation written again without its expired keys stays
	// sealed.
	out.Sealed = ix.class(out.Keys) >= maxMergeClass || !slices.ContainsFunc(in, func(g gen) bool { return !g.Sealed })
	paths, err := t.finish(out)
	return paths, out, err
}

// replace ingests generation out's tables and deletes the generations in;
// ix.mu is held.
func (ix *Index) replace(paths []string, out gen, in []gen) error {
	if err := ix.db.Ingest(context.Background(), paths); err != nil {
		return err
	}
	ix.addGen(out)
	return ix.dropGens(in)
}

// dropGens deletes the generations gs and forgets them; ix.mu is held.
// Each is excised: its tables leave the LSM whole, with no tombstone to be
// compacted later (a range deletion spanning two generations would have
// its compaction rewrite every generation between them).
func (ix *Index) dropGens(gs []gen) error {
	for _, d := range gs {
		if err := ix.db.Excise(context.Background(), pebble.KeyRange{Start: genPrefix(d.id), End: genPrefix(d.id + 1)}); err != nil {
			return err
		}
		ix.gens = slices.DeleteFunc(ix.gens, func(g gen) bool { return g.id == d.id })
	}
	return nil
}

// removeAll removes the files at paths.
func removeAll(paths []string) {
	for _, p := range paths {
		os.Remove(p)
	}
}
