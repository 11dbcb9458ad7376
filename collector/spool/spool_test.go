package spool

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// rec is the on-disk size of a record with an n-byte payload.
func rec(n int) int64 { return headerSize + int64(n) }

// payload returns a distinct n-byte payload for record i.
func payload(i, n int) []byte {
	b := bytes.Repeat([]byte{byte('a' + i%26)}, n)
	copy(b, fmt.Sprintf("r%d-", i))
	return b
}

func open(t testing.TB, cfg Config) *Spool {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// reopen closes s and opens its directory again, logging to log if non-nil.
func reopen(t *testing.T, s *Spool, log *bytes.Buffer) *Spool {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	cfg := s.cfg
	cfg.Logger = slog.New(slog.DiscardHandler)
	if log != nil {
		cfg.Logger = slog.New(slog.NewTextHandler(log, nil))
	}
	return open(t, cfg)
}

func mustAppend(t testing.TB, s *Spool, data ...[]byte) {
	t.Helper()
	if err := s.Append(data...); err != nil {
		t.Fatalf("Append: %v", err)
	}
}

func mustAck(t *testing.T, s *Spool, seq uint64) {
	t.Helper()
	if err := s.Ack(seq); err != nil {
		t.Fatalf("Ack(%d): %v", seq, err)
	}
}

func front(t *testing.T, s *Spool, max int) []Record {
	t.Helper()
	recs, err := s.Front(max)
	if err != nil {
		t.Fatalf("Front(%d): %v", max, err)
	}
	if recs == nil {
		t.Fatalf("Front(%d) returned nil, want a non-nil slice", max)
	}
	return recs
}

func seqs(recs []Record) []uint64 {
	out := make([]uint64, len(recs))
	for i, r := range recs {
		out[i] = r.Seq
	}
	return out
}

func seqRange(from, to uint64) []uint64 {
	var out []uint64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

// segmentsIn lists the segment files of dir with their sizes.
func segmentsIn(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), segmentSuffix) {
			fi, err := e.Info()
			if err != nil {
				t.Fatal(err)
			}
			out[strings.TrimLeft(strings.TrimSuffix(e.Name(), segmentSuffix), "0")] = fi.Size()
		}
	}
	return out
}

func checkState(t *testing.T, s *Spool, wantLen int, wantBytes int64) {
	t.Helper()
	if got := s.Len(); got != wantLen {
		t.Errorf("Len = %d, want %d", got, wantLen)
	}
	if got := s.Bytes(); got != wantBytes {
		t.Errorf("Bytes = %d, want %d", got, wantBytes)
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"defaults", Config{Dir: "x"}, true},
		{"explicit", Config{Dir: "x", MaxBytes: 1 << 20, SegmentBytes: 1 << 10}, true},
		{"no dir", Config{}, false},
		{"negative max", Config{Dir: "x", MaxBytes: -1}, false},
		{"negative segment", Config{Dir: "x", SegmentBytes: -1}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.cfg.Validate(); (err == nil) != tt.ok {
				t.Errorf("Validate() = %v, want ok=%v", err, tt.ok)
			}
		})
	}
	if _, err := Open(Config{}); err == nil {
		t.Error("Open without Dir succeeded")
	}
}

