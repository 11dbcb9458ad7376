// Package spool is the collector's crash-safe, bounded, on-disk FIFO of
// opaque records. The collector appends sealed batches while NATS JetStream
// is unreachable and a replayer later reads them back in order, publishes
// them and acknowledges them.
//
// Records live in append-only segment files named by the Seq of their first
// record (00000000000000000001.seg). Each record is
//
//	length  uint32 LE   payload length
//	crc     uint32 LE   CRC-32C (Castagnoli) of seq || payload
//	seq     uint64 LE
//	payload [length]byte
//
// Append fsyncs before it returns, so an appended record survives a crash.
// The acknowledgement cursor is kept in a small file (cursor) replaced
// atomically; a crash may replay records acknowledged since the last cursor
// write, never lose unacknowledged ones. Payloads are never cached: memory
// use is a few fixed buffers plus a small struct per segment file, whatever
// the backlog.
//
// A directory must be used by one Spool at a time.
package spool

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
)

const (
	// DefaultMaxBytes is the bound of a spool whose Config.MaxBytes is 0.
	DefaultMaxBytes     = 1 << 30
	defaultSegmentBytes = 64 << 20

	headerSize = 16 // length, crc, seq

	segmentSuffix = ".seg"
	segmentDigits = 20
	cursorName    = "cursor"
	cursorTemp    = cursorName + ".tmp"
	cursorSize    = 12 // seq, crc of seq

	writeBufferSize = 128 << 10
	readBufferSize  = 64 << 10
)

// RecordOverhead is the bytes a record takes on disk beyond its payload: what
// Bytes and Config.MaxBytes count for it.
const RecordOverhead = headerSize

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrFull is returned by Append when the records would push the bytes of
// unacknowledged records past Config.MaxBytes. Nothing was written; the same
// Append can succeed once Ack has freed enough space.
var ErrFull = errors.New("spool: full")

// ErrClosed is returned by every method that needs the spool's files after
// Close.
var ErrClosed = errors.New("spool: closed")

// ErrTooLarge is returned by Append for a record whose encoded size (payload
// plus a 16-byte header) exceeds Config.MaxBytes or Config.SegmentBytes, and
// for a batch whose total encoded size exceeds Config.MaxBytes: retrying such
// an Append can never succeed. Nothing was written.
var ErrTooLarge = errors.New("spool: record too large")

// errCorrupt marks bytes in a segment file that are not a valid record: a
// torn write or damage on disk.
var errCorrupt = errors.New("corrupt record")

// Config configures a Spool. Dir is required.
type Config struct {
	// Dir is the directory holding segment files and the cursor file. It is
	// created if missing and must not be shared with another Spool.
	Dir string
	// MaxBytes bounds the bytes on disk of unacknowledged records, headers
	// included. 0 means 1 GiB. Acknowledged records still wait on disk until
	// their whole segment is acknowledged, so the directory may hold up to
	// about MaxBytes + SegmentBytes.
	MaxBytes int64
	// SegmentBytes is the size past which Append starts a new segment file.
	// 0 means 64 MiB. A batch is never split across files, so a segment may
	// exceed it by at most one batch.
	SegmentBytes int64
	// Logger receives recovery reports. nil discards them; the spool
	// adds the attribute component=spool.
	Logger *slog.Logger
}

// Validate reports whether c can be used to open a Spool.
func (c Config) Validate() error {
	switch {
	case c.Dir == "":
		return errors.New("spool: config: Dir is required")
	case c.MaxBytes < 0:
		return fmt.Errorf("spool: config: MaxBytes %d is negative", c.MaxBytes)
	case c.SegmentBytes < 0:
		return fmt.Errorf("spool: config: SegmentBytes %d is negative", c.SegmentBytes)
	}
	return nil
}

// Record is one spooled record.
type Record struct {
	// Seq is the record's sequence number: strictly increasing across the
	// spool's lifetime, restarts included.
	Seq uint64
	// Data is the payload as appended. It belongs to the caller.
	Data []byte
}

