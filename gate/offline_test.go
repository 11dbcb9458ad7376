package gate

import (
	"encoding/json"
	"hash/maphash"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// offlineGate returns a gate without NATS, for tests and benchmarks that
// feed its applier entries directly.
func offlineGate(tb testing.TB) *Gate {
	tb.Helper()
	g := &Gate{
		cfg: Config{Now: time.Now, StaleAfter: time.Hour},
		log: slog.New(slog.DiscardHandler), obs: nopObserver{}, born: time.Now(),
		staleAfter: int64(time.Hour),
	}
	g.snap.Store(newSnapshot(maphash.MakeSeed()))
	return g
}

// preload makes g hold blocks, as if a replay had loaded them.
func preload(g *Gate, blocks map[string]*Block) {
	g.snap.Store(built(g.snap.Load().seed, blocks, uint64(len(blocks))))
}

// kvEntry is a blocklist entry as a watch delivers it.
type kvEntry struct {
	key   string
	value []byte
	op    jetstream.KeyValueOp
	rev   uint64
}

func (e *kvEntry) Bucket() string                  { return "meterd-blocklist" }
func (e *kvEntry) Key() string                     { return e.key }
func (e *kvEntry) Value() []byte                   { return e.value }
func (e *kvEntry) Revision() uint64                { return e.rev }
func (e *kvEntry) Created() time.Time              { return time.Now() }
func (e *kvEntry) Delta() uint64                   { return 0 }
func (e *kvEntry) Operation() jetstream.KeyValueOp { return e.op }

// putEntry is the entry of tenant's quota decision at version.
func putEntry(tb testing.TB, tenant string, version uint64) *kvEntry {
	v, err := json.Marshal(quota(tenant, version))
	if err != nil {
		tb.Fatal(err)
	}
	return &kvEntry{key: tenant, value: v, op: jetstream.KeyValuePut, rev: version}
}

// delEntry is the entry of the delete of tenant's key.
func delEntry(tenant string, rev uint64) *kvEntry {
	return &kvEntry{key: tenant, op: jetstream.KeyValueDelete, rev: rev}
}
