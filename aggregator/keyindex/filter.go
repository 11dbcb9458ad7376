package keyindex

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// filter is a blocked Bloom filter over every key in the LSM, in memory:
// a key sets filterProbes bits of one 512-bit block (a cache line), chosen
// by its first 8 bytes, the bits by its last 8. A lookup of a key it has
// not seen costs one cache miss, and 99 % of them end there; the LSM's own
// filters cost one probe per level and sublevel, and that grew with the
// tree to half of the aggregator's CPU (aggregator/BENCHMARKS.md). Keys are
// SHA-256 prefixes, so uniform: no key can be chosen to crowd a block.
//
// Bits are set atomically: a spill and a rebuild's scan add keys at once.
type filter struct {
	words  []atomic.Uint64 // 8 per block
	blocks uint64
	// capacity is the keys it was sized for; added counts its adds.
	capacity int64
	added    atomic.Int64
}

const (
	// filterBitsPerKey and filterProbes give about 1 % false positives
	// at capacity: 1.25 bytes a key.
	filterBitsPerKey = 10
	filterProbes     = 7 // 7 × 9 bits of the key's last 8 bytes
	// minFilterKeys is the smallest capacity (1.25 MiB).
	minFilterKeys = 1 << 20
)

func newFilter(capacity int64) *filter {
	blocks := uint64(max(capacity*filterBitsPerKey/512, 1))
	return &filter{words: make([]atomic.Uint64, blocks*8), blocks: blocks, capacity: capacity}
}

// at returns k's block's first word and the bits to probe. The mapping of
// a key to its bits (here, in add and in filterProbes) is part of the saved
// filter's format: a change to it must change filterMagic, or a filter
// saved before it would miss every key (TestFilterLayout).
func (f *filter) at(k *Key) (word uint64, h uint64) {
	b, _ := bits.Mul64(binary.BigEndian.Uint64(k[:8]), f.blocks)
	return b * 8, binary.BigEndian.Uint64(k[8:])
}

func (f *filter) add(k *Key) {
	w, h := f.at(k)
	for range filterProbes {
		f.words[w+(h&511)>>6].Or(1 << (h & 63))
		h >>= 9
	}
	f.added.Add(1)
}

// mayContain is false only for a key never added.
func (f *filter) mayContain(k *Key) bool {
	w, h := f.at(k)
	for range filterProbes {
		if f.words[w+(h&511)>>6].Load()&(1<<(h&63)) == 0 {
			return false
		}
		h >>= 9
	}
	return true
}

// full reports whether f holds more keys than it was sized for.
func (f *filter) full() bool { return f.added.Load() > f.capacity }

// The filter's life: Open reads the filter Close saved, if it was saved for
// the LSM's generations, or else starts a build (a scan of every key in the
// LSM); until one ends, lookups go to the LSM. Every spill adds its keys to
// the filter in use and to the one being built before it ingests them, and a
// build's scan starts, under ix.mu, from a view of the LSM taken with it: so
// a key in the LSM is in the filter in use, always. A Loader adds its keys
// to the filters as it writes them, before its ingest, like a spill
// (loadFilters); a filter without room for them is dropped, and one whose
// build started after that misses them and is dropped at the ingest, a new
// build starting after it. A filter that reaches its capacity (keys added,
// expired ones included: an Expire does not remove them) is replaced by a
// build with more room (rebuildFull). A filter is sized with room for a
// quarter more keys than the generations hold.

// startBuild starts building a filter of at least least keys for the keys
// in the LSM, unless one is being built; ix.mu is held. The new filter
// replaces the one in use when its scan ends, unless a Loader or Reset
// dropped it.
func (ix *Index) startBuild(least int64) {
	if ix.building != nil || ix.buildCtx.Err() != nil || ix.noFilter {
		return
	}
	f := newFilter(max(ix.keysHeld()*5/4, ix.minFilter, least))
	it, err := ix.db.NewIter(nil)
	if err != nil {
		ix.log.Error("filter: scan", "err", err)
		return
	}
	ctx, stop := context.WithCancel(ix.buildCtx)
	ix.building, ix.stopBuild = f, stop
	ix.builds.Go(func() {
		defer stop()
		ix.build(ctx, f, it)
	})
}

