package catalog

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

// ts parses a date (midnight UTC) or an RFC 3339 time; "" is the zero time.
func ts(t testing.TB, s string) time.Time {
	t.Helper()
	if s == "" {
		return time.Time{}
	}
	layout := time.RFC3339Nano
	if len(s) == len(time.DateOnly) {
		layout = time.DateOnly
	}
	v, err := time.Parse(layout, s)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

const beforeMidnight = "T23:59:59.999999999Z" // the last instant of a UTC day

func TestPeriodAt(t *testing.T) {
	tests := []struct {
		name       string
		c          Cadence
		anchor, at string
		start, end string
	}{
		// Monthly, an ordinary anchor.
		{"monthly mid period", Monthly, "2026-01-15", "2026-11-20T08:00:00Z", "2026-11-15", "2026-12-15"},
		{"monthly at start", Monthly, "2026-01-15", "2026-11-15T00:00:00Z", "2026-11-15", "2026-12-15"},
		{"monthly ns before start", Monthly, "2026-01-15", "2026-11-14" + beforeMidnight, "2026-10-15", "2026-11-15"},
		{"monthly across new year", Monthly, "2026-01-15", "2026-01-10T00:00:00Z", "2025-12-15", "2026-01-15"},
		{"monthly anchor time of day ignored", Monthly, "2026-01-15T18:00:00Z", "2026-02-15T01:00:00Z", "2026-02-15", "2026-03-15"},
		{"monthly anchor in UTC", Monthly, "2026-01-15T23:30:00-05:00", "2026-03-16T00:00:00Z", "2026-03-16", "2026-04-16"},
		{"monthly anchor in UTC before", Monthly, "2026-01-15T23:30:00-05:00", "2026-03-15T23:59:59Z", "2026-02-16", "2026-03-16"},
		{"monthly at in UTC", Monthly, "", "2026-12-01T01:00:00+02:00", "2026-11-01", "2026-12-01"},
		// A zero anchor is the 1st.
		{"zero anchor", Monthly, "", "2026-11-30" + beforeMidnight, "2026-11-01", "2026-12-01"},
		{"zero anchor at start", Monthly, "", "2026-12-01T00:00:00Z", "2026-12-01", "2027-01-01"},
		{"anchor on the 1st", Monthly, "2025-07-01", "2026-02-28T12:00:00Z", "2026-02-01", "2026-03-01"},
		// Anchor 31: clamped to each short month, back to 31 after.
		{"31 in Feb", Monthly, "2026-01-31", "2025-02-10T00:00:00Z", "2025-01-31", "2025-02-28"},
		{"31 ns before Feb 28", Monthly, "2026-01-31", "2025-02-27" + beforeMidnight, "2025-01-31", "2025-02-28"},
		{"31 at Feb 28", Monthly, "2026-01-31", "2025-02-28T00:00:00Z", "2025-02-28", "2025-03-31"},
		{"31 leap Feb 28", Monthly, "2026-01-31", "2024-02-28T12:00:00Z", "2024-01-31", "2024-02-29"},
		{"31 leap Feb 29", Monthly, "2026-01-31", "2024-02-29T12:00:00Z", "2024-02-29", "2024-03-31"},
		{"31 at Apr 30", Monthly, "2026-01-31", "2026-04-30T00:00:00Z", "2026-04-30", "2026-05-31"},
		{"31 ns before May 31", Monthly, "2026-01-31", "2026-05-30" + beforeMidnight, "2026-04-30", "2026-05-31"},
		{"31 at May 31", Monthly, "2026-01-31", "2026-05-31T00:00:00Z", "2026-05-31", "2026-06-30"},
		{"31 Dec to Jan", Monthly, "2026-01-31", "2026-01-01T00:00:00Z", "2025-12-31", "2026-01-31"},
		{"31 at Dec 31", Monthly, "2026-01-31", "2025-12-31T00:00:00Z", "2025-12-31", "2026-01-31"},
		{"31 Jul to Aug", Monthly, "2026-01-31", "2026-08-15T00:00:00Z", "2026-07-31", "2026-08-31"},
		// Anchors 30, 29, 28.
		{"30 at Feb 28", Monthly, "2026-01-30", "2025-02-28T00:00:00Z", "2025-02-28", "2025-03-30"},
		{"30 ns before Mar 30", Monthly, "2026-01-30", "2025-03-29" + beforeMidnight, "2025-02-28", "2025-03-30"},
		{"30 leap Feb 29", Monthly, "2026-01-30", "2024-02-29T00:00:00Z", "2024-02-29", "2024-03-30"},
		{"30 leap 2028", Monthly, "2026-01-30", "2028-02-29T00:00:00Z", "2028-02-29", "2028-03-30"},
		{"29 at Feb 28", Monthly, "2026-01-29", "2025-02-28T00:00:00Z", "2025-02-28", "2025-03-29"},
		{"29 ns before Feb 28", Monthly, "2026-01-29", "2025-02-27" + beforeMidnight, "2025-01-29", "2025-02-28"},
		{"29 leap Feb 28", Monthly, "2026-01-29", "2024-02-28T00:00:00Z", "2024-01-29", "2024-02-29"},
		{"29 leap Feb 29", Monthly, "2026-01-29", "2024-02-29T00:00:00Z", "2024-02-29", "2024-03-29"},
		{"28 at Feb 28", Monthly, "2026-01-28", "2025-02-28T00:00:00Z", "2025-02-28", "2025-03-28"},
		{"28 leap Feb 29", Monthly, "2026-01-28", "2024-02-29T00:00:00Z", "2024-02-28", "2024-03-28"},
		{"28 ns before Feb 28", Monthly, "2026-01-28", "2025-02-27" + beforeMidnight, "2025-01-28", "2025-02-28"},
		// 2100 is not a leap year, 2000 is.
		{"29 in 2100", Monthly, "2026-01-29", "2100-02-28T00:00:00Z", "2100-02-28", "2100-03-29"},
		{"31 in 2100", Monthly, "2026-01-31", "2100-03-01T00:00:00Z", "2100-02-28", "2100-03-31"},
		{"31 in 2000", Monthly, "2026-01-31", "2000-02-29" + beforeMidnight, "2000-02-29", "2000-03-31"},
		{"31 in 2000 Feb 28", Monthly, "2026-01-31", "2000-02-28T00:00:00Z", "2000-01-31", "2000-02-29"},

		// Yearly.
		{"yearly mid period", Yearly, "2026-01-15", "2026-06-01T00:00:00Z", "2026-01-15", "2027-01-15"},
		{"yearly at start", Yearly, "2026-01-15", "2026-01-15T00:00:00Z", "2026-01-15", "2027-01-15"},
		{"yearly ns before start", Yearly, "2026-01-15", "2026-01-14" + beforeMidnight, "2025-01-15", "2026-01-15"},
		{"yearly zero anchor", Yearly, "", "2026-12-31" + beforeMidnight, "2026-01-01", "2027-01-01"},
		{"yearly zero anchor at start", Yearly, "", "2027-01-01T00:00:00Z", "2027-01-01", "2028-01-01"},
		{"yearly Dec 31", Yearly, "2025-12-31", "2026-12-30T00:00:00Z", "2025-12-31", "2026-12-31"},
		{"Feb 29 in a common year", Yearly, "2024-02-29", "2025-03-01T00:00:00Z", "2025-02-28", "2026-02-28"},
		{"Feb 29 before a leap year", Yearly, "2024-02-29", "2027-06-01T00:00:00Z", "2027-02-28", "2028-02-29"},
		{"Feb 29 ns before leap day", Yearly, "2024-02-29", "2028-02-28" + beforeMidnight, "2027-02-28", "2028-02-29"},
		{"Feb 29 at leap day", Yearly, "2024-02-29", "2028-02-29T00:00:00Z", "2028-02-29", "2029-02-28"},
		{"Feb 29 in 2100", Yearly, "2096-02-29", "2100-02-28T00:00:00Z", "2100-02-28", "2101-02-28"},
		{"Feb 29 before 2100", Yearly, "2096-02-29", "2100-02-27T00:00:00Z", "2099-02-28", "2100-02-28"},
		{"Feb 29 in 2000", Yearly, "1996-02-29", "2000-03-01T00:00:00Z", "2000-02-29", "2001-02-28"},
		{"Feb 28 anchor in leap year", Yearly, "2025-02-28", "2024-02-29T00:00:00Z", "2024-02-28", "2025-02-28"},

		// Daily: UTC days, whatever the anchor.
		{"daily", Daily, "2026-01-15T10:00:00Z", "2026-03-08T12:00:00Z", "2026-03-08", "2026-03-09"},
		{"daily ns before midnight", Daily, "", "2024-02-28" + beforeMidnight, "2024-02-28", "2024-02-29"},
		{"daily leap day", Daily, "", "2024-02-29T00:00:00Z", "2024-02-29", "2024-03-01"},
		{"daily 2100", Daily, "", "2100-02-28T05:00:00Z", "2100-02-28", "2100-03-01"},
		{"daily at in UTC", Daily, "", "2025-12-31T23:00:00-05:00", "2026-01-01", "2026-01-02"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := PeriodAt(tt.c, ts(t, tt.anchor), ts(t, tt.at))
			want := fmt.Sprintf("[%sT00:00:00Z, %sT00:00:00Z)", tt.start, tt.end)
			if p.String() != want {
				t.Errorf("PeriodAt(%s, %s, %s) = %s, want %s", tt.c, tt.anchor, tt.at, p, want)
			}
			if p.Start.Location() != time.UTC || p.End.Location() != time.UTC {
				t.Errorf("period %s is not in UTC", p)
			}
		})
	}
}

