package catalog

import (
	"fmt"
	"time"
)

// Cadence is how often a billing period repeats.
type Cadence string

// The cadences of docs/architecture.md#plans-and-billing-periods.
const (
	Daily   Cadence = "daily"
	Monthly Cadence = "monthly"
	Yearly  Cadence = "yearly"
)

func (c Cadence) valid() bool { return c == Daily || c == Monthly || c == Yearly }

// Period is one billing period, the half-open interval [Start, End) in UTC.
// Compare periods with Start.Equal and End.Equal: a Period also remembers the
// cadence and anchor that made it, for Next.
type Period struct {
	Start, End time.Time

	sched schedule
}

// schedule is what Next needs to go on from a period: the cadence and the
// anchor's month and day, reduced so that equal schedules compare equal.
type schedule struct {
	cadence Cadence
	month   time.Month // yearly only
	day     int        // monthly and yearly
}

// PeriodAt returns the period of cadence c anchored at anchor that contains
// at. Everything is computed in UTC and periods start at 00:00 UTC; only the
// anchor's UTC date matters, not its time of day.
//
// Daily periods are UTC days. Monthly periods start on the anchor's day of the
// month, or on the month's last day when the month is shorter: an anchor on
// the 31st gives Jan 31, Feb 28 (29), Mar 31, Apr 30, May 31. Yearly periods
// start on the anchor's month and day, Feb 29 becoming Feb 28 in common years.
// A zero anchor means the 1st of the month (monthly) or Jan 1 (yearly).
//
// PeriodAt panics if c is not Daily, Monthly or Yearly; NewCatalog and
// ParseCatalog guarantee that for every plan.
func PeriodAt(c Cadence, anchor time.Time, at time.Time) Period {
	s := schedule{cadence: c}
	switch c {
	case Daily:
	case Monthly:
		// The zero time is 0001-01-01 UTC, so a zero anchor is the 1st
		// (and Jan 1) without a special case.
		_, _, s.day = anchor.UTC().Date()
	case Yearly:
		_, s.month, s.day = anchor.UTC().Date()
	default:
		panic(fmt.Sprintf("catalog: unknown cadence %q", string(c)))
	}
	return s.at(at)
}

// Next returns the period that follows p: PeriodAt(c, anchor, p.End) for the
// cadence and anchor that made p. It panics if p was not made by PeriodAt,
// Periods or Next (a Period literal knows no cadence).
func (p Period) Next() Period {
	if p.sched.cadence == "" {
		panic("catalog: Next of a Period not made by PeriodAt")
	}
	return p.sched.at(p.End)
}

// Contains reports whether t lies in [p.Start, p.End).
func (p Period) Contains(t time.Time) bool {
	return !t.Before(p.Start) && t.Before(p.End)
}

// String formats p as [start, end) in RFC 3339.
func (p Period) String() string {
	return "[" + p.Start.Format(time.RFC3339) + ", " + p.End.Format(time.RFC3339) + ")"
}

// Periods returns, in order, the periods of cadence c anchored at anchor that
// overlap [from, to); none when from is not before to. The caller bounds the
// range: a daily cadence over a century is 36 525 periods.
func Periods(c Cadence, anchor, from, to time.Time) []Period {
	if !from.Before(to) {
		return nil
	}
	var ps []Period
	for p := PeriodAt(c, anchor, from); p.Start.Before(to); p = p.Next() {
		ps = append(ps, p)
	}
	return ps
}

func (s schedule) at(t time.Time) Period {
	y, m, d := t.UTC().Date()
	p := Period{sched: s}
	// A monthly (yearly) period starts on the anchor day of t's month
	// (year), or of the one before when t is earlier than that day.
	// time.Date normalizes month 0 and 13 to the neighbouring years.
	switch s.cadence {
	case Daily:
		p.Start = time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
		p.End = p.Start.AddDate(0, 0, 1)
	case Monthly:
		p.Start, p.End = dayIn(y, m, s.day), dayIn(y, m+1, s.day)
		if t.Before(p.Start) {
			p.Start, p.End = dayIn(y, m-1, s.day), p.Start
		}
	case Yearly:
		p.Start, p.End = dayIn(y, s.month, s.day), dayIn(y+1, s.month, s.day)
		if t.Before(p.Start) {
			p.Start, p.End = dayIn(y-1, s.month, s.day), p.Start
		}
	}
	return p
}

// dayIn returns 00:00 UTC on day of month m of year y, or on the month's last
// day when it is shorter. Clamping each month afresh from the anchor's day,
// never from the previous period's start, keeps the day from drifting.
func dayIn(y int, m time.Month, day int) time.Time {
	if last := time.Date(y, m+1, 0, 0, 0, 0, 0, time.UTC).Day(); day > last {
		day = last
	}
	return time.Date(y, m, day, 0, 0, 0, 0, time.UTC)
}
