// Package migrations holds the versioned DDL of the stores, embedded in the
// binary. A migration is a file NNNN_name.sql: statements separated by
// semicolons, and comment lines starting with "--" (comments at the end of a
// line must not contain a semicolon). A store applies the migrations
// it has not recorded in its schema_migrations table, in version order, and
// records each after its statements succeeded; a ClickHouse migration can be
// interrupted between statements, or after them and before it is recorded,
// so its statements must be idempotent (IF NOT EXISTS).
//
// A statement that cannot be written idempotently (ClickHouse 18.16 has no
// DROP COLUMN IF EXISTS) goes into a migration of its own that carries a
// guard, a comment line
//
//	-- done when: SELECT count() = 0 FROM system.columns WHERE …
//
// whose query returns one row of one column: true (1) when the migration's
// effect is already there, in which case the ClickHouse store records it
// without running its statements. SQLite migrations run in one transaction
// and need no guard; the SQLite store refuses one.
package migrations

import (
	"embed"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strconv"
	"strings"
)

// ClickHouse holds clickhouse/NNNN_name.sql.
//
//go:embed clickhouse/*.sql
var ClickHouse embed.FS

// SQLite holds sqlite/NNNN_name.sql.
//
//go:embed sqlite/*.sql
var SQLite embed.FS

// Migration is one migration file.
type Migration struct {
	Version    int
	Name       string // the file name without the .sql suffix
	Statements []string
	// DoneWhen is the query of the migration's "-- done when:" line, or "".
	DoneWhen string
}

// doneWhenPrefix starts the guard line of a migration.
const doneWhenPrefix = "-- done when:"

// Load returns the migrations in directory dir of fsys in version order.
func Load(fsys fs.FS, dir string) ([]Migration, error) {
	files, err := fs.Glob(fsys, path.Join(dir, "*.sql"))
	if err != nil {
		return nil, err
	}
	ms := make([]Migration, 0, len(files))
	for _, f := range files {
		name := strings.TrimSuffix(path.Base(f), ".sql")
		num, _, ok := strings.Cut(name, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v <= 0 {
			return nil, fmt.Errorf("migration %s: name is not NNNN_name.sql", f)
		}
		body, err := fs.ReadFile(fsys, f)
		if err != nil {
			return nil, err
		}
		m := Migration{Version: v, Name: name}
		for line := range strings.Lines(string(body)) {
			if q, ok := strings.CutPrefix(strings.TrimSpace(line), doneWhenPrefix); ok {
				if m.DoneWhen != "" {
					return nil, fmt.Errorf("migration %s: more than one %q line", f, doneWhenPrefix)
				}
				m.DoneWhen = strings.TrimSpace(q)
			}
		}
		for stmt := range strings.SplitSeq(stripCommentLines(string(body)), ";") {
			if stmt = strings.TrimSpace(stmt); stmt != "" {
				m.Statements = append(m.Statements, stmt)
			}
		}
		ms = append(ms, m)
	}
	slices.SortFunc(ms, func(a, b Migration) int { return a.Version - b.Version })
	for i := 1; i < len(ms); i++ {
		if ms[i].Version == ms[i-1].Version {
			return nil, fmt.Errorf("migrations %s and %s have the same version", ms[i-1].Name, ms[i].Name)
		}
	}
	return ms, nil
}

// Rows is the result of a store's query of the versions recorded in its
// schema_migrations, as both stores' drivers give it.
type Rows interface {
	Next() bool
	Scan(dest ...any) error
	Err() error
	Close() error
}

// Pending returns the migrations of ms whose version the rows of query
// (the store's query of the versions in its schema_migrations) do not
// hold, in the order of ms.
func Pending(ms []Migration, query func() (Rows, error)) ([]Migration, error) {
	rows, err := query()
	if err != nil {
		return nil, err
	}
	applied, err := versions(rows)
	if cerr := rows.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	var pending []Migration
	for _, m := range ms {
		if !applied[m.Version] {
			pending = append(pending, m)
		}
	}
	return pending, nil
}

func versions(rows Rows) (map[int]bool, error) {
	applied := map[int]bool{}
	for rows.Next() {
		var v uint32 // ClickHouse's column is a UInt32
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		applied[int(v)] = true
	}
	return applied, rows.Err()
}

// stripCommentLines removes the lines that hold only a comment.
func stripCommentLines(sql string) string {
	var b strings.Builder
	for line := range strings.Lines(sql) {
		if !strings.HasPrefix(strings.TrimSpace(line), "--") {
			b.WriteString(line)
		}
	}
	return b.String()
}
