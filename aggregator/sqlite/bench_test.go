package sqlite

import (
	"testing"

	"github.com/meterd/meterd/aggregator/storetest"
)

func BenchmarkApply(b *testing.B) {
	storetest.BenchmarkApply(b, newStore(b))
}

// monthStore returns a store holding the monthly-total data set, filled into
// the rollups in one statement (about 2.2 million rows, inserted in key
// order).
func monthStore(b *testing.B) *Store {
	s := newStore(b)
	_, err := s.db.ExecContext(b.Context(), `
		WITH RECURSIVE seq(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM seq WHERE x + 1 < ?1),
		rows(n) AS (SELECT (x % 744) * 3000 + (x / 744 % 3) * 1000 + x / 2232 FROM seq),
		sized(n, e) AS (SELECT n, CASE WHEN n < ?2 THEN 5 ELSE 4 END FROM rows)
		INSERT INTO rollups_hourly (tenant, meter, hour, dims_key, value, events)
		SELECT 'tenant-' || (n % 1000), CASE n / 1000 % 3 WHEN 0 THEN 'api_calls' WHEN 1 THEN 'tokens' ELSE 'bytes_out' END,
			?3 + n / 3000 * 3600,
			'{"method":"' || CASE n / 3000 % 2 WHEN 0 THEN 'GET' ELSE 'POST' END || '","route":"/v1/r' || (n / 3000 % 5) || '"}',
			3 * e, e
		FROM sized ORDER BY 1, 2, 3`, storetest.MonthRows, storetest.MonthFiveEventRows, storetest.MonthStart)
	if err != nil {
		b.Fatal(err)
	}
	storetest.CheckMonthEvents(b, s)
	return s
}

// BenchmarkMonthlyTotal measures one total over the monthly-total data set.
func BenchmarkMonthlyTotal(b *testing.B) {
	s := monthStore(b)
	b.Run("tenant_month", func(b *testing.B) { storetest.BenchmarkMonthlyTotal(b, s) })
}

// BenchmarkReport measures one tenant's reports over the monthly-total data
// set.
func BenchmarkReport(b *testing.B) {
	storetest.BenchmarkReports(b, monthStore(b))
}