func TestAppendFrontAckAcrossSegments(t *testing.T) {
	dir := t.TempDir()
	// 36-byte records, 100-byte segments: two records per segment.
	s := open(t, Config{Dir: dir, SegmentBytes: 100})
	for i := 1; i <= 10; i++ {
		mustAppend(t, s, payload(i, 20))
	}
	// A batch is not split across files: it opens 11.seg, over SegmentBytes.
	mustAppend(t, s, payload(11, 20), payload(12, 20), payload(13, 20))
	wantFiles := map[string]int64{"1": 72, "3": 72, "5": 72, "7": 72, "9": 72, "11": 108}
	if got := segmentsIn(t, dir); !maps(got, wantFiles) {
		t.Fatalf("segments = %v, want %v", got, wantFiles)
	}
	checkState(t, s, 13, 13*rec(20))

	recs := front(t, s, 3)
	if got := seqs(recs); !slices.Equal(got, []uint64{1, 2, 3}) {
		t.Fatalf("Front(3) seqs = %v", got)
	}
	for _, r := range recs {
		if want := payload(int(r.Seq), 20); !bytes.Equal(r.Data, want) {
			t.Fatalf("record %d = %q, want %q", r.Seq, r.Data, want)
		}
	}
	// Front does not consume.
	if got := seqs(front(t, s, 2)); !slices.Equal(got, []uint64{1, 2}) {
		t.Fatalf("second Front(2) seqs = %v", got)
	}

	mustAck(t, s, 3)
	checkState(t, s, 10, 10*rec(20))
	delete(wantFiles, "1")
	if got := segmentsIn(t, dir); !maps(got, wantFiles) {
		t.Fatalf("after Ack(3) segments = %v, want %v", got, wantFiles)
	}

	// Ack less than Front returned: the rest stays.
	if got := seqs(front(t, s, 4)); !slices.Equal(got, []uint64{4, 5, 6, 7}) {
		t.Fatalf("Front(4) seqs = %v", got)
	}
	mustAck(t, s, 5)
	checkState(t, s, 8, 8*rec(20))
	mustAck(t, s, 4) // already acknowledged: no effect
	checkState(t, s, 8, 8*rec(20))
	if got := seqs(front(t, s, 100)); !slices.Equal(got, seqRange(6, 13)) {
		t.Fatalf("Front(100) seqs = %v", got)
	}

	mustAck(t, s, 13)
	checkState(t, s, 0, 0)
	// The active segment stays, though fully acknowledged.
	if got := segmentsIn(t, dir); !maps(got, map[string]int64{"11": 108}) {
		t.Fatalf("after Ack(13) segments = %v", got)
	}
	if got := front(t, s, 10); len(got) != 0 {
		t.Fatalf("Front on empty spool = %v", seqs(got))
	}

	mustAppend(t, s, payload(14, 20))
	recs = front(t, s, 10)
	if len(recs) != 1 || recs[0].Seq != 14 || !bytes.Equal(recs[0].Data, payload(14, 20)) {
		t.Fatalf("Front after refill = %v", seqs(recs))
	}
	mustAck(t, s, 14)
	if got := segmentsIn(t, dir); !maps(got, map[string]int64{"14": 36}) {
		t.Fatalf("after Ack(14) segments = %v", got)
	}
}

