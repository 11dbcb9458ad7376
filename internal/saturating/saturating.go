// Package saturating adds usage totals without ever wrapping: every sum of
// values in meterd (rollups, reports, the enforcer's usage, the stores'
// totals) goes through Add, or through Join for the sums a store computes in
// SQL, so an impossible total reads as the largest int64 instead of a
// negative number that would bill nothing or never block (docs/architecture.md#money-safety).
//
// Saturation is only reached by data no accepted input can produce: an
// event's value is at most schemas.MaxValue (2^32 − 1), so a total needs 2^31
// events of that value before it can reach 2^63. Below 2^63 every sum is
// exact; at or beyond it the total is Max, which compares above every limit
// (a tenant on a block plan is blocked) and which Saturated reports.
package saturating

import "math"

// Max is a saturated total: the true sum is at least this large.
const Max = math.MaxInt64

// Add returns a + b, clamped to [math.MinInt64, Max] when the true sum lies
// outside int64. Sums of non-negative values never come out negative.
func Add(a, b int64) int64 {
	s := a + b
	// Overflow iff a and b share a sign and s does not.
	if (a >= 0) == (b >= 0) && (s >= 0) != (a >= 0) {
		if a >= 0 {
			return Max
		}
		return math.MinInt64
	}
	return s
}

// Saturated reports whether total was clamped by Add or Join: it is Max (or,
// for sums that include corrections, math.MinInt64).
func Saturated(total int64) bool { return total == Max || total == math.MinInt64 }

// PartBits splits a value for summing in SQL, where sum() over Int64 wraps
// (ClickHouse) or fails the whole query with "integer overflow" (SQLite):
// the stores sum hi = v / 2^PartBits and lo = v % 2^PartBits (truncating
// division, as both databases do it, so v = hi·2^PartBits + lo exactly) and
// hand both sums to Join. Each part is below 2^32 in magnitude, so the sum of
// either over fewer than 2^31 rows cannot leave int64: exact, without floats.
const PartBits = 32

// PartDivisor is 2^PartBits, the divisor the stores write into their SQL.
const PartDivisor = 1 << PartBits

// Join returns hi·2^PartBits + lo, clamped as Add clamps: the total of the
// values whose parts summed to hi and lo.
func Join(hi, lo int64) int64 {
	// lo = q·2^32 + r with 0 <= r < 2^32 (arithmetic shift: floor).
	h := Add(hi, lo>>PartBits)
	r := lo & (PartDivisor - 1)
	switch {
	case h > Max>>PartBits: // h·2^32 >= 2^63
		return Max
	case h < math.MinInt64>>PartBits: // h·2^32 + r < -2^63
		return math.MinInt64
	}
	return h<<PartBits + r // in [-2^63, 2^63 − 1]: exact
}
