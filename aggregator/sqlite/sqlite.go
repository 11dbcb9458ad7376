// Package sqlite is the embedded aggregator.Store, on a pure-Go SQLite
// (modernc.org/sqlite, no cgo): the default when no ClickHouse is configured.
//
// Every Apply is one transaction: it records each batch in a ledger (a batch
// already there is skipped whole), inserts the events with INSERT OR IGNORE
// on the primary key (tenant, id), and adds only the rows actually inserted
// to the hourly rollups. A crash leaves all of a call or none of it, so a
// redelivered batch counts once whatever failed. The database runs in WAL
// mode with synchronous=FULL: a committed Apply survives an OS crash.
//
// The store is the only writer of its file (Apply and Reconcile are
// serialised by the store); any number of readers may run beside it.
package sqlite

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/rollup"
	"github.com/meterd/meterd/internal/saturating"
	"github.com/meterd/meterd/schemas"
	"github.com/meterd/meterd/schemas/migrations"
)

var _ aggregator.Store = (*Store)(nil)

// Config configures a Store.
type Config struct {
	// Path is the database file, created if missing.
	Path string
	// Logger receives the store's few log lines; nil discards them.
	Logger *slog.Logger
}

// Validate reports whether c can open a store.
func (c Config) Validate() error {
	if c.Path == "" {
		return errors.New("sqlite: Path is required")
	}
	if strings.ContainsAny(c.Path, "?#") {
		return fmt.Errorf("sqlite: Path %q must not contain '?' or '#'", c.Path)
	}
	return nil
}

// Store is the embedded store. Its methods are safe for concurrent use.
type Store struct {
	rollup.Totaler // Total, Totals and TenantTotals

	db  *sql.DB
	log *slog.Logger

	mu        sync.Mutex // serialises the writers: Apply and Reconcile
	insBatch  *sql.Stmt
	insEvents *sql.Stmt // rowsPerInsert rows
	addRollup *sql.Stmt // rowsPerInsert rows
	closeOnce sync.Once
	closeErr  error
}

const insertBatch = `INSERT OR IGNORE INTO batches (batch_id, applied_at) VALUES (?, ?)`

// rowsPerInsert is how many rows one INSERT statement carries (at most 8
// parameters each, far below SQLite's limit of 32766): fewer statements
// spend less in database/sql and the driver per row.
const rowsPerInsert = 128

// values returns n rows of cols placeholders for a VALUES clause.
func values(n, cols int) string {
	row := "(" + strings.TrimSuffix(strings.Repeat("?, ", cols), ", ") + ")"
	return strings.TrimSuffix(strings.Repeat(row+", ", n), ", ")
}

// insertEventsSQL inserts n events, skipping those whose (tenant, id) is
// held, and returns the keys of the events it inserted.
func insertEventsSQL(n int) string {
	return `INSERT OR IGNORE INTO events (tenant, id, meter, value, time, dims_key, batch_id, inserted_at) VALUES ` +
		values(n, 8) + ` RETURNING tenant, id`
}

// addRollupsSQL adds n rows to the rollups. The additions saturate: an
// integer sum beyond int64 becomes a REAL in SQLite, which CAST clamps to
// the nearest int64 (internal/saturating).
func addRollupsSQL(n int) string {
	return `INSERT INTO rollups_hourly (tenant, meter, hour, dims_key, value, events) VALUES ` + values(n, 6) + `
		ON CONFLICT (tenant, meter, hour, dims_key) DO UPDATE SET
		value = CAST(value + excluded.value AS INTEGER), events = CAST(events + excluded.events AS INTEGER)`
}

// sumParts selects the rollup.Parts of the sums of the columns v and n:
// SUM of the values themselves raises "integer overflow" past int64, which
// would fail every total and report covering the row, of every tenant.
var sumParts = fmt.Sprintf(`SUM(v / %[1]d), SUM(v %% %[1]d), SUM(n / %[1]d), SUM(n %% %[1]d)`, saturating.PartDivisor)

