package clickhouse

import (
	"fmt"
	"testing"

	"github.com/meterd/meterd/aggregator/storetest"
	"github.com/meterd/meterd/internal/chtest"
)

func BenchmarkApply(b *testing.B) {
	storetest.BenchmarkApply(b, newStore(b, chtest.DSN(b)))
}

// BenchmarkMonthlyTotal fills the rollups with the monthly-total data set
// (about 2.2 million rows) in 8 inserts, leaving parts unmerged as a live
// month has them, and then measures one total.
func BenchmarkMonthlyTotal(b *testing.B) {
	s := newStore(b, chtest.DSN(b))
	const chunks = 8
	for i := range chunks {
		from, n := i*storetest.MonthRows/chunks, storetest.MonthRows/chunks
		err := s.conn.Exec(b.Context(), fmt.Sprintf(`
			INSERT INTO rollups_hourly (tenant, meter, hour, dims_key, value, events)
			SELECT concat('tenant-', toString(number %% 1000)), ['api_calls', 'tokens', 'bytes_out'][intDiv(number, 1000) %% 3 + 1],
				toDateTime(%d + intDiv(number, 3000) * 3600), '', 3 * e, e
			FROM (SELECT number, toInt64(if(number < %d, 5, 4)) AS e FROM system.numbers WHERE number >= %d LIMIT %d)`,
			storetest.MonthStart, storetest.MonthFiveEventRows, from, n))
		if err != nil {
			b.Fatal(err)
		}
	}
	storetest.CheckMonthEvents(b, s)
	b.Run("tenant_month", func(b *testing.B) { storetest.BenchmarkMonthlyTotal(b, s) })
}