func maps(a, b map[string]int64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestRestartPreservesUnacked(t *testing.T) {
	s := open(t, Config{Dir: t.TempDir(), SegmentBytes: 100})
	for i := 1; i <= 5; i++ {
		mustAppend(t, s, payload(i, 20))
	}
	front(t, s, 2)
	mustAck(t, s, 2)

	s = reopen(t, s, nil)
	checkState(t, s, 3, 3*rec(20))
	recs := front(t, s, 10)
	if got := seqs(recs); !slices.Equal(got, []uint64{3, 4, 5}) {
		t.Fatalf("after restart seqs = %v", got)
	}
	for _, r := range recs {
		if !bytes.Equal(r.Data, payload(int(r.Seq), 20)) {
			t.Fatalf("record %d = %q", r.Seq, r.Data)
		}
	}
	mustAppend(t, s, payload(6, 20))
	if got := seqs(front(t, s, 10)); !slices.Equal(got, []uint64{3, 4, 5, 6}) {
		t.Fatalf("after append seqs = %v", got)
	}

	s = reopen(t, s, nil)
	checkState(t, s, 4, 4*rec(20))
	if got := seqs(front(t, s, 10)); !slices.Equal(got, []uint64{3, 4, 5, 6}) {
		t.Fatalf("after second restart seqs = %v", got)
	}
}

func TestAckCursorSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Config{Dir: dir})
	var batch [][]byte
	for i := 1; i <= 10; i++ {
		batch = append(batch, payload(i, 30))
	}
	mustAppend(t, s, batch...)
	// A partial acknowledgement inside the only segment, without a Front.
	mustAck(t, s, 7)

	s = reopen(t, s, nil)
	checkState(t, s, 3, 3*rec(30))
	if got := seqs(front(t, s, 100)); !slices.Equal(got, []uint64{8, 9, 10}) {
		t.Fatalf("after restart seqs = %v, want [8 9 10]", got)
	}

	mustAck(t, s, 10)
	s = reopen(t, s, nil)
	checkState(t, s, 0, 0)
	if got := segmentsIn(t, dir); len(got) != 0 {
		t.Fatalf("fully acknowledged segments left: %v", got)
	}
	mustAppend(t, s, payload(11, 30))
	if got := seqs(front(t, s, 10)); !slices.Equal(got, []uint64{11}) {
		t.Fatalf("seq after restart with no segments = %v, want [11]", got)
	}

	// Acknowledging past the end acknowledges what exists, no more.
	mustAck(t, s, math.MaxUint64)
	mustAppend(t, s, payload(12, 30))
	s = reopen(t, s, nil)
	if got := seqs(front(t, s, 10)); !slices.Equal(got, []uint64{12}) {
		t.Fatalf("after Ack(MaxUint64) and restart seqs = %v, want [12]", got)
	}
}

func TestDamagedCursorReplays(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Config{Dir: dir})
	mustAppend(t, s, payload(1, 10), payload(2, 10), payload(3, 10))
	mustAck(t, s, 2)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, cursorName), []byte("garbage-bytes"), 0o640); err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	s = reopen(t, s, &log)
	if got := seqs(front(t, s, 10)); !slices.Equal(got, []uint64{1, 2, 3}) {
		t.Fatalf("seqs = %v, want all replayed", got)
	}
	if !strings.Contains(log.String(), "level=ERROR") || !strings.Contains(log.String(), "component=spool") {
		t.Errorf("log = %q, want an error with component=spool", log.String())
	}
}

func TestErrFull(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Config{Dir: dir, MaxBytes: 5 * rec(20), SegmentBytes: 100})
	for i := 1; i <= 3; i++ {
		mustAppend(t, s, payload(i, 20))
	}
	before := segmentsIn(t, dir)

	err := s.Append(payload(4, 20), payload(5, 20), payload(6, 20))
	if !errors.Is(err, ErrFull) {
		t.Fatalf("Append over MaxBytes = %v, want ErrFull", err)
	}
	checkState(t, s, 3, 3*rec(20))
	if got := segmentsIn(t, dir); !maps(got, before) {
		t.Fatalf("ErrFull changed files: %v, was %v", got, before)
	}

	mustAck(t, s, 2)
	mustAppend(t, s, payload(4, 20), payload(5, 20), payload(6, 20))
	checkState(t, s, 4, 4*rec(20))
	if err := s.Append(payload(7, 20), payload(8, 20)); !errors.Is(err, ErrFull) {
		t.Fatalf("Append = %v, want ErrFull", err)
	}
	mustAppend(t, s, payload(7, 20))
	checkState(t, s, 5, 5*rec(20))

	s = reopen(t, s, nil)
	checkState(t, s, 5, 5*rec(20))
	recs := front(t, s, 10)
	if got := seqs(recs); !slices.Equal(got, seqRange(3, 7)) {
		t.Fatalf("after restart seqs = %v", got)
	}
	for _, r := range recs {
		if !bytes.Equal(r.Data, payload(int(r.Seq), 20)) {
			t.Fatalf("record %d = %q", r.Seq, r.Data)
		}
	}
}

