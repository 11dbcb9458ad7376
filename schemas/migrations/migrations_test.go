package migrations

import (
	"slices"
	"testing"
	"testing/fstest"
)

func TestLoad(t *testing.T) {
	fsys := fstest.MapFS{
		"db/0002_second.sql": {Data: []byte("-- a comment; with a semicolon\nCREATE TABLE b (x Int8);\n\n-- trailing comment\n")},
		"db/0001_first.sql":  {Data: []byte("CREATE TABLE a (x Int8);\nCREATE TABLE c (\n    x Int8 -- inline\n)")},
		"db/README.md":       {Data: []byte("not a migration")},
	}
	ms, err := Load(fsys, "db")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range ms {
		names = append(names, m.Name)
	}
	if !slices.Equal(names, []string{"0001_first", "0002_second"}) || ms[0].Version != 1 || ms[1].Version != 2 {
		t.Fatalf("Load = %+v", ms)
	}
	if want := []string{"CREATE TABLE a (x Int8)", "CREATE TABLE c (\n    x Int8 -- inline\n)"}; !slices.Equal(ms[0].Statements, want) {
		t.Errorf("statements of 0001 = %q, want %q", ms[0].Statements, want)
	}
	if want := []string{"CREATE TABLE b (x Int8)"}; !slices.Equal(ms[1].Statements, want) {
		t.Errorf("statements of 0002 = %q, want %q", ms[1].Statements, want)
	}
	if ms[0].DoneWhen != "" || ms[1].DoneWhen != "" {
		t.Errorf("guards %q, %q; want none", ms[0].DoneWhen, ms[1].DoneWhen)
	}
}

func TestLoadGuard(t *testing.T) {
	fsys := fstest.MapFS{"db/0001_drop.sql": {Data: []byte(
		"-- why\n  -- done when: SELECT count() = 0 FROM system.columns WHERE name = 'x'  \nALTER TABLE a DROP COLUMN x\n")}}
	ms, err := Load(fsys, "db")
	if err != nil {
		t.Fatal(err)
	}
	if want := "SELECT count() = 0 FROM system.columns WHERE name = 'x'"; ms[0].DoneWhen != want {
		t.Errorf("DoneWhen = %q, want %q", ms[0].DoneWhen, want)
	}
	if want := []string{"ALTER TABLE a DROP COLUMN x"}; !slices.Equal(ms[0].Statements, want) {
		t.Errorf("statements = %q, want %q", ms[0].Statements, want)
	}
}

func TestLoadRejects(t *testing.T) {
	for name, fsys := range map[string]fstest.MapFS{
		"no number":      {"db/first.sql": {Data: []byte("SELECT 1")}},
		"zero":           {"db/0000_zero.sql": {Data: []byte("SELECT 1")}},
		"same version":   {"db/0001_a.sql": {Data: []byte("SELECT 1")}, "db/001_b.sql": {Data: []byte("SELECT 1")}},
		"no name suffix": {"db/0001.sql": {Data: []byte("SELECT 1")}},
		"two guards":     {"db/0001_a.sql": {Data: []byte("-- done when: SELECT 1\n-- done when: SELECT 0\nSELECT 1")}},
	} {
		if _, err := Load(fsys, "db"); err == nil {
			t.Errorf("%s: Load succeeded", name)
		}
	}
}

func TestEmbedded(t *testing.T) {
	ch, err := Load(ClickHouse, "clickhouse")
	if err != nil || len(ch) == 0 {
		t.Fatalf("ClickHouse migrations: %d, %v", len(ch), err)
	}
	lite, err := Load(SQLite, "sqlite")
	if err != nil || len(lite) == 0 {
		t.Fatalf("SQLite migrations: %d, %v", len(lite), err)
	}
	for _, m := range lite {
		if m.DoneWhen != "" {
			t.Errorf("SQLite migration %s has a guard; the SQLite store refuses it", m.Name)
		}
	}
	for _, ms := range [][]Migration{ch, lite} {
		for i, m := range ms {
			if m.Version != i+1 || len(m.Statements) == 0 {
				t.Errorf("migration %s: version %d with %d statements, want version %d with some", m.Name, m.Version, len(m.Statements), i+1)
			}
		}
	}
}

// versionRows is a result of versions, as a store's driver gives it.
type versionRows struct {
	vs     []uint32
	next   int
	closed bool
}

func (r *versionRows) Next() bool { r.next++; return r.next <= len(r.vs) }
func (r *versionRows) Scan(dest ...any) error {
	*dest[0].(*uint32) = r.vs[r.next-1]
	return nil
}
func (r *versionRows) Err() error   { return nil }
func (r *versionRows) Close() error { r.closed = true; return nil }

func TestPending(t *testing.T) {
	ms := []Migration{{Version: 1, Name: "0001_a"}, {Version: 2, Name: "0002_b"}, {Version: 3, Name: "0003_c"}, {Version: 4, Name: "0004_d"}}
	rows := &versionRows{vs: []uint32{3, 1, 1}} // ClickHouse may hold a version twice
	pending, err := Pending(ms, func() (Rows, error) { return rows, nil })
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range pending {
		names = append(names, m.Name)
	}
	if !slices.Equal(names, []string{"0002_b", "0004_d"}) || !rows.closed {
		t.Errorf("Pending = %q (rows closed: %v), want [0002_b 0004_d] and the rows closed", names, rows.closed)
	}
}