// inserts runs a multi-row statement over items, rowsPerInsert at a time,
// in order: full is the statement of a whole chunk, sqlFor(n) that of the
// last chunk's n rows (prepared in tx, closed with it). row appends an
// item's cols arguments; run executes the statement on a chunk's.
func inserts[T any](tx *sql.Tx, full *sql.Stmt, sqlFor func(n int) string, cols int, items []T,
	row func(args []any, item T) []any, run func(stmt *sql.Stmt, args []any) error) error {
	args := make([]any, 0, cols*rowsPerInsert)
	for start := 0; start < len(items); start += rowsPerInsert {
		chunk := items[start:min(start+rowsPerInsert, len(items))]
		stmt := full
		if len(chunk) < rowsPerInsert {
			var err error
			if stmt, err = tx.Prepare(sqlFor(len(chunk))); err != nil {
				return err
			}
		}
		args = args[:0]
		for _, it := range chunk {
			args = row(args, it)
		}
		if err := run(stmt, args); err != nil {
			return err
		}
	}
	return nil
}

// New opens (creating if needed) the database at cfg.Path and migrates it.
func New(cfg Config) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Every connection gets the pragmas: WAL with a sync of the log at every
	// commit, a 64 MiB page cache (random (tenant, id) keys touch pages all
	// over the index) and reads through mmap. BEGIN IMMEDIATE takes the write
	// lock at the start of a transaction instead of failing at its first write.
	dsn := cfg.Path + "?_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_pragma=busy_timeout(10000)" +
		"&_pragma=cache_size(-65536)&_pragma=mmap_size(268435456)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("sqlite: open %s: %w", cfg.Path, err)
	}
	db.SetMaxOpenConns(4)
	db.SetConnMaxIdleTime(0)
	s := &Store{db: db, log: log.With("component", "store", "store", "sqlite")}
	s.Totaler = rollup.NewTotaler("sqlite", s.sumsOf)
	if err := s.init(); err != nil {
		db.Close()
		return nil, fmt.Errorf("sqlite: %s: %w", cfg.Path, err)
	}
	return s, nil
}

func (s *Store) init() error {
	ctx := context.Background()
	if err := s.migrate(ctx); err != nil {
		return err
	}
	for _, p := range []struct {
		stmt **sql.Stmt
		sql  string
	}{{&s.insBatch, insertBatch}, {&s.insEvents, insertEventsSQL(rowsPerInsert)}, {&s.addRollup, addRollupsSQL(rowsPerInsert)}} {
		stmt, err := s.db.PrepareContext(ctx, p.sql)
		if err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
		*p.stmt = stmt
	}
	return nil
}