// segment is one segment file. Only the last one (Spool.active) is written
// to; only the first one can be partly acknowledged.
type segment struct {
	path string
	next uint64 // seq of the first unacknowledged record; last+1 when none
	last uint64 // seq of the last record
	off  int64  // offset of the first unacknowledged record
	size int64  // end of the last valid, durable record
	recs int    // unacknowledged records
	w    *os.File
}

// ackHint remembers where the records returned by the last Front ended, so
// that the usual Ack of the last returned Seq needs no disk reads.
type ackHint struct {
	seg   *segment
	start int64 // seg.off when Front read it
	end   int64 // offset just past the last returned record of seg
	last  uint64
	n     int // records of seg returned
}

// Spool is a crash-safe, bounded, on-disk FIFO of opaque records. Append is
// safe for concurrent use; Front and Ack are too, and are meant to be called
// by one replayer goroutine. A Spool must be closed with Close.
type Spool struct {
	cfg Config
	log *slog.Logger

	// Lock order: wmu, rmu, mu. wmu serialises writers (Append), rmu
	// serialises readers (Front, Ack); mu guards the fields below it and is
	// never held across disk I/O, so a replayer never waits on an fsync.
	wmu sync.Mutex
	bw  *bufio.Writer // writers only

	rmu  sync.Mutex
	br   *bufio.Reader // readers only
	hint ackHint       // readers only

	smu sync.Mutex // serialises SetAside

	mu      sync.Mutex
	segs    []*segment
	active  *segment // last of segs, open for writing; nil until the next Append creates one
	nextSeq uint64
	acked   uint64 // every seq <= acked is acknowledged
	count   int
	bytes   int64
	werr    error // set when a failed Append could not be rolled back
	closed  bool
}