func TestPeriodNext(t *testing.T) {
	tests := []struct {
		name   string
		c      Cadence
		anchor string
		starts []string // from the period at the first start on
	}{
		{"monthly 31 never drifts", Monthly, "2023-10-31", []string{
			"2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30", "2024-05-31", "2024-06-30",
			"2024-07-31", "2024-08-31", "2024-09-30", "2024-10-31", "2024-11-30", "2024-12-31",
			"2025-01-31", "2025-02-28", "2025-03-31",
		}},
		{"monthly 30", Monthly, "2023-11-30", []string{"2025-01-30", "2025-02-28", "2025-03-30", "2025-04-30"}},
		{"yearly Feb 29", Yearly, "2024-02-29", []string{
			"2024-02-29", "2025-02-28", "2026-02-28", "2027-02-28", "2028-02-29", "2029-02-28",
		}},
		{"yearly Feb 29 across 2100", Yearly, "2096-02-29", []string{
			"2096-02-29", "2097-02-28", "2098-02-28", "2099-02-28", "2100-02-28", "2101-02-28",
			"2102-02-28", "2103-02-28", "2104-02-29",
		}},
		{"daily across leap day", Daily, "", []string{"2028-02-28", "2028-02-29", "2028-03-01"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			anchor := ts(t, tt.anchor)
			p := PeriodAt(tt.c, anchor, ts(t, tt.starts[0]))
			for i, s := range tt.starts {
				if !p.Start.Equal(ts(t, s)) {
					t.Fatalf("period %d = %s, want it to start on %s", i, p, s)
				}
				next := p.Next()
				if at := PeriodAt(tt.c, anchor, p.End); !next.Start.Equal(at.Start) || !next.End.Equal(at.End) {
					t.Fatalf("%s.Next() = %s, PeriodAt(End) = %s", p, next, at)
				}
				p = next
			}
		})
	}
}