// readFilter makes the filter Close saved the one in use, if it was saved
// for the generations in the LSM, or else starts a build; ix.mu is held.
func (ix *Index) readFilter() {
	if ix.noFilter {
		dropFilterFile(ix.dir)
		return
	}
	start := time.Now()
	f, err := loadFilter(ix.dir, ix.gens)
	switch {
	case err != nil:
		ix.log.Error("filter: the saved filter is not used: keys are scanned instead", "path", filepath.Join(ix.dir, filterFile), "err", err)
	case f != nil:
		ix.filter = f
		ix.log.Info("filter: read back", "keys", f.added.Load(), "duration", time.Since(start).Round(time.Millisecond))
		ix.rebuildFull()
		return
	}
	ix.startBuild(0)
}

// dropBuild stops the build under way, if any; ix.mu is held.
func (ix *Index) dropBuild() {
	if ix.building != nil {
		ix.stopBuild()
		ix.building = nil
	}
}

// build adds every key it iterates to f, then makes f the filter in use.
func (ix *Index) build(ctx context.Context, f *filter, it *pebble.Iterator) {
	start := time.Now()
	n, err := int64(0), error(nil)
	for valid := it.First(); valid; valid = it.Next() {
		if k := it.Key(); len(k) == genKeyLen {
			f.add((*Key)(k[8:]))
			n++
		}
		if n%(1<<16) == 0 && ctx.Err() != nil {
			err = ctx.Err()
			break
		}
	}
	err = cmp.Or(err, it.Error(), it.Close())
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.building != f {
		return // dropped by a Loader or by Reset
	}
	ix.building = nil
	if err != nil {
		if ctx.Err() == nil {
			ix.log.Error("filter: scan", "err", err)
		}
		return
	}
	ix.filter = f
	ix.scanned.Add(n)
	ix.log.Info("filter: built by a scan", "keys", n, "duration", time.Since(start).Round(time.Millisecond))
	ix.rebuildFull()
}

// rebuildFull starts a build when the filter in use is full, or when there
// is none (a build failed to start); ix.mu is held. The new one has room
// for twice the keys the full one was given, up to doubleFilterKeys, and a
// quarter more beyond: a filter grown from nothing is scanned for about
// twice its final keys in all, not five times, for at most 80 MiB more.
func (ix *Index) rebuildFull() {
	switch {
	case ix.filter == nil:
		ix.startBuild(0)
	case ix.filter.full():
		n := ix.filter.added.Load()
		ix.startBuild(n + max(min(n, doubleFilterKeys), n/4))
	}
}

// doubleFilterKeys bounds the growth of a filter that fills up to twice.
const doubleFilterKeys = 64 << 20

// loadFilters returns the filters a Loader's n keys are to be added to
// before their ingest (ix.mu is held): the filter in use and the one being
// built, each if it has room for them. One that has not is dropped, and if
// none is left, a build with room for them and the LSM's keys starts (at
// once, when the LSM is empty: the rebuild of a lost index).
func (ix *Index) loadFilters(n int64) []*filter {
	room := func(f *filter) bool { return f.added.Load()+n <= f.capacity }
	if ix.filter != nil && !room(ix.filter) {
		ix.filter = nil
	}
	if ix.building != nil && !room(ix.building) {
		ix.dropBuild()
	}
	if ix.filter == nil && ix.building == nil {
		ix.startBuild((ix.keysHeld() + n) * 5 / 4)
	}
	return ix.filters()
}

// stopBuilds ends the builds under way and waits for them; ix.mu is not
// held. Until restartBuilds, none starts; after closing, none again.
func (ix *Index) stopBuilds(closing bool) {
	ix.mu.Lock()
	ix.closing = ix.closing || closing
	ix.stop()
	ix.mu.Unlock()
	ix.builds.Wait()
}

