package catalog

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// Reload switches to the file's new catalog and tells OnChange and
// OnReload; a file that does not parse changes nothing but OnReload's
// count of failures.
func TestWatcherReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meterd.yaml")
	write := func(content string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("plans:\n  free: {limits: {api_calls: 1000}}\ntenants:\n  acme: {plan: free}\n")
	file, err := LoadCatalogFile(path)
	if err != nil {
		t.Fatal(err)
	}
	w := NewWatcher(nil, file, nil)
	w.Path = path
	var changes []*Catalog
	var reloads []error
	w.OnChange = func(c *Catalog) { changes = append(changes, c) }
	w.OnReload = func(err error) { reloads = append(reloads, err) }

	write("plans:\n  free: {limits: {api_calls: -1}}\ntenants:\n  acme: {plan: gold}\n")
	if err := w.Reload(); err == nil {
		t.Fatal("Reload of an invalid file succeeded")
	}
	if w.Catalog() != file || len(changes) != 0 || len(reloads) != 1 || reloads[0] == nil {
		t.Fatalf("after a failed reload: catalog replaced %v, %d changes, reloads %v", w.Catalog() != file, len(changes), reloads)
	}

	write("plans:\n  free: {limits: {api_calls: 400}}\ntenants:\n  acme: {plan: free}\n  newco: {plan: free}\n")
	if err := w.Reload(); err != nil {
		t.Fatal(err)
	}
	if len(changes) != 1 || changes[0] != w.Catalog() || len(reloads) != 2 || reloads[1] != nil {
		t.Fatalf("after a reload: %d changes (the current catalog: %v), reloads %v", len(changes), len(changes) == 1 && changes[0] == w.Catalog(), reloads)
	}
	if l, _ := w.Catalog().Limit("acme", "api_calls"); l != 400 || !w.Catalog().HasPlan("newco") {
		t.Errorf("reloaded catalog: acme's limit %d, newco has a plan %v; want 400 and true", l, w.Catalog().HasPlan("newco"))
	}
}

// Put and Delete need the bucket, which only Run opens.
func TestWatcherWritesNeedTheBucket(t *testing.T) {
	w := NewWatcher(nil, &Catalog{}, nil)
	if err := w.Put(t.Context(), "acme", Change{}); !errors.Is(err, ErrNotFollowing) {
		t.Errorf("Put before Run = %v, want ErrNotFollowing", err)
	}
	if _, err := w.Delete(t.Context(), "acme"); !errors.Is(err, ErrNotFollowing) {
		t.Errorf("Delete before Run = %v, want ErrNotFollowing", err)
	}
	if err := (NewWatcher(nil, &Catalog{}, nil)).Reload(); err == nil {
		t.Error("Reload without a Path succeeded")
	}
}
