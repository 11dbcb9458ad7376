package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/schemas"
)

// TestMaxValueSumsExactly sends the repro (a value of 2^63 − 1, then
// 1: the total wrapped to -2^63 and the tenant was never blocked) and then
// events of the largest value an event may have through `meterd dev`, on
// both stores: the big value is refused with a 422, and the set of events
// answered 202 equals the enforcer's usage and the report, exactly.
func TestMaxValueSumsExactly(t *testing.T) {
	for _, kind := range []string{"sqlite", "clickhouse"} {
		t.Run(kind, func(t *testing.T) {
			var args []string
			if kind == "clickhouse" {
				args = []string{"--clickhouse", chtest.DSN(t)}
			}
			s := startE2EDev(t, e2eConfig, args...)
			post := func(body string) int {
				t.Helper()
				a, err := s.do(http.MethodPost, "/v1/events", http.Header{"Content-Type": {"application/json"}}, []byte(body))
				if err != nil {
					t.Fatal(err)
				}
				return a.status
			}
			event := func(tenant, id string, value int64) string {
				return fmt.Sprintf(`{"id":%q,"tenant":%q,"meter":"api_calls","value":%d}`, id, tenant, value)
			}
			accepted := map[string]int64{}
			if st := post("[" + event("globex", "huge", 1<<63-1) + "]"); st != http.StatusUnprocessableEntity {
				t.Fatalf("a value of 2^63 - 1: status %d, want 422", st)
			}
			if st := post("[" + event("globex", "one", 1) + "]"); st != http.StatusAccepted {
				t.Fatalf("a value of 1: status %d, want 202", st)
			}
			accepted["globex"]++
			for r := range 3 {
				var evs []string
				for i := range 4 {
					evs = append(evs, event("globex", fmt.Sprintf("max-%d-%d", r, i), schemas.MaxValue))
				}
				if st := post("[" + strings.Join(evs, ",") + "]"); st != http.StatusAccepted {
					t.Fatalf("request %d: status %d, want 202", r, st)
				}
				accepted["globex"] += 4 * schemas.MaxValue
			}
			if st := post("[" + event("acme", "max", schemas.MaxValue) + "]"); st != http.StatusAccepted {
				t.Fatalf("acme: status %d, want 202", st)
			}
			accepted["acme"] += schemas.MaxValue

			deadline := time.Now().Add(10 * time.Second)
			for tenant, want := range accepted {
				for {
					v := e2eTenant(t, s, tenant)
					if v.UsageSeeded && v.Usage["api_calls"] == want {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("%s: usage %d (seeded %v), want %d answered 202", tenant, v.Usage["api_calls"], v.UsageSeeded, want)
					}
					time.Sleep(50 * time.Millisecond)
				}
				a, err := s.do(http.MethodGet, "/v1/usage?window=period&meter=api_calls&tenant="+tenant, nil, nil)
				if err != nil || a.status != http.StatusOK {
					t.Fatalf("report of %s: %v %+v", tenant, err, a)
				}
				var rep struct {
					Rows []struct {
						Value     int64
						Saturated bool
					}
				}
				if err := json.Unmarshal(a.body, &rep); err != nil || len(rep.Rows) != 1 || rep.Rows[0].Value != want || rep.Rows[0].Saturated {
					t.Errorf("report of %s = %s (%v), want one row of value %d, not saturated", tenant, a.body, err, want)
				}
			}
			// acme's one event is over its 1000 api_calls: blocked.
			s.waitCheck(t, "acme", http.StatusPaymentRequired, time.Now(), 5*time.Second)
		})
	}
}
