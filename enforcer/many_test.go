package enforcer

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/metrictest"
	"github.com/meterd/meterd/schemas"
)

// The many-tenants tests and benchmarks (BENCHMARKS.md "Many tenants") run
// the enforcer's parts as Run wires them, without NATS: the usage comes
// from memStore, an in-memory UsageSource (filling a real store with a
// million tenants' usage would measure the store, not the enforcer), and
// the decisions go to memKV, an in-memory blocklist bucket.

// memStore is a UsageSource answering from a fixed list of totals.
type memStore struct{ incs []schemas.Increment }

func (s *memStore) Totals(context.Context, time.Time, time.Time) ([]schemas.Increment, error) {
	return s.incs, nil
}

func (s *memStore) TenantTotals(_ context.Context, tenant string, _, _ time.Time) ([]schemas.Increment, error) {
	var out []schemas.Increment
	for _, inc := range s.incs {
		if inc.Tenant == tenant {
			out = append(out, inc)
		}
	}
	return out, nil
}

func (s *memStore) Ping(context.Context) error { return nil }

// memKV is a blocklist bucket in memory: only Put and Delete, which the
// publisher writes decisions with, are implemented.
type memKV struct {
	jetstream.KeyValue // nil: any other method panics
	mu                 sync.Mutex
	vals               map[string][]byte
	writes             int
}

func (kv *memKV) Put(_ context.Context, key string, value []byte) (uint64, error) {
	kv.mu.Lock()
	defer kv.mu.Unlock()
	kv.vals[key] = value
	kv.writes++
	return uint64(kv.writes), nil
}

func (kv *memKV) Delete(_ context.Context, key string, _ ...jetstream.KVDeleteOpt) error {
	kv.mu.Lock()
	defer kv.mu.Unlock()
	delete(kv.vals, key)
	kv.writes++
	return nil
}

func (kv *memKV) len() int {
	kv.mu.Lock()
	defer kv.mu.Unlock()
	return len(kv.vals)
}

// manyTenants returns a catalog of n tenants (t-0000000 …), alternately on
// a "free" plan (1000 api_calls, block) and a "pro" plan (100 000 api_calls
// and 50 000 tokens, block), and the totals of a store where every tenant
// used half its api_calls, except every blockEvery-th, which used its
// limit: n/blockEvery blocked.
func manyTenants(tb testing.TB, n, blockEvery int) (*catalog.Catalog, *memStore) {
	tb.Helper()
	plans := []catalog.Plan{
		{Name: "free", Limits: map[string]int64{"api_calls": 1000}},
		{Name: "pro", Limits: map[string]int64{"api_calls": 100_000, "tokens": 50_000}},
	}
	tenants := make([]catalog.Tenant, n)
	incs := make([]schemas.Increment, 0, n*3/2)
	hour := time.Now().UTC().Truncate(time.Hour)
	for i := range tenants {
		t := catalog.Tenant{Name: fmt.Sprintf("t-%07d", i), Plan: plans[i%2].Name}
		tenants[i] = t
		limit := plans[i%2].Limits["api_calls"]
		used := limit / 2
		if i%blockEvery == 0 {
			used = limit
		}
		incs = append(incs, schemas.Increment{Tenant: t.Name, Meter: "api_calls", Hour: hour, Value: used})
		if i%2 == 1 {
			incs = append(incs, schemas.Increment{Tenant: t.Name, Meter: "tokens", Hour: hour, Value: 10})
		}
	}
	cat, err := catalog.NewCatalog(plans, tenants)
	if err != nil {
		tb.Fatal(err)
	}
	return cat, &memStore{incs: incs}
}

// offlineEnforcer is an Enforcer of cat and store whose blocklist is a
// memKV; nothing of it talks to NATS.
func offlineEnforcer(tb testing.TB, cat *catalog.Catalog, store UsageSource) (*Enforcer, *memKV, *prometheus.Registry) {
	tb.Helper()
	reg := prometheus.NewRegistry()
	keys, err := auth.NewKeys([]auth.Key{{Key: adminKey, Admin: true}})
	if err != nil {
		tb.Fatal(err)
	}
	e, err := New(Config{NATS: &nats.Conn{}, Store: store, Catalog: cat, Keys: keys, Registerer: reg})
	if err != nil {
		tb.Fatal(err)
	}
	kv := &memKV{vals: map[string][]byte{}}
	e.buckets.Store(&buckets{blocklist: kv})
	e.writer.always(kv) // the only replica: it writes without a lease
	return e, kv, reg
}