// restartBuilds lets builds start again after stopBuilds, unless the
// index is closing; ix.mu is held.
func (ix *Index) restartBuilds() {
	if !ix.closing {
		ix.buildCtx, ix.stop = context.WithCancel(context.Background())
	}
}

// filters returns the filters a spill adds its keys to; ix.mu is held.
func (ix *Index) filters() []*filter {
	fs := make([]*filter, 0, 2)
	for _, f := range []*filter{ix.filter, ix.building} {
		if f != nil {
			fs = append(fs, f)
		}
	}
	return fs
}

// addToFilters adds keys to each filter of fs but those of done.
func addToFilters(fs, done []*filter, keys map[Key]uint32) {
	for _, f := range fs {
		if slices.Contains(done, f) {
			continue
		}
		for k := range keys {
			f.add(&k)
		}
	}
}

// The filter kept across a restart: Close writes the filter in use to
// filterFile, with the list of the generations whose keys it holds, and
// Open reads it back when that list is the LSM's, instead of scanning
// every key (about 7 million a second on one core, 3 beside the live load:
// a minute or more per 100 million keys, with the lookups going to the LSM
// meanwhile). A generation is written once and never changes, so the same
// list (each one's id, keys, minutes, Mark's sequence and seal) means the
// same keys. Open removes the file, and does not use it unless the removal
// is on disk, so one is only there while the index is closed, as Close
// left it: after a crash, Open scans. A file that is torn, of another
// format, or for other generations (an LSM restored without it, or changed
// by a meterd that did not know of it) is not used: a filter missing a key
// would let its event be counted twice.

// filterFile names the file, in the index's directory.
const filterFile = "meterd-filter"

// filterMagic begins the file, and names its format: little-endian words,
// and the mapping of keys to bits of at and add.
var filterMagic = [8]byte{'m', 'e', 't', 'e', 'r', 'd', 'f', '1'}

// Sizes in the file: its header (the magic, blocks, probes, capacity,
// added and how many generations), each generation (id, keys, minutes,
// Mark's sequence, seal) and its trailer (a CRC-32C of all before it).
const (
	filterHeadSize  = 8 + 5*8
	filterGenSize   = 8 + 8 + 4 + 4 + 8 + 8
	filterTrailSize = 4
)

// filterFileSize is the size of the file of a filter of blocks blocks for
// n generations.
func filterFileSize(blocks, n uint64) uint64 {
	return filterHeadSize + n*filterGenSize + blocks*64 + filterTrailSize
}

// appendGen appends g's record in the file to b.
func appendGen(b []byte, g gen) []byte {
	b = binary.LittleEndian.AppendUint64(b, g.id)
	b = binary.LittleEndian.AppendUint64(b, uint64(g.Keys))
	b = binary.LittleEndian.AppendUint32(b, g.Min)
	b = binary.LittleEndian.AppendUint32(b, g.Max)
	b = binary.LittleEndian.AppendUint64(b, g.MarkSeq)
	sealed := uint64(0)
	if g.Sealed {
		sealed = 1
	}
	return binary.LittleEndian.AppendUint64(b, sealed)
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// saveFilter writes f as the filter of gens to dir's filterFile, through a
// temporary file renamed into place.
func saveFilter(dir string, f *filter, gens []gen) (err error) {
	tmp := filepath.Join(dir, filterFile+".tmp")
	file, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			file.Close()
			os.Remove(tmp)
		}
	}()
	sum := crc32.New(castagnoli)
	w := bufio.NewWriterSize(io.MultiWriter(file, sum), 1<<20)
	b := append([]byte(nil), filterMagic[:]...)
	for _, v := range []uint64{f.blocks, filterProbes, uint64(f.capacity), uint64(f.added.Load()), uint64(len(gens))} {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	for _, g := range gens {
		b = appendGen(b, g)
	}
	w.Write(b)
	buf := make([]byte, 0, 1<<16)
	for i := range f.words {
		if buf = binary.LittleEndian.AppendUint64(buf, f.words[i].Load()); len(buf) == cap(buf) {
			w.Write(buf)
			buf = buf[:0]
		}
	}
	w.Write(buf)
	if err := w.Flush(); err != nil {
		return err
	}
	if _, err := file.Write(binary.LittleEndian.AppendUint32(nil, sum.Sum32())); err != nil {
		return err
	}
	if err := file.Sync(); err != nil {
		return err
	}
	if err := file.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, filterFile)); err != nil {
		return err
	}
	return syncDir(dir)
}

