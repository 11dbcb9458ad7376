package clickhouse

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/meterd/meterd/aggregator/keyindex"
	"github.com/meterd/meterd/internal/ctxtime"
)

// catchUpMargin is how far before an index's mark the catch-up reads
// events: it covers the skew between this process's clock, with which the
// mark is taken, and the server's, with which inserted_at is written
// (measured at New), and inserts that were on their way when the mark was
// taken. Reading more only adds keys the index holds already.
const catchUpMargin = 10 * time.Minute

// preparedMargin replaces catchUpMargin at the first write after Prepare,
// whose mark was taken after every open intent's queries had ended: an
// insert that lands after it began after that wait, and the server sets its
// inserted_at when it processes the block, so only the clocks' measured
// skew needs a margin, not an insert's flight.
const preparedMargin = time.Minute

// prepareWaitMax bounds Prepare's wait for the open intents' queries (and
// on a cluster the shard's settling).
const prepareWaitMax = 5 * time.Minute

// expireEvery is how often the index deletes its expired keys.
const expireEvery = time.Hour

// storeID returns the store's identity, creating it if there is none.
func (s *Store) storeID(ctx context.Context) (string, error) {
	read := func() (string, error) {
		var id string
		err := s.conn.QueryRow(ctx, `SELECT ifNull(min(id), '') FROM store_identity`).Scan(&id)
		return id, err
	}
	id, err := read()
	if err != nil || id != "" {
		return id, err
	}
	b, err := s.conn.PrepareBatch(ctx, `INSERT INTO store_identity (id)`)
	if err != nil {
		return "", err
	}
	defer b.Close()
	if err := b.Append(randomID(16)); err != nil {
		return "", err
	}
	if err := b.Send(); err != nil {
		return "", err
	}
	return read()
}

// serverNow returns the server's clock as this process's clock plus the
// offset measured at New.
func (s *Store) serverNow() time.Time { return time.Now().Add(s.clockOffset) }

// measureClock records how far the server's clock is ahead of this one.
func (s *Store) measureClock(ctx context.Context) error {
	before := time.Now()
	var now time.Time
	if err := s.conn.QueryRow(ctx, `SELECT now()`).Scan(&now); err != nil {
		return err
	}
	after := time.Now()
	// now() is whole seconds: the middle of its second.
	mid := before.Add(after.Sub(before) / 2)
	s.clockOffset = now.Add(500 * time.Millisecond).Sub(mid)
	return nil
}

// Prepare implements aggregator.Preparer: the read-only part of the
// recovery a new writer's first write runs, without that write's deadline:
// it settles the shard (on a cluster), waits until no query of an open
// intent still runs, so every insert of an earlier writer has landed or
// never will, and syncs the index (a catch-up from its mark, or the
// rebuild of a lost or foreign index: minutes at a billion events, longer
// than a lease). The aggregator calls it holding the lease, after
// WriterChanged, so no other writer writes until this one's first write,
// whose recoverIntents then repairs the open intents and catches the index
// up again, fenced, from Prepare's mark less only preparedMargin: a
// zombie's insert that landed after Prepare read is found, and the catch-up
// does not read catchUpMargin's 10 minutes of events again, too many to
// read within a lease at a high rate. It writes nothing to ClickHouse.
func (s *Store) Prepare(ctx context.Context) error {
	if s.index == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.pending {
		return nil // nothing to recover: this writer's index is current
	}
	// Bounded, unlike the load that follows: an insert that never ends
	// must not hold the store (and its Reconcile) without a word. The first
	// write then waits again, within its deadline, and fails visibly.
	sctx, cancel := context.WithTimeout(ctx, prepareWaitMax)
	_, err := s.settledIntents(sctx)
	cancel()
	if err != nil {
		return fmt.Errorf("wait for the open intents: %w", err)
	}
	if err := s.syncIndex(ctx, catchUpMargin); err != nil {
		return err
	}
	s.prepared = true
	return nil
}