func TestErrTooLarge(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		data [][]byte
	}{
		{"over SegmentBytes", Config{MaxBytes: 1000, SegmentBytes: 100}, [][]byte{make([]byte, 85)}},
		{"over MaxBytes", Config{MaxBytes: 100, SegmentBytes: 1000}, [][]byte{make([]byte, 85)}},
		{"batch over MaxBytes", Config{MaxBytes: 100, SegmentBytes: 1000}, [][]byte{make([]byte, 40), make([]byte, 40)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.Dir = t.TempDir()
			s := open(t, tt.cfg)
			if err := s.Append(tt.data...); !errors.Is(err, ErrTooLarge) {
				t.Fatalf("Append = %v, want ErrTooLarge", err)
			}
			checkState(t, s, 0, 0)
			if got := segmentsIn(t, tt.cfg.Dir); len(got) != 0 {
				t.Fatalf("files written: %v", got)
			}
			mustAppend(t, s, make([]byte, 84)) // exactly 100 bytes on disk
			checkState(t, s, 1, 100)
		})
	}
}

func TestTornTail(t *testing.T) {
	const n, size = 5, 30 // 46-byte records, all in one segment
	r := rec(size)
	tests := []struct {
		name     string
		mutate   func(b []byte) []byte
		survivor int
	}{
		{"truncate 3 bytes", func(b []byte) []byte { return b[:len(b)-3] }, 4},
		{"truncate into header", func(b []byte) []byte { return b[:4*r+10] }, 4},
		{"truncate into first header", func(b []byte) []byte { return b[:5] }, 0},
		{"append garbage", func(b []byte) []byte { return append(b, "garbage"...) }, 5},
		{"repeat last record", func(b []byte) []byte { return append(b, b[4*r:]...) }, 5},
		{"append zero header", func(b []byte) []byte { return append(b, make([]byte, headerSize)...) }, 5},
		{"flip payload byte of last record", func(b []byte) []byte { b[len(b)-1] ^= 0x01; return b }, 4},
		{"flip checksum of last record", func(b []byte) []byte { b[4*r+5] ^= 0x80; return b }, 4},
		{"flip seq of last record", func(b []byte) []byte { b[4*r+8] ^= 0x02; return b }, 4},
		{"huge length in last record", func(b []byte) []byte { b[4*r+3] = 0x7f; return b }, 4},
		{"flip byte in third record", func(b []byte) []byte { b[2*r+20] ^= 0xff; return b }, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := open(t, Config{Dir: dir})
			for i := 1; i <= n; i++ {
				mustAppend(t, s, payload(i, size))
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, segmentName(1))
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, tt.mutate(b), 0o640); err != nil {
				t.Fatal(err)
			}

			var log bytes.Buffer
			s = reopen(t, s, &log)
			if !strings.Contains(log.String(), "level=WARN msg=\"truncating torn tail") {
				t.Errorf("log = %q, want a truncation warning", log.String())
			}
			checkState(t, s, tt.survivor, int64(tt.survivor)*r)
			recs := front(t, s, 100)
			if got := seqs(recs); !slices.Equal(got, seqRange(1, uint64(tt.survivor))) {
				t.Fatalf("seqs = %v, want 1..%d", got, tt.survivor)
			}
			for _, rc := range recs {
				if !bytes.Equal(rc.Data, payload(int(rc.Seq), size)) {
					t.Fatalf("record %d = %q", rc.Seq, rc.Data)
				}
			}
			wantFiles := map[string]int64{}
			if tt.survivor > 0 {
				wantFiles["1"] = int64(tt.survivor) * r
			}
			if got := segmentsIn(t, dir); !maps(got, wantFiles) {
				t.Fatalf("segments = %v, want %v", got, wantFiles)
			}

			next := tt.survivor + 1
			mustAppend(t, s, payload(next, size))
			log.Reset()
			s = reopen(t, s, &log)
			if log.Len() != 0 {
				t.Errorf("second recovery logged %q, want nothing", log.String())
			}
			recs = front(t, s, 100)
			if got := seqs(recs); !slices.Equal(got, seqRange(1, uint64(next))) {
				t.Fatalf("after append seqs = %v, want 1..%d", got, next)
			}
			if last := recs[len(recs)-1]; !bytes.Equal(last.Data, payload(next, size)) {
				t.Fatalf("appended record = %q", last.Data)
			}
		})
	}
}