// Open opens the spool in cfg.Dir, creating the directory if needed, and
// recovers its state. A torn or corrupt tail of the last segment (a short
// header, a short payload, a checksum or sequence mismatch) is truncated away
// with a warning. Corruption in an earlier segment is logged as an error and
// the rest of that segment is skipped. Open never returns damaged bytes as a
// record; it fails only on I/O errors.
func Open(cfg Config) (*Spool, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.MaxBytes == 0 {
		cfg.MaxBytes = DefaultMaxBytes
	}
	if cfg.SegmentBytes == 0 {
		cfg.SegmentBytes = defaultSegmentBytes
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s := &Spool{
		cfg: cfg,
		log: logger.With("component", "spool"),
		bw:  bufio.NewWriterSize(nil, writeBufferSize),
		br:  bufio.NewReaderSize(nil, readBufferSize),
	}
	if err := os.MkdirAll(cfg.Dir, 0o750); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	if err := os.Remove(filepath.Join(cfg.Dir, cursorTemp)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("spool: %w", err)
	}
	if err := s.recover(); err != nil {
		s.closeWriter()
		return nil, fmt.Errorf("spool: open %s: %w", cfg.Dir, err)
	}
	return s, nil
}

// recover rebuilds the in-memory state from the cursor and segment files.
func (s *Spool) recover() error {
	acked, err := s.readCursor()
	if err != nil {
		return err
	}
	names, err := segmentFiles(s.cfg.Dir)
	if err != nil {
		return err
	}
	var (
		prevLast uint64
		removed  bool
	)
	for i, first := range names {
		isLast := i == len(names)-1
		path := filepath.Join(s.cfg.Dir, segmentName(first))
		seg, fileSize, scanErr, err := s.scanSegment(path, first, prevLast, acked)
		if err != nil {
			return err
		}
		if scanErr != nil {
			if isLast {
				s.log.Warn("truncating torn tail of last segment",
					"segment", path, "offset", seg.size, "dropped_bytes", fileSize-seg.size, "reason", scanErr)
				if err := truncateFile(path, seg.size); err != nil {
					return err
				}
			} else {
				s.log.Error("corrupt spool segment: skipping the rest of it, records in it are lost",
					"segment", path, "offset", seg.size, "skipped_bytes", fileSize-seg.size, "reason", scanErr)
			}
		}
		if seg.size > 0 {
			prevLast = seg.last
		}
		if seg.recs == 0 {
			// Empty, or acknowledged up to its end: nothing to replay.
			if err := os.Remove(path); err != nil {
				return err
			}
			removed = true
			continue
		}
		s.segs = append(s.segs, seg)
		s.count += seg.recs
		s.bytes += seg.size - seg.off
		if isLast {
			// Only the last file may be extended: an earlier one can have
			// garbage past its valid end.
			if seg.w, err = os.OpenFile(path, os.O_WRONLY, 0); err != nil {
				return err
			}
			s.active = seg
		}
	}
	if removed {
		if err := syncDir(s.cfg.Dir); err != nil {
			return err
		}
	}
	s.acked = acked
	// A file's name is the seq of its first record, so seqs below the last
	// name may have been handed out even if their records were lost.
	s.nextSeq = max(prevLast, acked) + 1
	if n := len(names); n > 0 {
		s.nextSeq = max(s.nextSeq, names[n-1])
	}
	return nil
}

// scanSegment validates every record of the segment file at path. It
// returns the segment as far as it is valid, the file size, and scanErr
// describing the first invalid bytes (nil when the file is valid to its end).
// err reports an I/O error.
func (s *Spool) scanSegment(path string, first, prevLast, acked uint64) (seg *segment, fileSize int64, scanErr, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, nil, err
	}
	seg = &segment{path: path, next: first, last: first - 1}
	if first <= prevLast {
		return seg, fi.Size(), fmt.Errorf("%w: segment starts at seq %d, not after %d", errCorrupt, first, prevLast), nil
	}
	r := recordReader{br: s.br, off: 0, end: fi.Size(), want: first}
	r.br.Reset(io.NewSectionReader(f, 0, fi.Size()))
	for r.off < r.end {
		seq, _, err := r.next(false)
		if err != nil {
			if errors.Is(err, errCorrupt) {
				return seg, fi.Size(), err, nil
			}
			return nil, 0, nil, fmt.Errorf("read %s: %w", path, err)
		}
		seg.last, seg.size = seq, r.off
		if seq <= acked {
			seg.next, seg.off = seq+1, r.off
		} else {
			seg.recs++
		}
	}
	return seg, fi.Size(), nil, nil
}

// recordReader decodes consecutive records of one segment.
type recordReader struct {
	br   *bufio.Reader // positioned at off
	off  int64         // offset of the next record
	end  int64         // end of the bytes to decode
	want uint64        // seq the next record must carry
}

// peekLength returns the payload length in the header of the record at
// r.off without consuming it, or 0 when the header cannot be read (next
// then reports why).
func (r *recordReader) peekLength() int64 {
	hdr, err := r.br.Peek(4)
	if err != nil {
		return 0
	}
	return int64(binary.LittleEndian.Uint32(hdr))
}

// next decodes the record at r.off and, when keep is set, returns a copy of
// its payload. Bytes that are not the expected record give an error wrapping
// errCorrupt; anything else is an I/O error.
func (r *recordReader) next(keep bool) (uint64, []byte, error) {
	var hdr [headerSize]byte
	if r.end-r.off < headerSize {
		return 0, nil, fmt.Errorf("%w at offset %d: short header (%d bytes)", errCorrupt, r.off, r.end-r.off)
	}
	if _, err := io.ReadFull(r.br, hdr[:]); err != nil {
		return 0, nil, err
	}
	length := int64(binary.LittleEndian.Uint32(hdr[0:]))
	sum := binary.LittleEndian.Uint32(hdr[4:])
	seq := binary.LittleEndian.Uint64(hdr[8:])
	if avail := r.end - r.off - headerSize; length > avail {
		return 0, nil, fmt.Errorf("%w at offset %d: short payload (%d of %d bytes)", errCorrupt, r.off, avail, length)
	}
	crc := crc32.Update(0, castagnoli, hdr[8:])
	var data []byte
	if keep {
		data = make([]byte, length)
		if _, err := io.ReadFull(r.br, data); err != nil {
			return 0, nil, err
		}
		crc = crc32.Update(crc, castagnoli, data)
	} else {
		// Checksum the payload in place: recovery must not hold payloads.
		for rest := int(length); rest > 0; {
			chunk, err := r.br.Peek(min(rest, r.br.Size()))
			if err != nil {
				return 0, nil, err
			}
			crc = crc32.Update(crc, castagnoli, chunk)
			_, _ = r.br.Discard(len(chunk))
			rest -= len(chunk)
		}
	}
	if crc != sum {
		return 0, nil, fmt.Errorf("%w at offset %d: checksum mismatch", errCorrupt, r.off)
	}
	if seq != r.want {
		return 0, nil, fmt.Errorf("%w at offset %d: seq %d, want %d", errCorrupt, r.off, seq, r.want)
	}
	r.off += headerSize + length
	r.want++
	return seq, data, nil
}