// seed is what Run does from the subscription to the first writes: track
// every tenant and read their usage from the store.
func seed(tb testing.TB, e *Enforcer) {
	tb.Helper()
	e.track.track()
	if err := e.rec.reconcile(context.Background(), nil); err != nil {
		tb.Fatal(err)
	}
	e.pub.seeded.Store(true)
	e.track.track()
}

// publish decides every dirty tenant and writes the decisions, as the
// writer does.
func publish(tb testing.TB, e *Enforcer) {
	tb.Helper()
	if err := e.pub.flush(context.Background()); err != nil {
		tb.Fatal(err)
	}
}

// The seed of many tenants blocks exactly those over their limit, and the
// blocked-tenants gauge, kept by counting each write, follows the
// blocklist when blocks are added and lifted.
func TestManyTenantsSeedAndGauge(t *testing.T) {
	cat, store := manyTenants(t, 10_000, 10)
	e, kv, reg := offlineEnforcer(t, cat, store)
	seed(t, e)
	publish(t, e)
	gauge := func() float64 {
		return metrictest.Value(t, reg, "meterd_enforcer_blocked_tenants", "reason", string(schemas.ReasonQuotaExceeded))
	}
	if kv.len() != 1000 || len(e.pub.blocklist().Decisions) != 1000 || gauge() != 1000 {
		t.Fatalf("blocked %d in the bucket, %d in the blocklist, gauge %v; want 1000", kv.len(), len(e.pub.blocklist().Decisions), gauge())
	}
	// GET /v1/blocklist answers the blocklist, as JSON of a BlocklistView.
	mux := http.NewServeMux()
	e.Register(mux)
	req := httptest.NewRequest(http.MethodGet, "/v1/blocklist", nil)
	req.Header.Set("Authorization", "Bearer "+adminKey)
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, req)
	var got BlocklistView
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil || rec.Code != http.StatusOK {
		t.Fatalf("GET /v1/blocklist: %d, %v", rec.Code, err)
	}
	gotJSON, _ := json.Marshal(got)
	wantJSON, _ := json.Marshal(e.pub.blocklist())
	if !bytes.Equal(gotJSON, wantJSON) || rec.Header().Get("Content-Length") != strconv.Itoa(rec.Body.Len()) {
		t.Errorf("GET /v1/blocklist answered %d bytes (Content-Length %s) unlike the blocklist", rec.Body.Len(), rec.Header().Get("Content-Length"))
	}
	// The store now says 100 of the blocked used half their limit.
	for i := range store.incs {
		if inc := &store.incs[i]; inc.Meter == "api_calls" && inc.Tenant < "t-0001000" && inc.Tenant[len(inc.Tenant)-1] == '0' {
			inc.Value = 1
		}
	}
	if err := e.rec.reconcile(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	publish(t, e)
	if kv.len() != 900 || gauge() != 900 {
		t.Errorf("after lifting 100: %d in the bucket, gauge %v; want 900", kv.len(), gauge())
	}
	if v := metrictest.Value(t, reg, "meterd_enforcer_blocked_tenants", "reason", string(schemas.ReasonSuspended)); v != 0 {
		t.Errorf("suspended gauge %v, want 0", v)
	}
}

// manySizes are the tenants of the many-tenants benchmarks, a tenth of
// them blocked.
var manySizes = []int{10_000, 100_000, 1_000_000}

// manyCache holds the catalogs and stores of manyTenants(n, 10) the
// benchmarks share, built once per size when a benchmark of that size runs
// (none of them changes its catalog or store).
var manyCache = map[int]struct {
	cat   *catalog.Catalog
	store *memStore
}{}

func manyCached(b *testing.B, n int) (*catalog.Catalog, *memStore) {
	c, ok := manyCache[n]
	if !ok {
		c.cat, c.store = manyTenants(b, n, 10)
		manyCache[n] = c
	}
	return c.cat, c.store
}

