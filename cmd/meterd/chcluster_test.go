package main

import (
	"strings"
	"testing"
)

// The ClickHouse cluster flags: a mistake in them is a clear message and
// exit code 2 before anything starts.
func TestClickHouseClusterFlagMistakes(t *testing.T) {
	dsn := "clickhouse://127.0.0.1:1/meterd"
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--sqlite-path", t.TempDir() + "/store.db", "--clickhouse-cluster", "meterd"}, "--clickhouse-cluster needs --clickhouse DSN"},
		{[]string{"--clickhouse", dsn, "--clickhouse-cluster", "meterd", "--clickhouse-shard", "0"}, "the shard (from 1) is required"},
		{[]string{"--clickhouse", dsn, "--clickhouse-cluster", "meterd", "--clickhouse-insert-quorum", "-1"}, "insert quorum must be 0 or more"},
		{[]string{"--clickhouse", dsn, "--clickhouse-cluster", "no such"}, "cluster name must match"},
	} {
		code, _, errOut := meterd(t, append([]string{"aggregator", "--insecure"}, c.args...)...)
		if code != 2 || !strings.Contains(errOut, c.msg) {
			t.Errorf("%q: exit %d, stderr %q; want exit 2 and %q", c.args, code, errOut, c.msg)
		}
	}
}
