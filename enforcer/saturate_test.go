package enforcer

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/gate"
	"github.com/meterd/meterd/schemas"
)

// rawRollup writes a rollup row of value (one event) into the store's file
// behind its back: no accepted event can build a total near 2^63 (an
// event's value is at most schemas.MaxValue).
func (v *env) rawRollup(tenant, meter string, hour time.Time, value int64) {
	v.t.Helper()
	db, err := sql.Open("sqlite", v.db)
	if err != nil {
		v.t.Fatal(err)
	}
	defer db.Close()
	_, err = db.Exec(`INSERT INTO rollups_hourly (tenant, meter, hour, dims_key, value, events) VALUES (?, ?, ?, ?, ?, 1)`,
		tenant, meter, hour.Unix(), fmt.Sprintf(`{"row":"%d"}`, v.seq.Add(1)), value)
	if err != nil {
		v.t.Fatal(err)
	}
}

// TestSeedSurvivesOverflowingTotals: the store holds tenants whose usage
// sums beyond int64 and a tenant over its quota, written while the enforcer
// was down. After the restart the tenant over quota is blocked (the gate
// answers 402), the tenant on a block plan whose total saturated is blocked
// rather than allowed, the overage tenant reads math.MaxInt64 flagged
// saturated, and further increments never wrap it. Before, SQLite's sum
// failed with "integer overflow" and the enforcer seeded no tenant at all.
func TestSeedSurvivesOverflowingTotals(t *testing.T) {
	v := newEnv(t)
	p, day := v.clock.Period(catalog.Monthly), v.clock.Period(catalog.Daily)
	v.start()
	v.stop()

	v.usage("acme", "api_calls", p.Start, false, 700, 500) // 1200 of 1000
	for _, tenant := range []string{"bigco", "stranger"} { // overage plan; not in the catalog
		v.rawRollup(tenant, "api_calls", p.Start, math.MaxInt64)
		v.rawRollup(tenant, "api_calls", p.Start.Add(time.Hour), 1)
	}
	v.rawRollup("daily", "api_calls", day.Start, math.MaxInt64-1) // 1000 a day, block
	v.usage("daily", "api_calls", day.Start.Add(time.Hour), false, 5)

	g, err := gate.New(gate.Config{NATS: v.nc, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	gateDone := make(chan error, 1)
	go func() { gateDone <- g.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-gateDone })

	v.start()
	d := v.waitDecision("acme", 5*time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	if d.Used != 1200 || d.Limit != 1000 {
		t.Errorf("acme's decision = %+v, want used 1200 of 1000", *d)
	}
	d = v.waitDecision("daily", 5*time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	if d.Used != math.MaxInt64 {
		t.Errorf("daily's decision = %+v, want used %d (saturated)", *d, int64(math.MaxInt64))
	}
	v.eventually("the gate answers 402", 5*time.Second, func() error {
		for _, tenant := range []string{"acme", "daily"} {
			if b := g.Check(tenant).Block; b == nil || b.Status != http.StatusPaymentRequired {
				return fmt.Errorf("%s: %+v", tenant, b)
			}
		}
		return nil
	})
	if b := g.Check("bigco").Block; b != nil {
		t.Errorf("bigco (overage plan) blocked: %+v", b.Decision)
	}

	meter := func(tenant string) MeterSummary {
		s := v.e.Summary(tenant)
		if len(s.Tenants) != 1 || len(s.Tenants[0].Meters) == 0 {
			t.Fatalf("summary of %s = %+v", tenant, s)
		}
		return s.Tenants[0].Meters[0]
	}
	if m := meter("bigco"); m.Used != math.MaxInt64 || !m.Saturated {
		t.Errorf("bigco's summary = %+v, want api_calls used %d, saturated", m, int64(math.MaxInt64))
	}
	if m := meter("acme"); m.Used != 1200 || m.Saturated {
		t.Errorf("acme's summary = %+v, want api_calls used 1200, not saturated", m)
	}

	// Increments keep the saturated totals there instead of wrapping them
	// negative (which unblocked the tenant).
	v.publish(schemas.Increment{Tenant: "daily", Meter: "api_calls", Hour: day.Start, Value: schemas.MaxValue, Events: 1},
		schemas.Increment{Tenant: "acme", Meter: "api_calls", Hour: p.Start, Value: 3, Events: 1})
	v.eventually("acme's increment", 5*time.Second, func() error {
		if u := v.view("acme").Usage["api_calls"]; u != 1203 {
			return fmt.Errorf("acme used %d", u)
		}
		return nil
	})
	if u := v.view("daily").Usage["api_calls"]; u != math.MaxInt64 {
		t.Errorf("daily used %d after an increment, want %d", u, int64(math.MaxInt64))
	}
	if d, _ := v.decision("daily"); d == nil {
		t.Error("daily unblocked by an increment")
	}
}

// brokenStore fails Totals while broken names a tenant, and TenantTotals
// for that tenant: a query that some tenant's data breaks.
type brokenStore struct {
	UsageSource
	broken       atomic.Value // string
	tenantCalls  atomic.Int64
	brokenTotals error
}

func (b *brokenStore) Totals(ctx context.Context, from, to time.Time) ([]schemas.Increment, error) {
	if b.broken.Load().(string) != "" {
		return nil, b.brokenTotals
	}
	return b.UsageSource.Totals(ctx, from, to)
}

func (b *brokenStore) TenantTotals(ctx context.Context, tenant string, from, to time.Time) ([]schemas.Increment, error) {
	b.tenantCalls.Add(1)
	if tenant == b.broken.Load().(string) {
		return nil, b.brokenTotals
	}
	return b.UsageSource.TenantTotals(ctx, tenant, from, to)
}

// TestSeedTenantByTenant: when the totals query fails while the store
// answers, the enforcer reads tenant by tenant; the tenant whose query
// fails keeps its decision and is retried, every other tenant is seeded and
// decided at once.
func TestSeedTenantByTenant(t *testing.T) {
	v := newEnv(t)
	p := v.clock.Period(catalog.Monthly)
	v.usage("acme", "api_calls", p.Start, false, 1200)
	v.usage("bigco", "api_calls", p.Start, false, 5)
	v.usage("daily", "api_calls", v.clock.Period(catalog.Daily).Start, false, 2000)
	b := &brokenStore{UsageSource: v.store, brokenTotals: errors.New("sqlite: totals: SQL logic error: integer overflow (1)")}
	b.broken.Store("bigco")
	v.mutate = func(c *Config) { c.Store = b }
	e := v.start()

	v.waitDecision("acme", 5*time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	v.waitDecision("daily", 5*time.Second, blockedFor(schemas.ReasonQuotaExceeded))
	if tv := v.view("bigco"); tv.UsageSeeded {
		t.Errorf("bigco seeded from a failing query: %+v", tv)
	}
	if tv := v.view("acme"); !tv.UsageSeeded || tv.Usage["api_calls"] != 1200 {
		t.Errorf("acme = %+v, want seeded with 1200", tv)
	}
	if err := e.Ready(context.Background()); err != nil {
		t.Errorf("Ready: %v", err)
	}

	b.broken.Store("")
	v.eventually("bigco seeded once its query works", 10*time.Second, func() error {
		if tv := v.view("bigco"); !tv.UsageSeeded || tv.Usage["api_calls"] != 5 {
			return fmt.Errorf("bigco = %+v", tv)
		}
		return nil
	})
	if n := b.tenantCalls.Load(); n < 3 {
		t.Errorf("%d tenant queries, want one per tenant at least", n)
	}
}
