package bucket_test

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/bucket"
	"github.com/meterd/meterd/internal/jstest"
)

// TestEnsure checks the settings every meterd bucket gets, that a second
// Ensure updates the bucket in place (keys kept), and that an error names
// the bucket.
func TestEnsure(t *testing.T) {
	js := jstest.Start(t, jstest.Config{}).JetStream()
	ctx := t.Context()

	kv, err := bucket.Ensure(ctx, js, bucket.Spec{Name: "things", Description: "things: key = thing", Replicas: -3})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "a", []byte("1")); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "a", []byte("2")); err != nil {
		t.Fatal(err)
	}
	check := func(wantDesc string, wantTTL time.Duration) {
		t.Helper()
		info, err := js.Stream(ctx, "KV_things")
		if err != nil {
			t.Fatal(err)
		}
		c := info.CachedInfo().Config
		if c.Description != wantDesc || c.MaxMsgsPerSubject != 1 || c.Storage != jetstream.FileStorage || c.Replicas != 1 || c.MaxAge != wantTTL {
			t.Errorf("stream config: description %q, history %d, storage %v, replicas %d, max age %s; want %q, 1, file, 1, %s",
				c.Description, c.MaxMsgsPerSubject, c.Storage, c.Replicas, c.MaxAge, wantDesc, wantTTL)
		}
	}
	check("things: key = thing", 0)
	if h, err := kv.History(ctx, "a"); err != nil || len(h) != 1 || string(h[0].Value()) != "2" {
		t.Errorf("history of a = %d entries (%v), want only the latest value", len(h), err)
	}

	kv, err = bucket.Ensure(ctx, js, bucket.Spec{Name: "things", Description: "things, expiring", TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	check("things, expiring", time.Hour)
	if e, err := kv.Get(ctx, "a"); err != nil || string(e.Value()) != "2" {
		t.Errorf("a after the update = %v, %v; want 2 kept", e, err)
	}

	_, err = bucket.Ensure(ctx, js, bucket.Spec{Name: "no spaces"})
	if err == nil || !strings.Contains(err.Error(), "bucket no spaces: ") {
		t.Errorf("Ensure of an invalid name = %v, want an error naming the bucket", err)
	}
}