func TestPeriods(t *testing.T) {
	tests := []struct {
		name     string
		c        Cadence
		anchor   string
		from, to string
		want     string // the periods' String()s, joined by " "
	}{
		{"to on a boundary excluded", Monthly, "2026-01-15", "2026-01-20T00:00:00Z", "2026-04-15T00:00:00Z",
			"[2026-01-15T00:00:00Z, 2026-02-15T00:00:00Z) [2026-02-15T00:00:00Z, 2026-03-15T00:00:00Z) [2026-03-15T00:00:00Z, 2026-04-15T00:00:00Z)"},
		{"to a ns past a boundary", Monthly, "2026-01-15", "2026-03-14" + beforeMidnight, "2026-04-15T00:00:00.000000001Z",
			"[2026-02-15T00:00:00Z, 2026-03-15T00:00:00Z) [2026-03-15T00:00:00Z, 2026-04-15T00:00:00Z) [2026-04-15T00:00:00Z, 2026-05-15T00:00:00Z)"},
		{"from on a boundary", Monthly, "", "2026-03-01T00:00:00Z", "2026-03-02T00:00:00Z",
			"[2026-03-01T00:00:00Z, 2026-04-01T00:00:00Z)"},
		{"monthly 31 over Feb", Monthly, "2026-01-31", "2025-01-31T00:00:00Z", "2025-04-01T00:00:00Z",
			"[2025-01-31T00:00:00Z, 2025-02-28T00:00:00Z) [2025-02-28T00:00:00Z, 2025-03-31T00:00:00Z) [2025-03-31T00:00:00Z, 2025-04-30T00:00:00Z)"},
		{"yearly", Yearly, "2024-02-29", "2024-03-01T00:00:00Z", "2026-01-01T00:00:00Z",
			"[2024-02-29T00:00:00Z, 2025-02-28T00:00:00Z) [2025-02-28T00:00:00Z, 2026-02-28T00:00:00Z)"},
		{"daily", Daily, "", "2026-03-01T12:00:00Z", "2026-03-03T00:00:00Z",
			"[2026-03-01T00:00:00Z, 2026-03-02T00:00:00Z) [2026-03-02T00:00:00Z, 2026-03-03T00:00:00Z)"},
		{"empty range", Monthly, "", "2026-03-01T00:00:00Z", "2026-03-01T00:00:00Z", ""},
		{"reversed range", Monthly, "", "2026-04-01T00:00:00Z", "2026-03-01T00:00:00Z", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, p := range Periods(tt.c, ts(t, tt.anchor), ts(t, tt.from), ts(t, tt.to)) {
				got = append(got, p.String())
			}
			if g := strings.Join(got, " "); g != tt.want {
				t.Errorf("Periods = %s\nwant       %s", g, tt.want)
			}
		})
	}
}