func TestCorruptEarlierSegment(t *testing.T) {
	r := rec(20) // 36 bytes, two records per segment: 1.seg, 3.seg, 5.seg
	tests := []struct {
		name      string
		flipAt    int64 // offset in 3.seg
		want      []uint64
		wantFiles map[string]int64
	}{
		{"second record", r + 20, []uint64{1, 2, 3, 5, 6}, map[string]int64{"1": 72, "3": 72, "5": 72}},
		{"first record", 20, []uint64{1, 2, 5, 6}, map[string]int64{"1": 72, "5": 72}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := open(t, Config{Dir: dir, SegmentBytes: 100})
			for i := 1; i <= 6; i++ {
				mustAppend(t, s, payload(i, 20))
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, segmentName(3))
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			b[tt.flipAt] ^= 0x10
			if err := os.WriteFile(path, b, 0o640); err != nil {
				t.Fatal(err)
			}

			var log bytes.Buffer
			s = reopen(t, s, &log)
			if !strings.Contains(log.String(), "level=ERROR msg=\"corrupt spool segment") {
				t.Errorf("log = %q, want an error", log.String())
			}
			checkState(t, s, len(tt.want), int64(len(tt.want))*r)
			recs := front(t, s, 100)
			if got := seqs(recs); !slices.Equal(got, tt.want) {
				t.Fatalf("seqs = %v, want %v", got, tt.want)
			}
			for _, rc := range recs {
				if !bytes.Equal(rc.Data, payload(int(rc.Seq), 20)) {
					t.Fatalf("record %d = %q", rc.Seq, rc.Data)
				}
			}
			if got := segmentsIn(t, dir); !maps(got, tt.wantFiles) {
				t.Fatalf("segments = %v, want %v", got, tt.wantFiles)
			}

			mustAppend(t, s, payload(7, 20))
			mustAck(t, s, 6)
			if got := seqs(front(t, s, 100)); !slices.Equal(got, []uint64{7}) {
				t.Fatalf("after Ack(6) seqs = %v, want [7]", got)
			}
			if got := segmentsIn(t, dir); !maps(got, map[string]int64{"7": r}) {
				t.Fatalf("after Ack(6) segments = %v", got)
			}
		})
	}
}

func TestConcurrentAppend(t *testing.T) {
	const writers, appends = 8, 100
	total := 0
	for i := range appends {
		total += 1 + i%3
	}
	total *= writers

	s := open(t, Config{Dir: t.TempDir(), SegmentBytes: 4 << 10})
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range appends {
				var batch [][]byte
				for j := range 1 + i%3 {
					batch = append(batch, fmt.Appendf(nil, "w%d-%d-%d", w, i, j))
				}
				if err := s.Append(batch...); err != nil {
					t.Errorf("writer %d: Append: %v", w, err)
					return
				}
				_, _ = s.Len(), s.Bytes()
			}
		})
	}

	// The replayer drains while the writers write.
	var got []Record
	deadline := time.Now().Add(time.Minute)
	for len(got) < total && time.Now().Before(deadline) {
		recs, err := s.Front(50)
		if err != nil {
			t.Fatalf("Front: %v", err)
		}
		if len(recs) == 0 {
			time.Sleep(time.Millisecond)
			continue
		}
		got = append(got, recs...)
		if err := s.Ack(recs[len(recs)-1].Seq); err != nil {
			t.Fatalf("Ack: %v", err)
		}
	}
	wg.Wait()
	if len(got) != total {
		t.Fatalf("replayed %d records, want %d", len(got), total)
	}
	checkState(t, s, 0, 0)

	seen := map[string]bool{}
	nextIdx := make([]int, writers) // per writer, the next "i-j" it must show, flattened
	for k, r := range got {
		if r.Seq != uint64(k+1) {
			t.Fatalf("record %d has seq %d, want %d", k, r.Seq, k+1)
		}
		if seen[string(r.Data)] {
			t.Fatalf("record %q replayed twice", r.Data)
		}
		seen[string(r.Data)] = true
		var w, i, j int
		if _, err := fmt.Sscanf(string(r.Data), "w%d-%d-%d", &w, &i, &j); err != nil {
			t.Fatalf("record %q: %v", r.Data, err)
		}
		// Each writer's records appear in the order it appended them.
		if flat := i*3 + j; flat < nextIdx[w] {
			t.Fatalf("writer %d: record %q out of order", w, r.Data)
		} else {
			nextIdx[w] = flat + 1
		}
	}
}

