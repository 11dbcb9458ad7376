package enforcer

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/meterd/meterd/catalog"
)

// A watcher in another process follows the admin API: before the enforcer
// made its bucket it holds the file's catalog; then every change and delete
// of a tenant shows in its catalog, merged as the enforcer merges it.
func TestCatalogWatcher(t *testing.T) {
	v := newEnv(t)
	w := catalog.NewWatcher(v.nc, v.cat, nil)
	w.Retry = 50 * time.Millisecond
	if err := w.Ready(context.Background()); !errors.Is(err, catalog.ErrNotLoaded) {
		t.Fatalf("Ready before Run = %v, want catalog.ErrNotLoaded", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	if w.Catalog() != v.cat {
		t.Fatal("the watcher does not start from the file's catalog")
	}
	// No enforcer made the bucket yet: the file is the whole catalog.
	v.eventually("the watcher is ready without a bucket", 5*time.Second, func() error { return w.Ready(context.Background()) })
	at := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	if p := w.Catalog().PeriodOf("acme", at); !p.Start.Equal(time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)) {
		t.Fatalf("acme's period from the file: %s", p)
	}

	v.start() // creates the bucket
	if resp := v.do(http.MethodPut, "/v1/tenants/acme", adminKey, map[string]any{"billing_anchor": "2026-01-31"}, nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT acme: %d", resp.StatusCode)
	}
	if resp := v.do(http.MethodPut, "/v1/tenants/newco", adminKey, map[string]any{"plan": "day"}, nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT newco: %d", resp.StatusCode)
	}
	v.eventually("the watcher sees the changes", 10*time.Second, func() error {
		c := w.Catalog()
		if p := c.PeriodOf("acme", at); !p.Start.Equal(time.Date(2026, 2, 28, 0, 0, 0, 0, time.UTC)) {
			return fmt.Errorf("acme's period %s, want from Feb 28 (anchor on the 31st)", p)
		}
		if !c.HasPlan("newco") || c.PeriodOf("newco", at).End.Sub(c.PeriodOf("newco", at).Start) != 24*time.Hour {
			return fmt.Errorf("newco: plan %v, period %s; want daily", c.HasPlan("newco"), c.PeriodOf("newco", at))
		}
		return nil
	})
	if resp := v.do(http.MethodDelete, "/v1/tenants/acme", adminKey, nil, nil); resp.StatusCode/100 != 2 {
		t.Fatalf("DELETE acme: %d", resp.StatusCode)
	}
	v.eventually("the watcher sees the delete", 10*time.Second, func() error {
		if p := w.Catalog().PeriodOf("acme", at); !p.Start.Equal(time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)) {
			return fmt.Errorf("acme's period %s after the delete, want the file's again", p)
		}
		return nil
	})
}