// syncDir makes the creations, renames and removals in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}

// dropFilterFile removes dir's filterFile, and its temporary file, and
// makes that durable.
func dropFilterFile(dir string) error {
	path := filepath.Join(dir, filterFile)
	os.Remove(path + ".tmp")
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return syncDir(dir)
}

// loadFilter reads dir's filterFile, and removes it: the filter, if it was
// written for gens exactly and is whole and its removal durable; nil, with
// the reason, if not (nil and no error when there is no file).
func loadFilter(dir string, gens []gen) (f *filter, err error) {
	file, err := os.Open(filepath.Join(dir, filterFile))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			err = nil
		}
		return nil, errors.Join(err, dropFilterFile(dir))
	}
	defer func() {
		// Used only if it cannot be read again after a crash.
		if err = errors.Join(err, dropFilterFile(dir)); err != nil {
			f = nil
		}
	}()
	defer file.Close()
	fi, err := file.Stat()
	if err != nil {
		return nil, err
	}
	// The sum is of what is read through r; the sum itself is read from br.
	sum := crc32.New(castagnoli)
	br := bufio.NewReaderSize(file, 1<<20)
	r := io.TeeReader(br, sum)
	head := make([]byte, filterHeadSize)
	if _, err := io.ReadFull(r, head); err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	if [8]byte(head[:8]) != filterMagic {
		return nil, errors.New("not a filter of this format")
	}
	field := func(i int) uint64 { return binary.LittleEndian.Uint64(head[8+8*i:]) }
	blocks, probes, capacity, added, n := field(0), field(1), int64(field(2)), int64(field(3)), field(4)
	size := uint64(fi.Size())
	switch {
	case probes != filterProbes || blocks == 0 || capacity < 0 || added < 0:
		return nil, fmt.Errorf("header of %d blocks, %d probes, capacity %d, %d keys added: not of this format", blocks, probes, capacity, added)
	case blocks > size/64 || n > size/filterGenSize || filterFileSize(blocks, n) != size:
		return nil, fmt.Errorf("%d bytes, not the size of %d blocks and %d generations: torn", size, blocks, n)
	case n != uint64(len(gens)):
		return nil, fmt.Errorf("saved for %d generations, not the %d here", n, len(gens))
	}
	rec := make([]byte, filterGenSize)
	for _, g := range gens {
		if _, err := io.ReadFull(r, rec); err != nil {
			return nil, err
		}
		if want := appendGen(nil, g); !bytes.Equal(rec, want) {
			return nil, fmt.Errorf("saved for generation %d of %d keys, not %d of %d", binary.LittleEndian.Uint64(rec),
				binary.LittleEndian.Uint64(rec[8:]), g.id, g.Keys)
		}
	}
	f = &filter{words: make([]atomic.Uint64, blocks*8), blocks: blocks, capacity: capacity}
	f.added.Store(added)
	buf := make([]byte, 1<<16)
	for i := 0; i < len(f.words); {
		chunk := buf[:min(len(buf), (len(f.words)-i)*8)]
		if _, err := io.ReadFull(r, chunk); err != nil {
			return nil, err
		}
		for ; len(chunk) > 0; chunk = chunk[8:] {
			f.words[i].Store(binary.LittleEndian.Uint64(chunk))
			i++
		}
	}
	want := sum.Sum32()
	tail := make([]byte, filterTrailSize)
	if _, err := io.ReadFull(br, tail); err != nil {
		return nil, err
	}
	if binary.LittleEndian.Uint32(tail) != want {
		return nil, errors.New("checksum mismatch: corrupted")
	}
	return f, nil
}