func TestLargeBacklogPages(t *testing.T) {
	const total, size, page = 20000, 64, 100
	dir := t.TempDir()
	s := open(t, Config{Dir: dir, SegmentBytes: 64 << 10})
	for i := 1; i <= total; i += 500 {
		var batch [][]byte
		for j := i; j < i+500; j++ {
			batch = append(batch, payload(j, size))
		}
		mustAppend(t, s, batch...)
	}
	checkState(t, s, total, total*rec(size))

	next := uint64(1)
	for pages := 0; ; pages++ {
		if pages == total/page/2 {
			s = reopen(t, s, nil)
			checkState(t, s, total/2, total/2*rec(size))
		}
		recs := front(t, s, page)
		if len(recs) == 0 {
			if pages != total/page {
				t.Fatalf("drained in %d pages, want %d", pages, total/page)
			}
			break
		}
		if len(recs) != page {
			t.Fatalf("page %d has %d records, want %d", pages, len(recs), page)
		}
		for _, r := range recs {
			if r.Seq != next || !bytes.Equal(r.Data, payload(int(next), size)) {
				t.Fatalf("page %d: got seq %d %q, want seq %d", pages, r.Seq, r.Data, next)
			}
			next++
		}
		mustAck(t, s, recs[len(recs)-1].Seq)
		left := total - int(next-1)
		checkState(t, s, left, int64(left)*rec(size))
	}
	if got := segmentsIn(t, dir); len(got) != 1 {
		t.Fatalf("segments left after draining: %v, want only the active one", got)
	}
}

func TestClose(t *testing.T) {
	s := open(t, Config{Dir: t.TempDir()})
	mustAppend(t, s, []byte("x"))
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.Append([]byte("y")); !errors.Is(err, ErrClosed) {
		t.Errorf("Append after Close = %v, want ErrClosed", err)
	}
	if _, err := s.Front(1); !errors.Is(err, ErrClosed) {
		t.Errorf("Front after Close = %v, want ErrClosed", err)
	}
	if err := s.Ack(1); !errors.Is(err, ErrClosed) {
		t.Errorf("Ack after Close = %v, want ErrClosed", err)
	}
}

