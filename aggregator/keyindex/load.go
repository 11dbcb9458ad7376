package keyindex

import (
	"bufio"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// recordSize is a key and its minute in a Loader's bucket files.
const recordSize = len(Key{}) + 4

// loadTableBytes is the size of the tables a Loader writes.
const loadTableBytes = 64 << 20

// Loader fills an index in bulk from keys in any order: it spreads them over
// 256 bucket files by their first byte (keys are uniform, so each bucket is
// about 1/256 of them and a contiguous range of keys), then sorts one bucket
// at a time in memory and writes it as sorted tables, which the index
// ingests at once, below everything else. Two buckets are sorted at a
// time: loading a billion keys holds about 160 MB of them in memory, and
// twice the keys' size on disk while it runs. The index may be used while a Loader runs; what it adds shows only
// after Finish.
type Loader struct {
	ix      *Index
	dir     string
	files   [256]*os.File
	writers [256]*bufio.Writer
	n       int64
	err     error

	// While Finish writes: db and the horizon's slices' generations,
	// under mu.
	db   *pebble.DB
	mu   sync.Mutex
	gens map[uint32]*gen
}

// NewLoader starts a bulk load.
func (ix *Index) NewLoader() (*Loader, error) {
	dir, err := os.MkdirTemp(ix.dir, "load-")
	if err != nil {
		return nil, fmt.Errorf("keyindex: load: %w", err)
	}
	l := &Loader{ix: ix, dir: dir}
	for i := range l.files {
		f, err := os.Create(filepath.Join(dir, "bucket-"+strconv.Itoa(i)))
		if err != nil {
			l.Abort()
			return nil, fmt.Errorf("keyindex: load: %w", err)
		}
		l.files[i], l.writers[i] = f, bufio.NewWriterSize(f, 32<<10)
	}
	return l, nil
}

// Add adds k, first written at at.
func (l *Loader) Add(k Key, at time.Time) {
	if l.err != nil {
		return
	}
	var rec [recordSize]byte
	copy(rec[:], k[:])
	binary.BigEndian.PutUint32(rec[len(k):], minuteOf(at))
	if _, err := l.writers[k[0]].Write(rec[:]); err != nil {
		l.err = fmt.Errorf("keyindex: load: %w", err)
	}
	l.n++
}

// Len returns how many keys were added.
func (l *Loader) Len() int64 { return l.n }

// Finish writes the keys into the index, records m and removes the
// loader's files. A key added more than once keeps its latest minute.
func (l *Loader) Finish(ctx context.Context, m Mark) error {
	defer l.Abort()
	if l.err != nil {
		return l.err
	}
	// The loaded keys go into the filters as the buckets are written,
	// like a spill's, rather than into a scan of the whole LSM after the
	// ingest: one with room for them, if need be a new one.
	// A rebuild's generations (the index empty) are sealed: merged, they
	// would span the horizon. A catch-up's merge with the spills.
	var fs []*filter
	l.ix.mu.Lock()
	if l.n > 0 {
		fs = l.ix.loadFilters(l.n)
	}
	l.db, l.gens = l.ix.db, make(map[uint32]*gen)
	rebuild := len(l.ix.gens) == 0
	l.ix.mu.Unlock()
	// Two buckets at a time: sorting and writing tables is most of a
	// load's CPU.
	var (
		tables [256][]string
		errs   [256]error
		next   atomic.Int32
		wg     sync.WaitGroup
	)
	for range 2 {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < len(l.files) && ctx.Err() == nil; i = int(next.Add(1) - 1) {
				tables[i], errs[i] = l.writeBucket(i, fs)
			}
		})
	}
	wg.Wait()
	if err := cmp.Or(errors.Join(errs[:]...), ctx.Err()); err != nil {
		return fmt.Errorf("keyindex: load: %w", err)
	}
	var all []string
	for _, ts := range tables {
		all = append(all, ts...)
	}
	// Each generation's meta, in a table of its own after its keys.
	gens := slices.SortedFunc(maps.Values(l.gens), func(a, b *gen) int { return cmp.Compare(a.id, b.id) })
	for _, g := range gens {
		g.Sealed = rebuild || l.ix.class(g.Keys) >= maxMergeClass
		t := l.ix.newTableWriter(l.db, g.id, func(int) string { return filepath.Join(l.dir, fmt.Sprintf("meta-%d.sst", g.id)) })
		paths, err := t.finish(*g)
		if err != nil {
			return fmt.Errorf("keyindex: load: %w", err)
		}
		all = append(all, paths...)
	}
	if len(all) > 0 {
		// A filter that did not get the keys (a build started meanwhile)
		// must not be used after the ingest: a new build's scan, started
		// after it, will see them.
		l.ix.mu.Lock()
		if l.ix.filter != nil && !slices.Contains(fs, l.ix.filter) {
			l.ix.filter = nil
		}
		if l.ix.building != nil && !slices.Contains(fs, l.ix.building) {
			l.ix.dropBuild()
		}
		err := errors.New("the index was reset")
		if l.ix.db == l.db {
			err = l.ix.db.Ingest(ctx, all)
		}
		if err == nil {
			for _, g := range gens {
				l.ix.addGen(*g)
			}
		}
		if l.ix.filter == nil {
			l.ix.startBuild(0)
		}
		l.ix.mu.Unlock()
		if err != nil {
			return fmt.Errorf("keyindex: load: ingest: %w", err)
		}
	}
	// The mark is written at once: a crash must not make a rebuild's keys
	// look foreign.
	l.ix.mu.Lock()
	defer l.ix.mu.Unlock()
	l.ix.pending = &m
	err := l.ix.spill()
	if l.ix.filter == nil {
		l.ix.startBuild(0)
	}
	return err
}