// Append writes data as consecutive records, then makes them durable with
// one fsync. It is all or nothing: on error no record is visible, now or
// after a restart, except that a crash during Append may leave a prefix of
// the records on disk. It returns ErrFull when the records would exceed
// MaxBytes, ErrTooLarge for records that can never fit, ErrClosed after Close.
// Append does not retain data.
func (s *Spool) Append(data ...[]byte) error {
	var total int64
	for _, d := range data {
		size := headerSize + int64(len(d))
		if len(d) > math.MaxUint32 || size > s.cfg.MaxBytes || size > s.cfg.SegmentBytes {
			return fmt.Errorf("%w: %d bytes", ErrTooLarge, len(d))
		}
		total += size
	}
	if total > s.cfg.MaxBytes {
		return fmt.Errorf("%w: batch of %d bytes exceeds MaxBytes %d", ErrTooLarge, total, s.cfg.MaxBytes)
	}

	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	switch {
	case s.closed:
		s.mu.Unlock()
		return ErrClosed
	case s.werr != nil:
		s.mu.Unlock()
		return s.werr
	case len(data) == 0:
		s.mu.Unlock()
		return nil
	case s.bytes+total > s.cfg.MaxBytes:
		s.mu.Unlock()
		return ErrFull
	}
	first := s.nextSeq
	s.mu.Unlock()

	// Only writers change s.active and the size of the active segment, and
	// we hold wmu: both can be read without mu.
	seg, created := s.active, false
	if seg == nil || (seg.size > 0 && seg.size+total > s.cfg.SegmentBytes) {
		var err error
		if seg, err = s.createSegment(first); err != nil {
			return fmt.Errorf("spool: append: %w", err)
		}
		created = true
	}
	if err := s.write(seg, first, data); err != nil {
		s.rollback(seg, created)
		return fmt.Errorf("spool: append: %w", err)
	}

	last := first + uint64(len(data)) - 1
	s.mu.Lock()
	old := s.active
	if created {
		s.segs = append(s.segs, seg)
		s.active = seg
	}
	seg.size += total
	seg.last = last
	seg.recs += len(data)
	s.count += len(data)
	s.bytes += total
	s.nextSeq = last + 1
	s.mu.Unlock()
	if created && old != nil {
		// Its records are durable; a failed close loses nothing.
		_ = old.w.Close()
		old.w = nil
	}
	return nil
}

// createSegment creates the segment file whose first record is seq.
func (s *Spool) createSegment(seq uint64) (*segment, error) {
	path := filepath.Join(s.cfg.Dir, segmentName(seq))
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return nil, err
	}
	if err := syncDir(s.cfg.Dir); err != nil {
		_ = f.Close()
		_ = os.Remove(path)
		return nil, err
	}
	return &segment{path: path, next: seq, last: seq - 1, w: f}, nil
}