// FuzzRecover damages the tail of the last segment and checks that recovery
// returns a prefix of what was appended, losing no record that lies wholly
// before the damage, and that the spool keeps working.
func FuzzRecover(f *testing.F) {
	f.Add(uint8(5), uint8(0), uint16(3), []byte{})
	f.Add(uint8(9), uint8(0), uint16(0), []byte("garbage"))
	f.Add(uint8(7), uint8(1), uint16(0), []byte{0, 0, 0x40})
	f.Add(uint8(12), uint8(2), uint16(40), []byte{0xff, 0xff, 0xff, 0x7f})
	f.Fuzz(func(t *testing.T, n, op uint8, cut uint16, tail []byte) {
		dir := t.TempDir()
		s := open(t, Config{Dir: dir, SegmentBytes: 160})
		count := 1 + int(n%16)
		var appended [][]byte
		for i := 0; i < count; i += 3 {
			var batch [][]byte
			for j := i; j < min(i+3, count); j++ {
				batch = append(batch, payload(j+1, j*7%40))
			}
			mustAppend(t, s, batch...)
			appended = append(appended, batch...)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}

		names, err := segmentFiles(dir)
		if err != nil || len(names) == 0 {
			t.Fatalf("segment files %v: %v", names, err)
		}
		lastFirst := names[len(names)-1]
		path := filepath.Join(dir, segmentName(lastFirst))
		old, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		b := slices.Clone(old)
		pos := len(b) - int(cut)%(len(b)+1)
		switch op % 3 {
		case 0: // cut, then append garbage
			b = append(b[:pos], tail...)
		case 1: // flip bits at the end
			for i, x := range tail {
				if i >= len(b) {
					break
				}
				b[len(b)-1-i] ^= x
			}
		case 2: // overwrite from pos
			b = append(b[:pos], tail...)
			if len(b) < len(old) {
				b = append(b, old[len(b):]...)
			}
		}
		if err := os.WriteFile(path, b, 0o640); err != nil {
			t.Fatal(err)
		}
		damage := 0 // first changed offset
		for damage < len(old) && damage < len(b) && old[damage] == b[damage] {
			damage++
		}
		intact := int(lastFirst) - 1 // records in earlier segments
		end := 0
		for _, d := range appended[lastFirst-1:] {
			end += int(rec(len(d)))
			if end > damage {
				break
			}
			intact++
		}

		s = reopen(t, s, nil)
		recs, err := s.Front(count + 10)
		if err != nil {
			t.Fatalf("Front: %v", err)
		}
		if len(recs) < intact || len(recs) > count {
			t.Fatalf("recovered %d records, want %d..%d", len(recs), intact, count)
		}
		for i, r := range recs {
			if r.Seq != uint64(i+1) || !bytes.Equal(r.Data, appended[i]) {
				t.Fatalf("record %d: seq %d %q, want seq %d %q", i, r.Seq, r.Data, i+1, appended[i])
			}
		}

		mustAppend(t, s, []byte("after"))
		s = reopen(t, s, nil)
		recs, err = s.Front(count + 10)
		if err != nil {
			t.Fatalf("Front after append: %v", err)
		}
		if last := recs[len(recs)-1]; last.Seq != uint64(len(recs)) || string(last.Data) != "after" {
			t.Fatalf("last record after append: seq %d %q, want seq %d", last.Seq, last.Data, len(recs))
		}
	})
}

