package clickhouse

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/rollup"
)

var _ aggregator.Reporter = (*Store)(nil)

// Usage implements aggregator.Reporter in one query: the whole hours of the
// range from rollups_hourly and its partial edges from events, bucketed,
// united, summed per (tenant, meter, bucket, dimensions) and sorted by the
// server, whose blocks reach fn row by row as they arrive.
func (s *Store) Usage(ctx context.Context, q aggregator.UsageQuery, fn func(*aggregator.UsageRow) error) error {
	return rollup.Usage("clickhouse", q, fn, func(sp rollup.Span) (rollup.UsageRows, error) {
		query, args := usageQuery(s.tables, q, sp)
		ctx, cancel := context.WithCancel(ctx)
		rows, err := s.read.Query(ctx, query, args...)
		if err != nil {
			cancel()
			return nil, err
		}
		return cancelRows{rows, cancel}, nil
	})
}

// cancelRows cancels its query before it closes: Close reads the rest of
// the result, which a caller that stopped early does not want.
type cancelRows struct {
	driver.Rows
	cancel context.CancelFunc
}

func (r cancelRows) Close() error {
	r.cancel()
	return r.Rows.Close()
}

// usageQuery returns the query of q over sp and its arguments, bound by
// clickhouse-go in the order of the placeholders. The columns are those
// rollup.ScanUsage reads.
//
// Every value is an argument, the names of the grouped dimensions included:
// the driver writes each as a quoted literal, which is what
// visitParamExtractString needs (its name must be a constant). The name is
// searched for as "name": in the canonical dims_key, where an unescaped
// quote followed by ':' can only close a key, so only the dimension of that
// name matches, never text inside a value or a longer key; a missing one
// reads as "". rollup.CheckUsage has made sure the name holds no quote or
// backslash, which the search would take literally.
func usageQuery(tables readTables, q aggregator.UsageQuery, sp rollup.Span) (string, []any) {
	var args []any
	var sb strings.Builder
	sb.WriteString(`SELECT tenant, meter, bucket`)
	order := "tenant, meter, bucket"
	for i, d := range q.GroupBy {
		fmt.Fprintf(&sb, `, visitParamExtractString(dims_key, ?) AS d%d`, i)
		order += fmt.Sprintf(", d%d", i)
		args = append(args, d)
	}
	sb.WriteString(`, ` + sumParts + ` FROM (`)
	filter := func() string {
		var f string
		if q.Tenant != "" {
			f += ` AND tenant = ?`
			args = append(args, q.Tenant)
		}
		if q.Meter != "" {
			f += ` AND meter = ?`
			args = append(args, q.Meter)
		}
		return f
	}
	if !sp.Hours.Empty() {
		fmt.Fprintf(&sb, `
		SELECT tenant, meter, %s AS bucket, dims_key, value AS v, events AS n FROM %s
		WHERE hour >= toDateTime(?) AND hour < toDateTime(?)`, bucket(q.Granularity, "hour"), tables.rollups)
		args = append(args, sp.Hours.From, sp.Hours.To)
		sb.WriteString(filter())
	}
	if len(sp.Edges) > 0 {
		if !sp.Hours.Empty() {
			sb.WriteString(`
		UNION ALL`)
		}
		var conds []string
		for _, e := range sp.Edges {
			conds = append(conds, `time >= toDateTime(?) AND time < toDateTime(?)`)
			args = append(args, e.From, e.To)
		}
		fmt.Fprintf(&sb, `
		SELECT tenant, meter, %s AS bucket, dims_key, value AS v, toInt64(1) AS n FROM %s
		WHERE (%s)`, bucket(q.Granularity, "time"), tables.events, strings.Join(conds, " OR "))
		sb.WriteString(filter())
	}
	fmt.Fprintf(&sb, `
	) GROUP BY %s HAVING %s ORDER BY %s`, order, partsNonZero, order)
	return sb.String(), args
}

// lastMonth is the start of the last month a DateTime holds, 2106-02-01.
var lastMonth = time.Date(2106, 2, 1, 0, 0, 0, 0, time.UTC).Unix()

// bucket returns the start of the bucket of g holding the DateTime column
// col, as Unix seconds (Int64). Hours and days are whole multiples of their
// length since the epoch, computed without the server's date tables; months
// are calendar months. The date tables of 18.16 end on 2106-02-07 (later
// times give 1970 or zero), so the last month is set apart.
func bucket(g aggregator.Granularity, col string) string {
	switch g {
	case aggregator.Hourly:
		return `toInt64(intDiv(toUInt32(` + col + `), 3600) * 3600)`
	case aggregator.Daily:
		return `toInt64(intDiv(toUInt32(` + col + `), 86400) * 86400)`
	}
	return fmt.Sprintf(`toInt64(if(toUInt32(%s) >= %d, %d, toUInt32(toStartOfMonth(%s, 'UTC')) * 86400))`, col, lastMonth, lastMonth, col)
}
