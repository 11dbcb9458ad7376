package config

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "meterd.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoad(t *testing.T) {
	f, err := Load(writeFile(t, `
api_keys:
  - {key: "0123456789abcdef-admin", admin: true}
  - {key: "0123456789abcdef-acme", tenant: acme}
collector:
  batch_max_wait: 75ms
  partitions: 8
plans:
  free: {period: monthly, limits: {api_calls: 1000}, on_exceed: block}
tenants:
  acme: {plan: free, billing_anchor: 2026-01-31}
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(f.APIKeys) != 2 || f.Collector.BatchMaxWait != 75*time.Millisecond || f.Collector.Partitions != 8 {
		t.Fatalf("file %+v", f)
	}
	if limit, ok := f.Catalog.Limit("acme", "api_calls"); !ok || limit != 1000 || !f.Catalog.HasPlan("acme") || f.Catalog.HasPlan("globex") {
		t.Fatalf("catalog: limit %d %v", limit, ok)
	}
	if p := f.Catalog.PeriodOf("acme", time.Date(2026, 2, 10, 0, 0, 0, 0, time.UTC)); !p.Start.Equal(time.Date(2026, 1, 31, 0, 0, 0, 0, time.UTC)) || !p.End.Equal(time.Date(2026, 2, 28, 0, 0, 0, 0, time.UTC)) {
		t.Fatalf("period %v", p)
	}
}

func TestLoadErrors(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{"collector:\n  batch_max_events: 5\n  batch_size: 9\n", "field batch_size not found"},
		{"api_keys:\n  - {key: short, admin: true}\n", "at least 16 characters"},
		{"api_keys:\n  - {key: 0123456789abcdef0, tenant: acme, admin: true}\n", "exactly one of tenant or admin"},
		{"tenants:\n  acme: {plan: gold}\n", `unknown plan "gold"`},
		{"collector: [", "yaml"},
	} {
		_, err := Load(writeFile(t, tc.body))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want it to mention %q", tc.body, err, tc.want)
		}
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Error("a missing file loaded")
	}
	if f, err := Load(writeFile(t, "")); err != nil || len(f.APIKeys) != 0 {
		t.Errorf("empty file: %v", err)
	}
}

func TestLoadAPIKeys(t *testing.T) {
	keys, err := LoadAPIKeys(writeFile(t, `
api_keys:
  - {key: "0123456789abcdef-admin", admin: true}
  - {key: "0123456789abcdef-acme", tenant: acme}
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || !keys[0].Admin || keys[1].Tenant != "acme" || keys[1].Key != "0123456789abcdef-acme" {
		t.Fatalf("keys %+v", keys)
	}
	for _, tc := range []struct{ body, want string }{
		// Only keys belong in this file: plans stay in the config file.
		{"api_keys: []\nplans: {}\n", "field plans not found"},
		{"api_keys:\n  - {key: short, admin: true}\n", "at least 16 characters"},
		{"api_keys:\n  - {key: 0123456789abcdef0, admin: true, tennant: acme}\n", "field tennant not found"},
	} {
		_, err := LoadAPIKeys(writeFile(t, tc.body))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want it to mention %q", tc.body, err, tc.want)
		}
	}
	if _, err := LoadAPIKeys(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Error("a missing file loaded")
	}
}

// Flags win over METERD_* variables, which win over the defaults taken from
// the file.
func TestPrecedence(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	var listen, spool string
	var workers int
	fs.StringVar(&listen, "listen", "from-file", "")
	fs.StringVar(&spool, "spool-dir", "from-file", "")
	fs.IntVar(&workers, "publish-workers", 1, "")
	t.Setenv("METERD_LISTEN", "from-env")
	t.Setenv("METERD_SPOOL_DIR", "from-env")
	if err := ApplyEnv(fs); err != nil {
		t.Fatal(err)
	}
	if err := fs.Parse([]string{"--listen", "from-flag"}); err != nil {
		t.Fatal(err)
	}
	if listen != "from-flag" || spool != "from-env" || workers != 1 {
		t.Fatalf("listen %q spool %q workers %d", listen, spool, workers)
	}
	t.Setenv("METERD_PUBLISH_WORKERS", "many")
	if err := ApplyEnv(fs); err == nil || !strings.Contains(err.Error(), "METERD_PUBLISH_WORKERS") {
		t.Fatalf("bad env value: %v", err)
	}
}

func TestConfigPath(t *testing.T) {
	t.Setenv("METERD_CONFIG", "env.yaml")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--config", "a.yaml", "--listen", ":1"}, "a.yaml"},
		{[]string{"-config=b.yaml"}, "b.yaml"},
		{[]string{"--listen", ":1"}, "env.yaml"},
	} {
		if got := ConfigPath(tc.args); got != tc.want {
			t.Errorf("%v: %q, want %q", tc.args, got, tc.want)
		}
	}
}