// migrate applies the migrations not yet recorded, each in one transaction.
func (s *Store) migrate(ctx context.Context) error {
	ms, err := migrations.Load(migrations.SQLite, "sqlite")
	if err != nil {
		return err
	}
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("create schema_migrations: %w", err)
	}
	pending, err := migrations.Pending(ms, func() (migrations.Rows, error) {
		return s.db.QueryContext(ctx, `SELECT version FROM schema_migrations`)
	})
	if err != nil {
		return fmt.Errorf("read schema_migrations: %w", err)
	}
	for _, m := range pending {
		if m.DoneWhen != "" {
			return fmt.Errorf("migration %s: a guard (done when) is for ClickHouse; SQLite migrations run in one transaction", m.Name)
		}
		err := s.inTx(ctx, func(tx *sql.Tx) error {
			for _, stmt := range m.Statements {
				if _, err := tx.ExecContext(ctx, stmt); err != nil {
					return err
				}
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)`,
				m.Version, m.Name, time.Now().Unix())
			return err
		})
		if err != nil {
			return fmt.Errorf("migration %s: %w", m.Name, err)
		}
		s.log.Info("applied migration", "migration", m.Name)
	}
	return nil
}

// inTx runs fn in a write transaction and commits it if fn succeeds.
func (s *Store) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	// A writer frozen past its deadline (the end of its lease) must not
	// commit when it wakes; the context's timer may not have fired yet.
	if err := aggregator.CheckDeadline(ctx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// Apply implements aggregator.Store in one transaction.
func (s *Store) Apply(ctx context.Context, batches []*schemas.Batch) ([]aggregator.Increment, error) {
	if err := rollup.Check(batches); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rows := rollup.Rows{}
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		insBatch, insEvents := tx.Stmt(s.insBatch), tx.Stmt(s.insEvents)
		// Statements run without the caller's context: with one, the driver
		// starts a goroutine per statement to watch it. Cancellation is
		// checked between statements and ends in a rollback.
		now := time.Now().Unix()
		// The events of new batches, first copies only, are inserted in
		// key order (fewer page misses), in statements of rowsPerInsert
		// rows, each returning the keys of the rows it did insert.
		type pending struct {
			e           *schemas.Event
			batch, dims string
		}
		var events []pending
		index := map[rollup.EventID]int{}
		var dims rollup.DimsCache
		for _, b := range batches {
			res, err := insBatch.Exec(b.ID, now)
			if err != nil {
				return fmt.Errorf("record batch %s: %w", b.ID, err)
			}
			if n, _ := res.RowsAffected(); n == 0 {
				continue // applied before, or earlier in this call
			}
			for i := range b.Events {
				e := &b.Events[i]
				k := rollup.EventID{Tenant: e.Tenant, ID: e.ID}
				if _, dup := index[k]; !dup {
					index[k] = len(events)
					events = append(events, pending{e: e, batch: b.ID, dims: dims.Get(e.Dimensions)})
				}
			}
		}
		slices.SortFunc(events, func(a, b pending) int {
			return cmp.Or(strings.Compare(a.e.Tenant, b.e.Tenant), strings.Compare(a.e.ID, b.e.ID))
		})
		for i, p := range events {
			index[rollup.EventID{Tenant: p.e.Tenant, ID: p.e.ID}] = i
		}
		err := inserts(tx, insEvents, insertEventsSQL, 8, events, func(args []any, p pending) []any {
			e := p.e
			return append(args, e.Tenant, e.ID, e.Meter, e.Value, rollup.Second(e.Time), p.dims, p.batch, now)
		}, func(stmt *sql.Stmt, args []any) error {
			if err := ctx.Err(); err != nil {
				return err
			}
			inserted, err := stmt.Query(args...)
			if err != nil {
				return err
			}
			defer inserted.Close()
			for inserted.Next() {
				var k rollup.EventID
				if err := inserted.Scan(&k.Tenant, &k.ID); err != nil {
					return err
				}
				p := &events[index[k]]
				rows.AddEvent(p.e, p.dims)
			}
			return inserted.Close()
		})
		if err != nil {
			return fmt.Errorf("insert events: %w", err)
		}
		return s.addRollups(tx, rows)
	})
	if err != nil {
		return nil, fmt.Errorf("sqlite: apply: %w", err)
	}
	return rows.Increments(), nil
}

// addRollups adds rows to the rollups in key order.
func (s *Store) addRollups(tx *sql.Tx, rows rollup.Rows) error {
	keys := slices.SortedFunc(maps.Keys(rows), func(a, b rollup.Key) int {
		return cmp.Or(strings.Compare(a.Tenant, b.Tenant), strings.Compare(a.Meter, b.Meter),
			cmp.Compare(a.Hour, b.Hour), strings.Compare(a.Dims, b.Dims))
	})
	err := inserts(tx, tx.Stmt(s.addRollup), addRollupsSQL, 6, keys, func(args []any, k rollup.Key) []any {
		sum := rows[k]
		return append(args, k.Tenant, k.Meter, k.Hour, k.Dims, sum.Value, sum.Events)
	}, func(stmt *sql.Stmt, args []any) error {
		_, err := stmt.Exec(args...)
		return err
	})
	if err != nil {
		return fmt.Errorf("update rollups: %w", err)
	}
	return nil
}

// sumQuery selects tenant, meter and the Parts of the sum of values and of
// the number of events in a span: rollups for its whole hours (args 1-2), raw
// events for its edges (args 3-6) read through the time index (by the
// (tenant, id) key the planner would read all of a tenant's events), with
// filter (naming tenant and meter) added to both. Pairs whose sums are zero
// are left out by the caller (scanSums).
func sumQuery(filter string) string {
	return `SELECT tenant, meter, ` + sumParts + ` FROM (
		SELECT tenant, meter, value AS v, events AS n FROM rollups_hourly WHERE hour >= ?1 AND hour < ?2` + filter + `
		UNION ALL
		SELECT tenant, meter, value, 1 FROM events INDEXED BY events_by_time WHERE (time >= ?3 AND time < ?4 OR time >= ?5 AND time < ?6)` + filter + `
	) GROUP BY tenant, meter ORDER BY tenant, meter`
}

// sumQueries are sumQuery narrowed to nothing, to a meter, to a tenant
// and to both, by [tenant given][meter given]: the tenant is ?7 and the
// meter the argument after it.
var sumQueries = [2][2]string{
	{sumQuery(""), sumQuery(" AND meter = ?7")},
	{sumQuery(" AND tenant = ?7"), sumQuery(" AND tenant = ?7 AND meter = ?8")},
}

// spanArgs returns the six range arguments of sumQuery.
func spanArgs(from, to time.Time) []any {
	sp := rollup.Split(from, to)
	var e [2]rollup.Range
	copy(e[:], sp.Edges)
	return []any{sp.Hours.From, sp.Hours.To, e[0].From, e[0].To, e[1].From, e[1].To}
}

// sumsOf is the rollup.SumsFunc of the store.
func (s *Store) sumsOf(ctx context.Context, from, to time.Time, tenant, meter string) ([]aggregator.Increment, error) {
	args := spanArgs(from, to)
	if tenant != "" {
		args = append(args, tenant)
	}
	if meter != "" {
		args = append(args, meter)
	}
	rows, err := s.db.QueryContext(ctx, sumQueries[b2i(tenant != "")][b2i(meter != "")], args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	return rollup.ScanIncrements(rows, from)
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// rollupDiff selects, per rollup row of the hours [?1, ?2), the Parts of the
// raw sums less the rollup sums where they may differ (all parts zero means
// no difference): once joined and not zero, the deltas that repair the
// rollups. The rollups' parts are negated rather than their
// values, which are bounded by 2^32 where a value may be -2^63.
var rollupDiff = fmt.Sprintf(`SELECT tenant, meter, hour, dims_key, SUM(vh), SUM(vl), SUM(nh), SUM(nl) FROM (
		SELECT tenant, meter, time - time %% 3600 AS hour, dims_key, value / %[1]d AS vh, value %% %[1]d AS vl, 0 AS nh, 1 AS nl
		FROM events WHERE time >= ?1 AND time < ?2
		UNION ALL
		SELECT tenant, meter, hour, dims_key, -(value / %[1]d), -(value %% %[1]d), -(events / %[1]d), -(events %% %[1]d)
		FROM rollups_hourly WHERE hour >= ?1 AND hour < ?2
	) GROUP BY tenant, meter, hour, dims_key
	HAVING SUM(vh) != 0 OR SUM(vl) != 0 OR SUM(nh) != 0 OR SUM(nl) != 0`, saturating.PartDivisor)

// Reconcile implements aggregator.Store in one transaction.
func (s *Store) Reconcile(ctx context.Context, from, to time.Time) (int, error) {
	hours := rollup.Covering(from, to)
	if hours.Empty() {
		return 0, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var wrong int
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		deltas := rollup.Rows{}
		rows, err := tx.QueryContext(ctx, rollupDiff, hours.From, hours.To)
		if err != nil {
			return err
		}
		for rows.Next() {
			var k rollup.Key
			var parts rollup.Parts
			if err := rows.Scan(append([]any{&k.Tenant, &k.Meter, &k.Hour, &k.Dims}, parts.Dest()...)...); err != nil {
				rows.Close()
				return err
			}
			if d := parts.Sum(); d != (rollup.Sum{}) {
				deltas[k] = d
			}
		}
		if err := rows.Close(); err != nil {
			return err
		}
		if err := s.addRollups(tx, deltas); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM rollups_hourly WHERE hour >= ? AND hour < ? AND value = 0 AND events = 0`,
			hours.From, hours.To); err != nil {
			return err
		}
		wrong = len(deltas)
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("sqlite: reconcile: %w", err)
	}
	return wrong, nil
}

// Ping implements aggregator.Store.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.db.PingContext(ctx); err != nil {
		return fmt.Errorf("sqlite: ping: %w", err)
	}
	return nil
}

// Close closes the database; it is idempotent.
func (s *Store) Close() error {
	s.closeOnce.Do(func() { s.closeErr = s.db.Close() })
	return s.closeErr
}