// write encodes data at the end of seg, seq first, and fsyncs the file.
func (s *Spool) write(seg *segment, seq uint64, data [][]byte) error {
	s.bw.Reset(io.NewOffsetWriter(seg.w, seg.size))
	var hdr [headerSize]byte
	for _, d := range data {
		binary.LittleEndian.PutUint32(hdr[0:], uint32(len(d)))
		binary.LittleEndian.PutUint64(hdr[8:], seq)
		crc := crc32.Update(crc32.Update(0, castagnoli, hdr[8:]), castagnoli, d)
		binary.LittleEndian.PutUint32(hdr[4:], crc)
		if _, err := s.bw.Write(hdr[:]); err != nil {
			return err
		}
		if _, err := s.bw.Write(d); err != nil {
			return err
		}
		seq++
	}
	if err := s.bw.Flush(); err != nil {
		return err
	}
	return seg.w.Sync()
}

// rollback removes what a failed write may have left. If that fails too, the
// file's content is unknown and later Appends fail until a restart recovers.
func (s *Spool) rollback(seg *segment, created bool) {
	var err error
	if created {
		err = errors.Join(seg.w.Close(), os.Remove(seg.path))
		if err == nil {
			err = syncDir(s.cfg.Dir)
		}
	} else {
		err = seg.w.Truncate(seg.size)
		if err == nil {
			err = seg.w.Sync()
		}
	}
	if err != nil {
		s.mu.Lock()
		s.werr = fmt.Errorf("spool: unusable after a failed append could not be rolled back: %w", err)
		s.mu.Unlock()
	}
}

// Front returns up to max of the oldest unacknowledged records, in Seq
// order, read from disk. It returns an empty slice when there are none.
// Records stay in the spool until acknowledged with Ack.
func (s *Spool) Front(max int) ([]Record, error) {
	return s.FrontBytes(max, math.MaxInt64)
}

// FrontBytes is Front bounded by bytes as well: it stops before a record
// that would take the payloads returned past maxBytes, but always returns
// the oldest record when there is one, so that its caller's memory is
// bounded by the larger of maxBytes and one record.
func (s *Spool) FrontBytes(max int, maxBytes int64) ([]Record, error) {
	s.rmu.Lock()
	defer s.rmu.Unlock()

	type span struct {
		seg       *segment
		off, size int64
		next      uint64
		n         int
	}
	var spans []span
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	for _, seg := range s.segs {
		if max <= 0 {
			break
		}
		if seg.recs == 0 {
			continue
		}
		n := min(seg.recs, max)
		spans = append(spans, span{seg: seg, off: seg.off, size: seg.size, next: seg.next, n: n})
		max -= n
	}
	s.mu.Unlock()

	recs := []Record{}
	s.hint = ackHint{}
	var total int64
	for _, sp := range spans {
		f, err := os.Open(sp.seg.path)
		if err != nil {
			return nil, fmt.Errorf("spool: front: %w", err)
		}
		r := recordReader{br: s.br, off: sp.off, end: sp.size, want: sp.next}
		r.br.Reset(io.NewSectionReader(f, sp.off, sp.size-sp.off))
		n, full := 0, false
		for range sp.n {
			if len(recs) > 0 && total+r.peekLength() > maxBytes {
				full = true
				break
			}
			seq, data, err := r.next(true)
			if err != nil {
				_ = f.Close()
				return nil, fmt.Errorf("spool: front: %s: %w", sp.seg.path, err)
			}
			recs = append(recs, Record{Seq: seq, Data: data})
			total += int64(len(data))
			n++
		}
		_ = f.Close()
		if n > 0 {
			s.hint = ackHint{seg: sp.seg, start: sp.off, end: r.off, last: r.want - 1, n: n}
		}
		if full {
			break
		}
	}
	return recs, nil
}

