package saturating

import (
	"math"
	"math/big"
	"math/rand/v2"
	"testing"
)

func TestAdd(t *testing.T) {
	for _, tc := range []struct{ a, b, want int64 }{
		{1, 2, 3},
		{math.MaxInt64, 1, Max}, // the repro: it wrapped to math.MinInt64
		{math.MaxInt64 - 1, 1, math.MaxInt64},
		{Max, Max, Max},
		{Max, -1, Max - 1},
		{math.MinInt64, -1, math.MinInt64},
		{math.MinInt64, math.MaxInt64, -1},
		{-5, 3, -2},
	} {
		if got := Add(tc.a, tc.b); got != tc.want {
			t.Errorf("Add(%d, %d) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

// clamp is the oracle: the exact sum, clamped to int64.
func clamp(x *big.Int) int64 {
	if x.Cmp(big.NewInt(math.MaxInt64)) > 0 {
		return math.MaxInt64
	}
	if x.Cmp(big.NewInt(math.MinInt64)) < 0 {
		return math.MinInt64
	}
	return x.Int64()
}

// TestJoinMatchesExactSums splits values as the stores do in SQL (truncating
// division), sums the parts and checks Join against the exact sum, around
// every boundary.
func TestJoinMatchesExactSums(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	interesting := []int64{0, 1, -1, PartDivisor - 1, PartDivisor, -PartDivisor, math.MaxInt64, math.MaxInt64 - 1,
		math.MinInt64, math.MinInt64 + 1, 1 << 62, -(1 << 62), math.MaxUint32}
	pick := func() int64 {
		switch r.IntN(3) {
		case 0:
			return interesting[r.IntN(len(interesting))]
		case 1:
			return int64(r.Uint64()) // either sign
		}
		return r.Int64N(PartDivisor)
	}
	for range 20000 {
		var hi, lo int64
		exact := new(big.Int)
		for range 1 + r.IntN(5) {
			v := pick()
			hi += v / PartDivisor
			lo += v % PartDivisor
			exact.Add(exact, big.NewInt(v))
		}
		if got, want := Join(hi, lo), clamp(exact); got != want {
			t.Fatalf("Join(%d, %d) = %d, want %s clamped = %d", hi, lo, got, exact, want)
		}
	}
	// The repro in parts: 2^63 − 1 and 1.
	if got := Join(math.MaxInt64/PartDivisor, math.MaxInt64%PartDivisor+1); got != Max || !Saturated(got) {
		t.Errorf("Join of 2^63-1 and 1 = %d, want %d (saturated)", got, int64(Max))
	}
	if Saturated(math.MaxInt64 - 1) {
		t.Error("2^63 - 2 reads as saturated")
	}
}