// BenchmarkSeed is the enforcer's seed at start: track n tenants of the
// catalog and read their usage from the store (one totals query). It
// reports the heap the tracked usage keeps, per tenant. Run it with
// -benchtime Nx: each iteration builds a fresh enforcer untimed.
func BenchmarkSeed(b *testing.B) {
	for _, n := range manySizes {
		b.Run(fmt.Sprintf("tenants=%d", n), func(b *testing.B) {
			cat, store := manyCached(b, n)
			b.ReportAllocs()
			var heap uint64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				e, _, _ := offlineEnforcer(b, cat, store)
				before := heapInUse()
				b.StartTimer()
				seed(b, e)
				b.StopTimer()
				heap = heapInUse() - before
				runtime.KeepAlive(e)
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/tenant")
			b.ReportMetric(float64(heap)/float64(n), "heap-B/tenant")
		})
	}
}

// BenchmarkFirstPublish is the first writing round after the seed: decide
// n tenants and write the n/10 blocks to the bucket (in memory). Run it
// with -benchtime Nx: each iteration seeds a fresh enforcer untimed.
func BenchmarkFirstPublish(b *testing.B) {
	for _, n := range manySizes {
		b.Run(fmt.Sprintf("tenants=%d,blocked=%d", n, n/10), func(b *testing.B) {
			cat, store := manyCached(b, n)
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				e, kv, _ := offlineEnforcer(b, cat, store)
				seed(b, e)
				b.StartTimer()
				publish(b, e)
				b.StopTimer()
				if kv.len() != n/10 {
					b.Fatalf("%d blocks written, want %d", kv.len(), n/10)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/tenant")
		})
	}
}

// BenchmarkBlocklist is GET /v1/blocklist with n/10 tenants blocked: it
// reports the size of the answer.
func BenchmarkBlocklist(b *testing.B) {
	for _, n := range manySizes {
		b.Run(fmt.Sprintf("blocked=%d", n/10), func(b *testing.B) {
			cat, store := manyCached(b, n)
			e, _, _ := offlineEnforcer(b, cat, store)
			seed(b, e)
			publish(b, e)
			mux := http.NewServeMux()
			e.Register(mux)
			b.ReportAllocs()
			var size int
			for b.Loop() {
				req := httptest.NewRequest(http.MethodGet, "/v1/blocklist", nil)
				req.Header.Set("Authorization", "Bearer "+adminKey)
				rec := httptest.NewRecorder()
				mux.ServeHTTP(rec, req)
				if rec.Code != http.StatusOK {
					b.Fatalf("status %d: %s", rec.Code, rec.Body)
				}
				size = rec.Body.Len()
			}
			b.ReportMetric(float64(size), "body-B")
			b.ReportMetric(float64(size)/float64(n/10), "body-B/block")
		})
	}
}

// BenchmarkCatalogChange is what one admin API change costs the enforcer
// with n tenants tracked: merge it over the file catalog and switch the
// tracker to the result; only the changed tenant is decided again.
func BenchmarkCatalogChange(b *testing.B) {
	for _, n := range manySizes {
		b.Run(fmt.Sprintf("tenants=%d", n), func(b *testing.B) {
			cat, store := manyCached(b, n)
			e, _, _ := offlineEnforcer(b, cat, store)
			seed(b, e)
			publish(b, e)
			plans := []string{"pro", "free"}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				changed, dropped := catalog.Merge(cat, map[string]catalog.Change{"t-0000000": {Plan: &plans[i%2]}}, "")
				if len(dropped) > 0 {
					b.Fatal(dropped)
				}
				e.onCatalog(changed)
				publish(b, e)
				i++
			}
		})
	}
}