func BenchmarkAppend(b *testing.B) {
	const size = 50 << 10
	for _, perAppend := range []int{1, 8} {
		b.Run(fmt.Sprintf("records=%d", perAppend), func(b *testing.B) {
			s := open(b, Config{Dir: b.TempDir()})
			batch := make([][]byte, perAppend)
			for i := range batch {
				batch[i] = payload(i, size)
			}
			b.SetBytes(int64(perAppend * size))
			b.ReportAllocs()
			for b.Loop() {
				if s.Bytes() > 256<<20 {
					b.StopTimer()
					if err := s.Ack(math.MaxUint64); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				mustAppend(b, s, batch...)
			}
		})
	}
}

func TestFailedAppendIsNotVisible(t *testing.T) {
	dir := t.TempDir()
	s := open(t, Config{Dir: dir})
	mustAppend(t, s, payload(1, 10), payload(2, 10))
	// Pull the file out from under the writer: the write fails, and so does
	// the rollback, which must leave the spool refusing appends.
	if err := s.active.w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Append(payload(3, 10)); err == nil {
		t.Fatal("Append to a closed file succeeded")
	}
	checkState(t, s, 2, 2*rec(10))
	if got := seqs(front(t, s, 10)); !slices.Equal(got, []uint64{1, 2}) {
		t.Fatalf("seqs after failed append = %v", got)
	}
	if err := s.Append(payload(3, 10)); err == nil || !strings.Contains(err.Error(), "unusable") {
		t.Fatalf("Append after failed rollback = %v, want the sticky error", err)
	}

	_ = s.Close() // reports the handle closed above
	s = open(t, Config{Dir: dir})
	mustAppend(t, s, payload(3, 10))
	if got := seqs(front(t, s, 10)); !slices.Equal(got, []uint64{1, 2, 3}) {
		t.Fatalf("seqs after restart = %v", got)
	}
}

// FrontBytes stops before the record that would take the payloads past
// maxBytes, always returns the oldest record, crosses segments, and its
// Ack of the last returned record acknowledges exactly those.
func TestFrontBytes(t *testing.T) {
	s := open(t, Config{Dir: t.TempDir(), SegmentBytes: rec(100) * 3})
	for i := range 7 {
		mustAppend(t, s, payload(i, 100))
	}
	for _, tc := range []struct {
		max      int
		maxBytes int64
		want     []uint64
	}{
		{10, 250, seqRange(1, 2)},
		{10, 300, seqRange(1, 3)},
		{10, 450, seqRange(1, 4)}, // across the first segment's end
		{2, 1000, seqRange(1, 2)},
		{10, 10, seqRange(1, 1)}, // one record, however large
		{10, math.MaxInt64, seqRange(1, 7)},
	} {
		recs, err := s.FrontBytes(tc.max, tc.maxBytes)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(seqs(recs), tc.want) {
			t.Errorf("FrontBytes(%d, %d) = %v, want %v", tc.max, tc.maxBytes, seqs(recs), tc.want)
		}
	}
	recs, err := s.FrontBytes(10, 450)
	if err != nil {
		t.Fatal(err)
	}
	mustAck(t, s, recs[len(recs)-1].Seq)
	checkState(t, s, 3, 3*rec(100))
	if got := seqs(front(t, s, 10)); !slices.Equal(got, seqRange(5, 7)) {
		t.Fatalf("after acking 4: Front = %v, want 5..7", got)
	}
	for i, r := range front(t, s, 10) {
		if !bytes.Equal(r.Data, payload(4+i, 100)) {
			t.Fatalf("record %d: wrong payload", r.Seq)
		}
	}
}

// SetAside keeps a record and its note in SetAsideDir, which recovery
// ignores; SetAsideCount counts the records, not the notes.
func TestSetAside(t *testing.T) {
	s := open(t, Config{Dir: t.TempDir()})
	mustAppend(t, s, payload(0, 100), payload(1, 100))
	path, err := s.SetAside("00000000000000000001-b1.json", payload(0, 100), "reason: too_large\n")
	if err != nil {
		t.Fatal(err)
	}
	mustAck(t, s, 1)
	if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, payload(0, 100)) {
		t.Fatalf("set-aside file: %q %v", got, err)
	}
	if note, err := os.ReadFile(strings.TrimSuffix(path, ".json") + ".reason"); err != nil || string(note) != "reason: too_large\n" {
		t.Fatalf("note: %q %v", note, err)
	}
	for _, bad := range []string{"", "../x.json", "a/b.json", "x.reason", "x.tmp"} {
		if _, err := s.SetAside(bad, nil, ""); err == nil {
			t.Errorf("SetAside(%q) succeeded", bad)
		}
	}
	if n := s.SetAsideCount(); n != 1 {
		t.Fatalf("SetAsideCount = %d, want 1", n)
	}
	s = reopen(t, s, nil)
	checkState(t, s, 1, rec(100))
	if got := seqs(front(t, s, 10)); !slices.Equal(got, []uint64{2}) {
		t.Fatalf("after reopening: Front = %v, want [2]", got)
	}
	if n := s.SetAsideCount(); n != 1 {
		t.Fatalf("SetAsideCount after reopening = %d, want 1", n)
	}
}
