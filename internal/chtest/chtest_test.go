package chtest

import (
	"context"
	"testing"

	"github.com/ClickHouse/clickhouse-go/v2"
)

func TestMain(m *testing.M) { Main(m) }

func TestDSNIsAFreshDatabase(t *testing.T) {
	var names []string
	for range 2 {
		dsn := DSN(t)
		opts, err := clickhouse.ParseDSN(dsn)
		if err != nil {
			t.Fatal(err)
		}
		conn, err := clickhouse.Open(opts)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		var db string
		var tables uint64
		if err := conn.QueryRow(context.Background(), "SELECT currentDatabase(), (SELECT count() FROM system.tables WHERE database = currentDatabase())").Scan(&db, &tables); err != nil {
			t.Fatal(err)
		}
		if db != opts.Auth.Database || tables != 0 {
			t.Errorf("%s: database %q with %d tables, want %q and none", dsn, db, tables, opts.Auth.Database)
		}
		names = append(names, db)
	}
	if names[0] == names[1] {
		t.Errorf("two DSNs name the same database %s", names[0])
	}
}