// Ack acknowledges every record with Seq <= seq (Seqs past the last
// appended record are ignored). It persists the acknowledgement before it
// returns and deletes segment files whose records are all acknowledged. A
// restart does not replay acknowledged records, except those acknowledged
// since a crash interrupted Ack.
func (s *Spool) Ack(seq uint64) error {
	s.rmu.Lock()
	defer s.rmu.Unlock()

	// Plan under mu, do the I/O without it, then apply. Holding rmu means
	// only Append runs meanwhile, and it only adds records at the end.
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	seq = min(seq, s.nextSeq-1)
	if seq <= s.acked {
		s.mu.Unlock()
		return nil
	}
	drop := 0
	for drop < len(s.segs) && s.segs[drop].last <= seq && s.segs[drop] != s.active {
		drop++
	}
	var head *segment
	var off, size int64
	if drop < len(s.segs) {
		head = s.segs[drop]
		off, size = head.off, head.size
	}
	s.mu.Unlock()

	var (
		n    int
		next uint64
	)
	if head != nil {
		start := off
		if h := s.hint; h.seg == head && h.start == start && h.last <= seq {
			off, n = h.end, h.n
		}
		var err error
		if off, next, n, err = scanTo(head.path, off, size, seq, n); err != nil {
			return fmt.Errorf("spool: ack %d: %w", seq, err)
		}
		if off == size {
			next = seq + 1
		}
		off -= start // now the bytes acknowledged in head
	}
	if err := s.writeCursor(seq); err != nil {
		return fmt.Errorf("spool: ack %d: %w", seq, err)
	}

	s.mu.Lock()
	dropped := slices.Clone(s.segs[:drop])
	for _, seg := range dropped {
		s.count -= seg.recs
		s.bytes -= seg.size - seg.off
	}
	s.segs = slices.Delete(s.segs, 0, drop)
	if head != nil {
		head.off += off
		head.next = max(head.next, next)
		head.recs -= n
		s.count -= n
		s.bytes -= off
	}
	s.acked = seq
	s.mu.Unlock()

	var errs []error
	for _, seg := range dropped {
		errs = append(errs, os.Remove(seg.path))
	}
	if len(dropped) > 0 {
		errs = append(errs, syncDir(s.cfg.Dir))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("spool: ack %d: delete acknowledged segments: %w", seq, err)
	}
	return nil
}

// scanTo walks the record headers of the segment file at path from off
// (where n records were already counted) up to size, past every record with
// seq <= upTo. It returns the offset and seq of the first record after them
// and the count of records passed.
func scanTo(path string, off, size int64, upTo uint64, n int) (int64, uint64, int, error) {
	if off >= size {
		return off, 0, n, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, 0, err
	}
	defer f.Close()
	var hdr [headerSize]byte
	for off < size {
		if _, err := f.ReadAt(hdr[:], off); err != nil {
			return 0, 0, 0, fmt.Errorf("%s offset %d: %w", path, off, err)
		}
		seq := binary.LittleEndian.Uint64(hdr[8:])
		if seq > upTo {
			return off, seq, n, nil
		}
		off += headerSize + int64(binary.LittleEndian.Uint32(hdr[0:]))
		n++
	}
	if off != size {
		return 0, 0, 0, fmt.Errorf("%w: %s: record crosses offset %d", errCorrupt, path, size)
	}
	return off, 0, n, nil
}

// Len returns the number of unacknowledged records.
func (s *Spool) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.count
}

// Bytes returns the bytes on disk of unacknowledged records, headers
// included: the quantity bounded by Config.MaxBytes.
func (s *Spool) Bytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bytes
}

// Close waits for running calls and releases the spool's files. Later calls
// return ErrClosed; Close itself can be called again and returns nil.
func (s *Spool) Close() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.rmu.Lock()
	defer s.rmu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.closeWriter()
}

// closeWriter closes the active segment's file.
func (s *Spool) closeWriter() error {
	if s.active == nil || s.active.w == nil {
		return nil
	}
	err := s.active.w.Close()
	s.active.w = nil
	if err != nil {
		return fmt.Errorf("spool: close: %w", err)
	}
	return nil
}