// syncIndex makes the index hold every event the store wrote within the
// horizon before any lookup: after a start, a failed write or a change of
// writer (the index may lack what the store holds, never the reverse). An
// index of another store, or of none, is emptied and loaded from all the
// events inserted within the horizon; otherwise the events inserted since
// its mark (less margin) are added. It runs after the queries of
// open intents ended (recoverIntents, Prepare), so every insert of an
// earlier writer has landed.
func (s *Store) syncIndex(ctx context.Context, margin time.Duration) error {
	start := s.serverNow()
	m, ok, err := s.index.Mark()
	if err != nil {
		return err
	}
	since := m.Through.Add(-margin)
	full := !ok || m.Store != s.id
	if full {
		if err := s.index.Reset(); err != nil {
			return err
		}
		since = start.Add(-s.index.Horizon() - catchUpMargin)
	}
	n, err := s.loadIndex(ctx, since, keyindex.Mark{Store: s.id, Through: start})
	if err != nil {
		return fmt.Errorf("dedup index: %w", err)
	}
	log := s.log.Debug
	if full || n > 0 {
		log = s.log.Info
	}
	log("dedup index synced with the store", "rebuilt", full, "since", since, "keys", n,
		"took", time.Since(start.Add(-s.clockOffset)).Round(time.Millisecond))
	return nil
}

// loadIndex adds to the index the key of every event inserted at or after
// since, and the mark m.
func (s *Store) loadIndex(ctx context.Context, since time.Time, m keyindex.Mark) (int64, error) {
	l, err := s.index.NewLoader()
	if err != nil {
		return 0, err
	}
	defer l.Abort()
	inserted := `inserted_at >= toDateTime(` + strconv.FormatInt(max(since.Unix(), 0), 10) + `)`
	scope := ""
	if s.scope.partitions > 0 {
		// The partition's tenants select its events through the primary
		// key: each partition's index reads its share of events.
		tenants, err := s.scopeTenants(ctx, `SELECT tenant FROM events WHERE `+inserted)
		if err != nil {
			return 0, err
		}
		if ctx, err = withTenants(ctx, tenants); err != nil {
			return 0, err
		}
		scope = " AND tenant IN scope"
	}
	// The server computes the keys (keyindex.KeyOf, which
	// TestServerComputesIndexKeys holds it to), on all its cores.
	rows, err := s.conn.Query(ctx, `SELECT substring(SHA256(concat(tenant, '\0', id)), 1, 16), inserted_at
		FROM events WHERE `+inserted+scope)
	if err != nil {
		return 0, fmt.Errorf("read events: %w", err)
	}
	defer rows.Close()
	var (
		key string
		at  time.Time
	)
	for rows.Next() {
		if err := rows.Scan(&key, &at); err != nil {
			return 0, fmt.Errorf("read events: %w", err)
		}
		var k keyindex.Key
		if copy(k[:], key) != len(k) {
			return 0, fmt.Errorf("read events: a key of %d bytes", len(key))
		}
		l.Add(k, at)
	}
	if err := rows.Err(); err != nil {
		return 0, fmt.Errorf("read events: %w", err)
	}
	return l.Len(), l.Finish(ctx, m)
}

// held returns the positions in cands of the candidates the index holds.
func (s *Store) held(cands []candidate, now time.Time) ([]int, error) {
	keys := make([]keyindex.Key, len(cands))
	for i := range cands {
		keys[i] = cands[i].key
	}
	in, err := s.index.Held(keys, now)
	if err != nil {
		return nil, err
	}
	var held []int
	for i, h := range in {
		if h {
			held = append(held, i)
		}
	}
	return held, nil
}

// indexWritten adds the keys of the events a write inserted, with the mark
// taken when the write began.
func (s *Store) indexWritten(news []candidate, m keyindex.Mark) error {
	keys := make([]keyindex.Key, len(news))
	for i := range news {
		keys[i] = news[i].key
	}
	if err := s.index.Add(keys, m.Through, m); err != nil {
		return fmt.Errorf("dedup index: %w", err)
	}
	return nil
}

// expireIndex deletes the index's expired keys every expireEvery until ctx
// ends.
func (s *Store) expireIndex(ctx context.Context) {
	defer close(s.expired)
	ctxtime.Tick(ctx, expireEvery, func() {
		n, err := s.index.Expire(ctx, s.serverNow())
		if err != nil {
			// A sweep cut short by the store's close is not a failure.
			if ctx.Err() == nil {
				s.log.Error("dedup index: deleting expired keys failed", "err", err)
			}
			return
		}
		s.log.Info("dedup index: deleted expired keys", "keys", n)
	})
}
