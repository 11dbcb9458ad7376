package sqlite

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/rollup"
)

var _ aggregator.Reporter = (*Store)(nil)

// Usage implements aggregator.Reporter in one query: the whole hours of the
// range from rollups_hourly and its partial edges from events, bucketed,
// united, summed per (tenant, meter, bucket, dimensions) and sorted by
// SQLite, whose rows go to fn as the cursor yields them.
func (s *Store) Usage(ctx context.Context, q aggregator.UsageQuery, fn func(*aggregator.UsageRow) error) error {
	return rollup.Usage("sqlite", q, fn, func(sp rollup.Span) (rollup.UsageRows, error) {
		query, args := usageQuery(q, sp)
		return s.db.QueryContext(ctx, query, args...)
	})
}

// params collects the arguments of a query and names each ?N.
type params []any

func (p *params) add(v any) string {
	*p = append(*p, v)
	return "?" + strconv.Itoa(len(*p))
}

// usageQuery returns the query of q over sp and its arguments. The columns
// are those rollup.ScanUsage reads.
//
// Every value is a bound parameter, the JSON paths of the grouped
// dimensions included. A path is written $."name": the quotes make a name
// with '.' or '-' one member, and rollup.CheckUsage has made sure the name
// holds no '"' that could end the member early.
func usageQuery(q aggregator.UsageQuery, sp rollup.Span) (string, []any) {
	var p params
	var sb strings.Builder
	var tenant, filter string
	if q.Tenant != "" {
		tenant = p.add(q.Tenant)
		filter += ` AND tenant = ` + tenant
	}
	if q.Meter != "" {
		filter += ` AND meter = ` + p.add(q.Meter)
	}
	rollupFilter := filter
	if q.Tenant != "" && q.Meter == "" {
		// The primary key (tenant, meter, hour, dims_key) cannot narrow hour
		// without a meter: rather than every rollup row the tenant ever had,
		// read the hours of each of its meters, found by a seek per meter.
		fmt.Fprintf(&sb, `WITH RECURSIVE tenant_meters(meter) AS (
			SELECT (SELECT min(meter) FROM rollups_hourly WHERE tenant = %[1]s)
			UNION ALL
			SELECT (SELECT min(meter) FROM rollups_hourly WHERE tenant = %[1]s AND meter > m.meter)
			FROM tenant_meters AS m WHERE m.meter IS NOT NULL)
		`, tenant)
		rollupFilter += ` AND meter IN (SELECT meter FROM tenant_meters)`
	}
	sb.WriteString(`SELECT tenant, meter, bucket`)
	order := "1, 2, 3"
	for i, d := range q.GroupBy {
		// json_extract fails on '' (no dimensions): NULLIF makes that NULL.
		fmt.Fprintf(&sb, `, coalesce(json_extract(nullif(dims_key, ''), %s), '')`, p.add(`$."`+d+`"`))
		order += ", " + strconv.Itoa(4+i)
	}
	sb.WriteString(`, ` + sumParts + ` FROM (`)
	if !sp.Hours.Empty() {
		fmt.Fprintf(&sb, `
		SELECT tenant, meter, %s AS bucket, dims_key, value AS v, events AS n FROM rollups_hourly
		WHERE hour >= %s AND hour < %s%s`, bucket(q.Granularity, "hour"), p.add(sp.Hours.From), p.add(sp.Hours.To), rollupFilter)
	}
	if len(sp.Edges) > 0 {
		if !sp.Hours.Empty() {
			sb.WriteString(`
		UNION ALL`)
		}
		var conds []string
		for _, e := range sp.Edges {
			conds = append(conds, `time >= `+p.add(e.From)+` AND time < `+p.add(e.To))
		}
		// The edges are at most two partial hours: the time index bounds
		// the read to them, where the primary key (tenant, id) would read
		// all of a tenant's events ever (the planner's guess without it).
		fmt.Fprintf(&sb, `
		SELECT tenant, meter, %s AS bucket, dims_key, value AS v, 1 AS n FROM events INDEXED BY events_by_time
		WHERE (%s)%s`, bucket(q.Granularity, "time"), strings.Join(conds, " OR "), filter)
	}
	fmt.Fprintf(&sb, `
	) GROUP BY %s ORDER BY %s`, order, order)
	return sb.String(), p
}

// bucket returns the start of the bucket of g holding the Unix seconds of
// column col. Hours and days are whole multiples of their length since the
// epoch (UTC has no leap seconds in Unix time); months are calendar months.
func bucket(g aggregator.Granularity, col string) string {
	switch g {
	case aggregator.Hourly:
		return col + ` - ` + col + ` % 3600`
	case aggregator.Daily:
		return col + ` - ` + col + ` % 86400`
	}
	return `unixepoch(` + col + `, 'unixepoch', 'start of month')`
}