// readCursor returns the persisted acknowledgement cursor, 0 when there is
// none. A damaged cursor is reported and ignored: replaying acknowledged
// records is tolerated, failing to start is not.
func (s *Spool) readCursor() (uint64, error) {
	path := filepath.Join(s.cfg.Dir, cursorName)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	if len(b) != cursorSize || crc32.Checksum(b[:8], castagnoli) != binary.LittleEndian.Uint32(b[8:]) {
		s.log.Error("damaged acknowledgement cursor ignored: acknowledged records will be replayed", "file", path)
		return 0, nil
	}
	return binary.LittleEndian.Uint64(b), nil
}

// writeCursor durably replaces the cursor file.
func (s *Spool) writeCursor(seq uint64) error {
	var b [cursorSize]byte
	binary.LittleEndian.PutUint64(b[:], seq)
	binary.LittleEndian.PutUint32(b[8:], crc32.Checksum(b[:8], castagnoli))
	return writeFileSync(filepath.Join(s.cfg.Dir, cursorName), b[:])
}

// writeFileSync durably replaces the file at path with data: write a
// temporary file (path.tmp), fsync it, rename it over path, fsync the
// directory. path is never seen half written.
func writeFileSync(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if err = errors.Join(err, f.Close()); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

// SetAsideDir is the directory, inside the spool's, that holds the records
// a caller set aside with SetAside. Segment recovery ignores it.
const SetAsideDir = "set-aside"

// setAsideNote is the suffix of the note beside a set-aside record.
const setAsideNote = ".reason"

// SetAside durably writes data, a record the caller takes out of the FIFO
// (it still acknowledges it with Ack), to the file name in SetAsideDir, and
// note to a file beside it (name without its extension, plus ".reason"),
// the note first, so that every record set aside has its note. It returns
// the record's path. Files stay until an operator removes them.
func (s *Spool) SetAside(name string, data []byte, note string) (string, error) {
	if name == "" || name != filepath.Base(name) || strings.HasSuffix(name, setAsideNote) || strings.HasSuffix(name, ".tmp") {
		return "", fmt.Errorf("spool: set aside: bad file name %q", name)
	}
	s.smu.Lock()
	defer s.smu.Unlock()
	dir := filepath.Join(s.cfg.Dir, SetAsideDir)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return "", fmt.Errorf("spool: set aside: %w", err)
	}
	base := strings.TrimSuffix(name, filepath.Ext(name))
	if err := writeFileSync(filepath.Join(dir, base+setAsideNote), []byte(note)); err != nil {
		return "", fmt.Errorf("spool: set aside: %w", err)
	}
	path := filepath.Join(dir, name)
	if err := writeFileSync(path, data); err != nil {
		return "", fmt.Errorf("spool: set aside: %w", err)
	}
	return path, nil
}

// SetAsideCount is the number of records in SetAsideDir (notes and
// temporary files aside).
func (s *Spool) SetAsideCount() int {
	entries, err := os.ReadDir(filepath.Join(s.cfg.Dir, SetAsideDir))
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		if name := e.Name(); e.Type().IsRegular() && !strings.HasSuffix(name, setAsideNote) && !strings.HasSuffix(name, ".tmp") {
			n++
		}
	}
	return n
}

// segmentName is the file name of the segment whose first record is seq.
func segmentName(seq uint64) string {
	return fmt.Sprintf("%0*d%s", segmentDigits, seq, segmentSuffix)
}

// segmentFiles returns the first seqs of the segment files in dir, ascending.
// Other files are ignored.
func segmentFiles(dir string) ([]uint64, error) {
	entries, err := os.ReadDir(dir) // sorted by name, and names sort by seq
	if err != nil {
		return nil, err
	}
	var seqs []uint64
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), segmentSuffix)
		if !ok || len(name) != segmentDigits || !e.Type().IsRegular() {
			continue
		}
		seq, err := strconv.ParseUint(name, 10, 64)
		if err != nil || seq == 0 {
			continue
		}
		seqs = append(seqs, seq)
	}
	return seqs, nil
}

// truncateFile cuts the file at path to size and fsyncs it.
func truncateFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

// syncDir fsyncs a directory so that created, renamed and removed entries in
// it survive a crash.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}