func TestPeriodPanics(t *testing.T) {
	for name, f := range map[string]func(){
		"unknown cadence": func() { PeriodAt("weekly", time.Time{}, time.Now()) },
		"empty cadence":   func() { PeriodAt("", time.Time{}, time.Now()) },
		"literal Next":    func() { Period{Start: time.Now(), End: time.Now().Add(time.Hour)}.Next() },
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				if r := recover(); r == nil || !strings.HasPrefix(fmt.Sprint(r), "catalog: ") {
					t.Errorf("recovered %v, want a billing panic", r)
				}
			}()
			f()
		})
	}
}

// daysIn is the length of a month by the Gregorian rules, independent of the
// time package that the code under test uses.
func daysIn(y int, m time.Month) int {
	switch m {
	case time.February:
		if y%4 == 0 && (y%100 != 0 || y%400 == 0) {
			return 29
		}
		return 28
	case time.April, time.June, time.September, time.November:
		return 30
	}
	return 31
}

// TestPeriodAtProperties checks random anchors and instants over 2020–2032:
// the period holds at, starts at midnight UTC on the anchor's (clamped) day,
// is as long as its cadence allows, and the next one starts where it ends.
func TestPeriodAtProperties(t *testing.T) {
	rng := rand.New(rand.NewPCG(2026, 1))
	lo := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	hi := time.Date(2033, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	random := func() time.Time { return time.Unix(0, lo+rng.Int64N(hi-lo)) }
	zones := []*time.Location{time.UTC, time.FixedZone("-05", -5*3600), time.FixedZone("+14", 14*3600)}
	const day = 24 * time.Hour
	bounds := map[Cadence][2]time.Duration{
		Daily: {day, day}, Monthly: {28 * day, 31 * day}, Yearly: {365 * day, 366 * day},
	}
	n := 20000
	if testing.Short() {
		n = 2000
	}
	for _, c := range []Cadence{Daily, Monthly, Yearly} {
		for range n {
			anchor := random().In(zones[rng.IntN(len(zones))])
			if rng.IntN(10) == 0 {
				anchor = time.Time{}
			}
			// Sometimes exactly on, or a nanosecond before, a boundary.
			at := random().In(zones[rng.IntN(len(zones))])
			switch rng.IntN(4) {
			case 0:
				at = PeriodAt(c, anchor, at).Start
			case 1:
				at = PeriodAt(c, anchor, at).Start.Add(-1)
			}
			p := PeriodAt(c, anchor, at)
			fail := func(format string, args ...any) {
				t.Helper()
				t.Fatalf("PeriodAt(%s, %s, %s) = %s: "+format,
					append([]any{c, anchor.Format(time.RFC3339Nano), at.Format(time.RFC3339Nano), p}, args...)...)
			}
			if !p.Contains(at) || p.Start.After(at) || !at.Before(p.End) {
				fail("does not contain at")
			}
			if l := p.End.Sub(p.Start); l < bounds[c][0] || l > bounds[c][1] {
				fail("lasts %s", l)
			}
			for _, b := range []time.Time{p.Start, p.End} {
				if b.Location() != time.UTC || b.Hour()+b.Minute()+b.Second()+b.Nanosecond() != 0 {
					fail("bound %s is not midnight UTC", b)
				}
			}
			if c != Daily {
				_, am, ad := anchor.UTC().Date()
				if y, m, d := p.Start.Date(); d != min(ad, daysIn(y, m)) || c == Yearly && m != am {
					fail("starts on the wrong day for anchor day %d month %s", ad, am)
				}
			}
			next := PeriodAt(c, anchor, p.End)
			if !next.Start.Equal(p.End) {
				fail("next period %s does not start at its end", next)
			}
			if pn := p.Next(); !pn.Start.Equal(next.Start) || !pn.End.Equal(next.End) {
				fail("Next() = %s, PeriodAt(End) = %s", pn, next)
			}
			if last := PeriodAt(c, anchor, p.End.Add(-1)); !last.Start.Equal(p.Start) || !last.End.Equal(p.End) {
				fail("its last nanosecond is in %s", last)
			}
		}
	}
}

func ExamplePeriodAt() {
	anchor := time.Date(2026, time.January, 31, 0, 0, 0, 0, time.UTC)
	p := PeriodAt(Monthly, anchor, time.Date(2026, time.February, 10, 12, 0, 0, 0, time.UTC))
	for range 4 {
		fmt.Println(p)
		p = p.Next()
	}
	// Output:
	// [2026-01-31T00:00:00Z, 2026-02-28T00:00:00Z)
	// [2026-02-28T00:00:00Z, 2026-03-31T00:00:00Z)
	// [2026-03-31T00:00:00Z, 2026-04-30T00:00:00Z)
	// [2026-04-30T00:00:00Z, 2026-05-31T00:00:00Z)
}

func BenchmarkPeriodAt(b *testing.B) {
	anchor := time.Date(2026, time.January, 31, 0, 0, 0, 0, time.UTC)
	at := time.Date(2026, time.March, 10, 12, 0, 0, 0, time.UTC)
	for _, c := range []Cadence{Daily, Monthly, Yearly} {
		b.Run(string(c), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				PeriodAt(c, anchor, at)
			}
		})
	}
}

// ParseAnchor is the one reading of billing_anchor, for the file and the
// admin API alike.
func TestParseAnchor(t *testing.T) {
	for _, c := range []struct {
		in   string
		want time.Time
		bad  bool
	}{
		{in: "", want: time.Time{}},
		{in: "2026-01-15", want: time.Date(2026, 1, 15, 0, 0, 0, 0, time.UTC)},
		{in: "2026-01-15T10:30:00+02:00", want: time.Date(2026, 1, 15, 8, 30, 0, 0, time.UTC)},
		{in: "15/01/2026", bad: true},
		{in: "2026-02-30", bad: true},
	} {
		got, err := ParseAnchor(c.in)
		if c.bad {
			if want := `must be a date (2026-01-15) or an RFC 3339 time, not "` + c.in + `"`; err == nil || err.Error() != want {
				t.Errorf("ParseAnchor(%q): err %v, want %q", c.in, err, want)
			}
			continue
		}
		if err != nil || !got.Equal(c.want) {
			t.Errorf("ParseAnchor(%q) = %v, %v; want %v", c.in, got, err, c.want)
		}
	}
}