// writeBucket sorts bucket i and writes it as tables, one set per slice of
// the horizon its keys' minutes fall in, and adds its keys to the filters
// fs.
func (l *Loader) writeBucket(i int, fs []*filter) ([]string, error) {
	if err := l.writers[i].Flush(); err != nil {
		return nil, err
	}
	f := l.files[i]
	size, err := f.Seek(0, io.SeekCurrent)
	if err != nil || size == 0 {
		return nil, err
	}
	// Read straight into the records: a copy of the file beside them would
	// double the bucket's memory.
	recs := make([][recordSize]byte, size/int64(recordSize))
	r := bufio.NewReaderSize(io.NewSectionReader(f, 0, size), 64<<10)
	for j := range recs {
		if _, err := io.ReadFull(r, recs[j][:]); err != nil {
			return nil, err
		}
	}
	l.files[i], l.writers[i] = nil, nil
	f.Close()
	os.Remove(f.Name())
	// Key order, and the latest minute first among equal keys: the
	// records compared as three big-endian integers.
	slices.SortFunc(recs, func(a, b [recordSize]byte) int {
		be := binary.BigEndian
		return cmp.Or(cmp.Compare(be.Uint64(a[:8]), be.Uint64(b[:8])), cmp.Compare(be.Uint64(a[8:16]), be.Uint64(b[8:16])),
			cmp.Compare(be.Uint32(b[16:]), be.Uint32(a[16:])))
	})
	writers := make(map[uint32]*tableWriter)
	defer func() {
		for _, t := range writers {
			t.abort()
		}
	}()
	var last []byte
	for j := range recs {
		r := recs[j][:]
		if last != nil && string(last) == string(r[:16]) {
			continue
		}
		last = r[:16]
		for _, f := range fs {
			f.add((*Key)(last))
		}
		minute := binary.BigEndian.Uint32(r[16:])
		slice := minute / l.ix.sliceMinutes()
		t := writers[slice]
		if t == nil {
			id := l.genOf(slice)
			t = l.ix.newTableWriter(l.db, id, func(n int) string {
				return filepath.Join(l.dir, fmt.Sprintf("table-%d-%03d-%06d.sst", id, i, n))
			})
			writers[slice] = t
		}
		if err := t.add(last, minute); err != nil {
			return nil, err
		}
	}
	var tables []string
	for slice, t := range writers {
		paths, err := t.close(nil)
		if err != nil {
			return nil, err
		}
		tables = append(tables, paths...)
		delete(writers, slice)
		l.mu.Lock()
		g, w := l.gens[slice], t.written()
		g.Keys += w.Keys
		g.Min, g.Max = min(g.Min, w.Min), max(g.Max, w.Max)
		l.mu.Unlock()
	}
	return tables, nil
}

// genOf returns the generation of the loaded keys of a slice of the
// horizon.
func (l *Loader) genOf(slice uint32) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if g, ok := l.gens[slice]; ok {
		return g.id
	}
	l.ix.mu.Lock()
	id := l.ix.newGen()
	l.ix.mu.Unlock()
	l.gens[slice] = &gen{id: id, Min: math.MaxUint32}
	return id
}

// sliceMinutes is the span of the minutes of a Loader's generation: an
// eighth of the horizon, so that each is deleted whole (Expire) at most an
// eighth of the horizon after its first keys expired.
func (ix *Index) sliceMinutes() uint32 {
	return uint32(max(ix.horizon/8/time.Minute, 1))
}

// Abort removes the loader's files; after Finish it does nothing.
func (l *Loader) Abort() {
	for i, f := range l.files {
		if f != nil {
			f.Close()
			l.files[i], l.writers[i] = nil, nil
		}
	}
	os.RemoveAll(l.dir)
}

// Expire deletes the keys that are no longer held at now and returns how
// many it deleted: a generation whose keys have all expired, at once (but
// the one with the latest Mark, which a reopened index needs), and, from
// one whose keys span more than a Loader's slice of the horizon, the
// expired ones, by writing it again without them (a merge of one, outside
// ix.mu).
func (ix *Index) Expire(ctx context.Context, now time.Time) (int, error) {
	deleted := 0
	var sweep []gen
	ix.mu.Lock()
	// Every key is in the LSM for the sweep.
	err := ix.spill()
	if err == nil {
		var drop []gen
		for _, g := range ix.gens {
			merging := slices.ContainsFunc(ix.mergeIn, func(m gen) bool { return m.id == g.id })
			switch {
			case !ix.live(g.Max, now) && (g.MarkSeq == 0 || g.MarkSeq != ix.markSeq):
				drop = append(drop, g)
				deleted += int(g.Keys)
			case !ix.live(g.Min, now) && g.Max-g.Min > ix.sliceMinutes() && !merging:
				sweep = append(sweep, g)
			}
		}
		err = ix.dropGens(drop)
	}
	db := ix.db
	ix.mu.Unlock()
	if err != nil {
		return 0, fmt.Errorf("keyindex: expire: %w", err)
	}
	for _, g := range sweep {
		ix.mu.Lock()
		id := ix.newGen()
		ix.mu.Unlock()
		paths, out, err := ix.writeMerge(ctx, db, id, []gen{g}, now)
		if err == nil {
			ix.mu.Lock()
			if ix.db == db && slices.ContainsFunc(ix.gens, func(h gen) bool { return h.id == g.id }) {
				err = ix.replace(paths, out, []gen{g})
				deleted += int(g.Keys - out.Keys)
			}
			ix.mu.Unlock()
		}
		removeAll(paths)
		if err != nil {
			return deleted, fmt.Errorf("keyindex: expire: %w", err)
		}
	}
	return deleted, nil
}
