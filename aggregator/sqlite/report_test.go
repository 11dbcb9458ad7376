package sqlite

import (
	"strings"
	"testing"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/rollup"
)

// TestUsagePlans checks how SQLite reads the rollups and raw events of a
// report: through the hours of the range only, never through all of a
// tenant's history (a tenant's monthly report over three years of hourly
// rollups with 10 dimension combinations took 141 ms that way, 25 ms by
// hours).
func TestUsagePlans(t *testing.T) {
	s := newStore(t)
	from := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	to := from.AddDate(0, 1, 0)
	for _, tc := range []struct {
		name string
		q    aggregator.UsageQuery
		want []string
	}{
		{"tenant, every meter", aggregator.UsageQuery{Tenant: "acme", From: from, To: to.Add(time.Minute), Granularity: aggregator.Monthly}, []string{
			"SEARCH rollups_hourly USING PRIMARY KEY (tenant=? AND meter=? AND hour>? AND hour<?)",
			"SEARCH events USING INDEX events_by_time (time>? AND time<?)",
		}},
		{"tenant and meter", aggregator.UsageQuery{Tenant: "acme", Meter: "api_calls", From: from.Add(time.Minute), To: to, Granularity: aggregator.Daily, GroupBy: []string{"route"}}, []string{
			"SEARCH rollups_hourly USING PRIMARY KEY (tenant=? AND meter=? AND hour>? AND hour<?)",
			"SEARCH events USING INDEX events_by_time (time>? AND time<?)",
		}},
		{"two edges", aggregator.UsageQuery{Tenant: "acme", Meter: "api_calls", From: from.Add(time.Minute), To: to.Add(time.Minute), Granularity: aggregator.Daily}, []string{
			"SEARCH rollups_hourly USING PRIMARY KEY (tenant=? AND meter=? AND hour>? AND hour<?)",
			"MULTI-INDEX OR",
			"SEARCH events USING INDEX events_by_time (time>? AND time<?)",
		}},
		{"every tenant", aggregator.UsageQuery{Meter: "api_calls", From: from, To: to, Granularity: aggregator.Hourly}, []string{
			"SEARCH rollups_hourly USING INDEX rollups_by_hour (hour>? AND hour<?)",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			query, args := usageQuery(tc.q, rollup.Split(tc.q.From, tc.q.To))
			rows, err := s.db.QueryContext(t.Context(), "EXPLAIN QUERY PLAN "+query, args...)
			if err != nil {
				t.Fatal(err)
			}
			defer rows.Close()
			var plan []string
			for rows.Next() {
				var id, parent, unused int
				var detail string
				if err := rows.Scan(&id, &parent, &unused, &detail); err != nil {
					t.Fatal(err)
				}
				if strings.HasPrefix(detail, "SEARCH ") || strings.HasPrefix(detail, "SCAN ") || detail == "MULTI-INDEX OR" {
					plan = append(plan, detail)
				}
			}
			if err := rows.Err(); err != nil {
				t.Fatal(err)
			}
			all := strings.Join(plan, "\n")
			for _, w := range tc.want {
				if !strings.Contains(all, w) {
					t.Errorf("plan lacks %q:\n%s", w, all)
				}
			}
			for _, step := range plan {
				if strings.HasPrefix(step, "SCAN events") || strings.HasPrefix(step, "SCAN rollups_hourly") {
					t.Errorf("plan reads a whole table: %s", step)
				}
			}
		})
	}
}