// heapInUse returns the live heap after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// A catalog change has only the tenants it changes or drops decided again,
// however many the catalog holds.
func TestManyTenantsCatalogChange(t *testing.T) {
	cat, store := manyTenants(t, 10_000, 10)
	e, kv, _ := offlineEnforcer(t, cat, store)
	seed(t, e)
	publish(t, e)
	if n := len(e.dirty.take()); n != 0 || kv.len() != 1000 {
		t.Fatalf("after the first round: %d dirty, %d blocked", n, kv.len())
	}
	suspended, pro := catalog.StatusSuspended, "pro"
	changed, _ := catalog.Merge(cat, map[string]catalog.Change{
		"t-0000001": {Status: &suspended}, // blocked for its status
		"t-0000010": {Plan: &pro},         // was over free's limit; within pro's
		"t-0000013": {Plan: &pro},         // the same plan again: nothing changes
		"newcomer":  {Plan: &pro},
	}, "")
	e.onCatalog(changed)
	dirty := e.dirty.take()
	if len(dirty) != 3 {
		t.Fatalf("dirty after the change: %v, want t-0000001, t-0000010 and newcomer", dirty)
	}
	for _, name := range []string{"t-0000001", "t-0000010", "newcomer"} {
		e.dirty.mark(name, time.Time{})
	}
	if err := e.rec.reconcile(context.Background(), e.track.waitingReseed()); err != nil {
		t.Fatal(err)
	}
	publish(t, e)
	if _, ok := e.pub.decision("t-0000010"); ok || kv.len() != 1000 {
		t.Errorf("after the change: %d blocked, t-0000010 blocked %v; want 1000, false", kv.len(), ok)
	}
	if d, _ := e.pub.decision("t-0000001"); d.Reason != schemas.ReasonSuspended {
		t.Errorf("t-0000001: %+v, want suspended", d)
	}
	// A file without t-0000020 (nor the changes): those four are decided
	// again.
	var tenants []catalog.Tenant
	for _, name := range cat.TenantNames() {
		if name != "t-0000020" {
			tn, _, _ := cat.Tenant(name)
			tenants = append(tenants, tn)
		}
	}
	p1, _ := cat.Plan("free")
	p2, _ := cat.Plan("pro")
	smaller, err := catalog.NewCatalog([]catalog.Plan{p1, p2}, tenants)
	if err != nil {
		t.Fatal(err)
	}
	e.onCatalog(smaller)
	dirty = e.dirty.take()
	for _, name := range []string{"t-0000020", "t-0000001", "t-0000010", "newcomer"} {
		if _, ok := dirty[name]; !ok {
			t.Errorf("%s not decided again", name)
		}
	}
	if len(dirty) != 4 {
		t.Errorf("dirty after the file change: %v, want 4 tenants", dirty)
	}
}

// Increments arriving while a seed reads the store and while it sets the
// tenants chunk by chunk (releasing the tracker's lock in between) are each
// counted once: every tenant ends at its total in the store plus what
// arrived since the query started.
func TestManyTenantsSeedWithIncrements(t *testing.T) {
	const n = 3*endReadChunk + 100
	cat, mem := manyTenants(t, n, 10)
	period := cat.PeriodOf("t-0000000", time.Now())
	store := &gatedStore{UsageSource: mem, period: period, snapshot: make(chan struct{}), release: make(chan struct{})}
	e, _, _ := offlineEnforcer(t, cat, store)
	e.track.track()
	done := make(chan error, 1)
	go func() { done <- e.rec.reconcile(context.Background(), nil) }()
	<-store.snapshot
	names := cat.TenantNames()
	sent := map[string]int64{}
	hour := time.Now().UTC().Truncate(time.Hour)
	send := func(i int) {
		name := names[i%len(names)]
		data, _ := json.Marshal(schemas.Committed{Tenant: name, Meter: "api_calls", Hour: hour, Value: 3, Events: 3})
		e.track.onCommitted(&nats.Msg{Subject: schemas.CommittedSubjectPrefix + "0", Data: data})
		sent[name] += 3
	}
	i := 0
	for ; i < n/2; i++ { // while the query runs
		send(i * 7)
	}
	close(store.release)
	for running := true; running; i++ { // while the tenants are set
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			running = false
		default:
		}
		send(i * 7)
	}
	want := map[string]int64{}
	for _, inc := range mem.incs {
		if inc.Meter == "api_calls" {
			want[inc.Tenant] += inc.Value
		}
	}
	for _, name := range names {
		_, seeded, used := e.track.usageOf(name)
		if !seeded || used["api_calls"] != want[name]+sent[name] {
			t.Fatalf("%s: seeded %v, used %d, want %d in the store + %d arrived", name, seeded, used["api_calls"], want[name], sent[name])
		}
	}
	t.Logf("%d increments sent, %d after the query returned", i, i-n/2)
}
