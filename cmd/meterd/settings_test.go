package main

import (
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meterd/meterd/cmd/meterd/internal/cli"
)

// The keys of --api-keys-file (set through METERD_API_KEYS_FILE, as the
// Kubernetes manifests do) join those of the config file, and only a key
// listed in one of them authenticates.
func TestAPIKeysFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cfg := write("meterd.yaml", "api_keys:\n  - {key: config-file-admin-key, admin: true}\n")
	secret := write("api-keys.yaml", "api_keys:\n  - {key: secret-file-acme-key, tenant: acme}\n")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	build := func(t *testing.T, args ...string) *settings {
		t.Helper()
		fs, s, err := newFlags("collector", args, io.Discard, ":0")
		if err != nil {
			t.Fatal(err)
		}
		keysFlag(fs, s)
		if err := cli.Parse(fs, args); err != nil {
			t.Fatal(err)
		}
		return s
	}

	t.Setenv("METERD_API_KEYS_FILE", secret)
	s := build(t, "--config", cfg)
	keys, err := s.keys(log)
	if err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]string{"config-file-admin-key": "admin", "secret-file-acme-key": "acme", "an-unknown-key-0000": "error"} {
		r := httptest.NewRequest("GET", "/v1/check", nil)
		r.Header.Set("X-API-Key", key)
		p, err := keys.Authenticate(r)
		got := p.Tenant
		switch {
		case err != nil:
			got = "error"
		case p.Admin:
			got = "admin"
		}
		if got != want {
			t.Errorf("key %s: %s, want %s", key, got, want)
		}
	}

	// The same key in both files is a mistake, as within one file.
	t.Setenv("METERD_API_KEYS_FILE", write("dup.yaml", "api_keys:\n  - {key: config-file-admin-key, admin: true}\n"))
	s = build(t, "--config", cfg)
	if _, err := s.keys(log); err == nil || !strings.Contains(err.Error(), "listed twice") {
		t.Errorf("a key listed in both files: %v", err)
	}

	// A missing file fails the start instead of running without its keys.
	t.Setenv("METERD_API_KEYS_FILE", filepath.Join(dir, "missing.yaml"))
	s = build(t)
	if _, err := s.keys(log); err == nil || !strings.Contains(err.Error(), "missing.yaml") {
		t.Errorf("a missing keys file: %v", err)
	}
}

// Streams and KV buckets are created with 3 replicas unless told otherwise:
// a production billing stream needs R3 (docs/architecture.md#exactly-once); METERD_NATS_REPLICAS=1
// is for a single server.
func TestNATSReplicas(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want int
	}{{"", 3}, {"1", 1}} {
		if tc.env != "" {
			t.Setenv("METERD_NATS_REPLICAS", tc.env)
		}
		fs, s, err := newFlags("aggregator", nil, io.Discard, ":0")
		if err != nil {
			t.Fatal(err)
		}
		natsFlags(fs, &s.file.NATS)
		if err := cli.Parse(fs, nil); err != nil {
			t.Fatal(err)
		}
		if s.file.NATS.Replicas != tc.want {
			t.Errorf("METERD_NATS_REPLICAS=%q: replicas %d, want %d", tc.env, s.file.NATS.Replicas, tc.want)
		}
	}
}
