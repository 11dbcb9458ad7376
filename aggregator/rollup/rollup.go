// Package rollup holds what every aggregator.Store computes the same way, so
// that the stores give the same totals and reports for the same input: which
// events may be stored, the canonical dimensions key, the second and hour of
// an event, how a time range splits into whole hours and partial edges, and
// how events sum into hourly rollup rows and increments.
package rollup

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/internal/saturating"
	"github.com/meterd/meterd/schemas"
)

// HourSeconds is the length of a rollup bucket.
const HourSeconds = 3600

var (
	minSecond = aggregator.MinEventTime.Unix()
	maxSecond = aggregator.MaxEventTime.Unix() // exclusive
)

// Check returns an error wrapping aggregator.ErrInvalidEvent for the first
// event of batches that breaks a rule of schemas.Event or lies outside the
// storable time range, and for a nil batch.
func Check(batches []*schemas.Batch) error {
	var errs []schemas.FieldError
	for bi, b := range batches {
		if b == nil {
			return fmt.Errorf("%w: batch %d is nil", aggregator.ErrInvalidEvent, bi)
		}
		for i := range b.Events {
			e := &b.Events[i]
			if errs = e.Validate(i, schemas.Window{}, errs[:0]); len(errs) > 0 {
				return fmt.Errorf("%w: batch %s: %v", aggregator.ErrInvalidEvent, b.ID, errs[0])
			}
			if s := e.Time.Unix(); s < minSecond || s >= maxSecond {
				return fmt.Errorf("%w: batch %s: event %d: time %s is outside [%s, %s)", aggregator.ErrInvalidEvent,
					b.ID, i, e.Time.Format(time.RFC3339), aggregator.MinEventTime.Format(time.RFC3339), aggregator.MaxEventTime.Format(time.RFC3339))
			}
		}
	}
	return nil
}

// EventID is the idempotency key of an event.
type EventID struct{ Tenant, ID string }

// Key identifies a rollup row: Tenant's Meter in the hour starting at Hour
// (Unix seconds) for events with the dimensions encoded as Dims (DimsKey).
type Key struct {
	Tenant, Meter string
	Hour          int64
	Dims          string
}

// Sum is the content of a rollup row.
type Sum struct{ Value, Events int64 }

// Plus returns s + o, each sum saturating (internal/saturating).
func (s Sum) Plus(o Sum) Sum {
	return Sum{Value: saturating.Add(s.Value, o.Value), Events: saturating.Add(s.Events, o.Events)}
}

// Parts are the sums a store's query selects for a group of rows: of the
// values and of the event counts, each split into its high and low parts
// (v / 2^32 and v % 2^32, internal/saturating.PartBits), so that neither
// sum can overflow in the database whatever the rows hold.
type Parts struct{ ValueHi, ValueLo, EventsHi, EventsLo int64 }

// Dest returns the scan destinations of the four sums, in that order.
func (p *Parts) Dest() []any { return []any{&p.ValueHi, &p.ValueLo, &p.EventsHi, &p.EventsLo} }

// Sum returns the sums the parts make up, saturated where they lie beyond
// int64 and exact everywhere else.
func (p Parts) Sum() Sum {
	return Sum{Value: saturating.Join(p.ValueHi, p.ValueLo), Events: saturating.Join(p.EventsHi, p.EventsLo)}
}

// Scanner is a query's result as both stores' drivers give it
// (database/sql's Rows, clickhouse-go's driver.Rows).
type Scanner interface {
	Next() bool
	Scan(dest ...any) error
	Err() error
}

// ScanIncrements reads rows of tenant, meter and the Parts of their sums and
// returns the sums that are not zero as increments of the hour from.
func ScanIncrements(rows Scanner, from time.Time) ([]aggregator.Increment, error) {
	var out []aggregator.Increment
	var parts Parts
	inc := aggregator.Increment{Hour: from}
	dest := append([]any{&inc.Tenant, &inc.Meter}, parts.Dest()...)
	for rows.Next() {
		if err := rows.Scan(dest...); err != nil {
			return nil, err
		}
		if sum := parts.Sum(); sum != (Sum{}) {
			inc.Value, inc.Events = sum.Value, sum.Events
			out = append(out, inc)
		}
	}
	return out, rows.Err()
}

// SumsFunc runs a store's query of the sums per tenant and meter of
// [from, to), narrowed to tenant and to meter where they are not empty, and
// returns those that are not zero as increments of the hour from
// (ScanIncrements).
type SumsFunc func(ctx context.Context, from, to time.Time, tenant, meter string) ([]aggregator.Increment, error)

// Totaler is aggregator.Store's Total, Totals and TenantTotals over a
// store's SumsFunc, so that both stores answer them alike; a store embeds
// it.
type Totaler struct {
	store string // prefixes errors
	sums  SumsFunc
}

// NewTotaler returns the Totaler of the store named store, whose errors it
// prefixes with that name.
func NewTotaler(store string, sums SumsFunc) Totaler { return Totaler{store: store, sums: sums} }

// Total implements aggregator.Store.
func (t Totaler) Total(ctx context.Context, tenant, meter string, from, to time.Time) (int64, error) {
	if tenant == "" || meter == "" {
		return 0, nil // no event has an empty tenant or meter
	}
	totals, err := t.sums(ctx, from, to, tenant, meter)
	if err != nil {
		return 0, fmt.Errorf("%s: total %s %s: %w", t.store, tenant, meter, err)
	}
	if len(totals) == 0 {
		return 0, nil
	}
	return totals[0].Value, nil
}

// Totals implements aggregator.Store.
func (t Totaler) Totals(ctx context.Context, from, to time.Time) ([]aggregator.Increment, error) {
	totals, err := t.sums(ctx, from, to, "", "")
	if err != nil {
		return nil, fmt.Errorf("%s: totals: %w", t.store, err)
	}
	return totals, nil
}

// TenantTotals implements aggregator.Store.
func (t Totaler) TenantTotals(ctx context.Context, tenant string, from, to time.Time) ([]aggregator.Increment, error) {
	if tenant == "" {
		return nil, nil // no event has an empty tenant
	}
	totals, err := t.sums(ctx, from, to, tenant, "")
	if err != nil {
		return nil, fmt.Errorf("%s: totals of %s: %w", t.store, tenant, err)
	}
	return totals, nil
}

// Rows sums usage per rollup row. The zero value is not usable; make one.
type Rows map[Key]Sum

// Add adds s to the row k.
func (r Rows) Add(k Key, s Sum) { r[k] = r[k].Plus(s) }

// AddEvent counts e, whose dimensions key is dims, in its row.
func (r Rows) AddEvent(e *schemas.Event, dims string) {
	r.Add(Key{Tenant: e.Tenant, Meter: e.Meter, Hour: Hour(Second(e.Time)), Dims: dims}, Sum{Value: e.Value, Events: 1})
}

// Merge adds every row of o to r.
func (r Rows) Merge(o Rows) {
	for k, s := range o {
		r.Add(k, s)
	}
}

// Increments returns the rows summed over dimensions, one per (tenant, meter,
// hour) with a non-zero sum, sorted by tenant, meter and hour.
func (r Rows) Increments() []aggregator.Increment {
	type hourKey struct {
		tenant, meter string
		hour          int64
	}
	byHour := make(map[hourKey]Sum, len(r))
	for k, s := range r {
		hk := hourKey{k.Tenant, k.Meter, k.Hour}
		byHour[hk] = byHour[hk].Plus(s)
	}
	incs := make([]aggregator.Increment, 0, len(byHour))
	for k, s := range byHour {
		if s != (Sum{}) {
			incs = append(incs, aggregator.Increment{Tenant: k.tenant, Meter: k.meter, Hour: Time(k.hour), Value: s.Value, Events: s.Events})
		}
	}
	slices.SortFunc(incs, func(a, b aggregator.Increment) int {
		return cmp.Or(cmp.Compare(a.Tenant, b.Tenant), cmp.Compare(a.Meter, b.Meter), a.Hour.Compare(b.Hour))
	})
	return incs
}

// Second is the stored time of t: Unix seconds, truncated.
func Second(t time.Time) int64 { return t.Unix() }

// Hour is the start of the hour holding the stored time sec.
func Hour(sec int64) int64 { return sec - sec%HourSeconds }

// Time converts Unix seconds to a UTC time.
func Time(sec int64) time.Time { return time.Unix(sec, 0).UTC() }

// Range is the stored times [From, To), in Unix seconds.
type Range struct{ From, To int64 }

// Empty reports whether r holds no second.
func (r Range) Empty() bool { return r.From >= r.To }

// Span is a query range split into the whole hours it covers, read from
// rollups, and up to two partial edges, read from raw events.
type Span struct {
	Hours Range // hour starts: the hours h with Hours.From <= h < Hours.To
	Edges []Range
}

// Bound converts a range bound to stored seconds: the first stored second
// not before t, clamped to the storable range.
func Bound(t time.Time) int64 {
	s := t.Unix()
	if t.Nanosecond() > 0 {
		s++
	}
	return min(max(s, minSecond), maxSecond)
}

// Split splits [from, to) into whole hours and partial edges.
func Split(from, to time.Time) Span {
	f, t := Bound(from), Bound(to)
	var sp Span
	if f >= t {
		return sp
	}
	h0, h1 := Hour(f+HourSeconds-1), Hour(t)
	if h0 >= h1 {
		sp.Edges = []Range{{f, t}}
		return sp
	}
	sp.Hours = Range{h0, h1}
	if f < h0 {
		sp.Edges = append(sp.Edges, Range{f, h0})
	}
	if h1 < t {
		sp.Edges = append(sp.Edges, Range{h1, t})
	}
	return sp
}

// Covering returns the hours that intersect [from, to) as a range of hour
// starts, which is also the range of the stored times in those hours.
func Covering(from, to time.Time) Range {
	f, t := Bound(from), Bound(to)
	if f >= t {
		return Range{}
	}
	return Range{Hour(f), min(Hour(t+HourSeconds-1), maxSecond)}
}

// DimsKey encodes dimensions canonically: a JSON object with keys in
// byte order and no insignificant space, as encoding/json writes a map
// without HTML escaping, or "" for no dimensions. Reports
// group rollups by dimension by decoding it (in ClickHouse
// visitParamExtractString(dims_key, 'route') reads one value).
func DimsKey(dims map[string]string) string {
	var c DimsCache
	return c.Get(dims)
}

// DimsCache encodes dimensions as DimsKey does, allocating only for a set of
// dimensions it has not seen: events mostly repeat a few, and the keys it
// returns share their memory. The zero value is ready; a cache is not safe
// for concurrent use and grows with every new set it sees.
type DimsCache struct {
	buf  []byte
	seen map[string]string
}

// Get returns DimsKey(dims).
func (c *DimsCache) Get(dims map[string]string) string {
	if len(dims) == 0 {
		return ""
	}
	var keysBuf [schemas.MaxDimensions]string
	keys := keysBuf[:0]
	for k := range dims {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	c.buf = appendDims(c.buf[:0], keys, func(i int) string { return dims[keys[i]] })
	if k, ok := c.seen[string(c.buf)]; ok {
		return k
	}
	k := string(c.buf)
	if c.seen == nil {
		c.seen = map[string]string{}
	}
	c.seen[k] = k
	return k
}

func appendDims(buf []byte, keys []string, value func(int) string) []byte {
	buf = append(buf, '{')
	for i, k := range keys {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = schemas.AppendJSONString(buf, k)
		buf = append(buf, ':')
		buf = schemas.AppendJSONString(buf, value(i))
	}
	return append(buf, '}')
}

// CheckUsage returns an error for a usage query no store may run: one of an
// unknown granularity, or with a GroupBy name that is not a dimension key
// (schemas.ValidDimensionKey). The stores cannot bind a dimension name as a
// JSON path or a key everywhere, so they write it into a path or a string
// literal; the grammar of dimension keys, [A-Za-z_][A-Za-z0-9_.-]{0,63},
// has no quote, backslash or space, nothing that could end a quoted path
// member or a string literal, so a name that passes is safe there.
func CheckUsage(q aggregator.UsageQuery) error {
	switch q.Granularity {
	case aggregator.Hourly, aggregator.Daily, aggregator.Monthly:
	default:
		return fmt.Errorf("usage query: invalid granularity %s", q.Granularity)
	}
	for _, d := range q.GroupBy {
		if !schemas.ValidDimensionKey(d) {
			return fmt.Errorf("usage query: group by %q: not a dimension key", d)
		}
	}
	return nil
}

// UsageRows is the cursor of a usage query: database/sql's *Rows and
// clickhouse-go's driver.Rows are both one.
type UsageRows interface {
	Next() bool
	Scan(dest ...any) error
	Err() error
	Close() error
}

// Usage answers q the way every store does: it checks q, splits its range
// into whole hours and partial edges, runs query over the split (not at all
// when the range is empty) and passes fn each row as ScanUsage reads it,
// closing the rows before it returns. The error of fn comes back unchanged;
// the others name the store.
func Usage(store string, q aggregator.UsageQuery, fn func(*aggregator.UsageRow) error, query func(Span) (UsageRows, error)) error {
	if err := CheckUsage(q); err != nil {
		return fmt.Errorf("%s: %w", store, err)
	}
	sp := Split(q.From, q.To)
	if sp.Hours.Empty() && len(sp.Edges) == 0 {
		return nil
	}
	rows, err := query(sp)
	if err != nil {
		return fmt.Errorf("%s: usage: %w", store, err)
	}
	defer rows.Close()
	stop, err := ScanUsage(rows, len(q.GroupBy), fn)
	if stop != nil {
		return stop
	}
	if err != nil {
		return fmt.Errorf("%s: usage: %w", store, err)
	}
	return nil
}

// ScanUsage calls fn with each row of rows, read as it comes, whose columns
func ScanUsage(rows UsageRows, groups int, fn func(*aggregator.UsageRow) error) (stop, err error) {
	row := aggregator.UsageRow{Dims: make([]string, groups)}
	var start int64
	var parts Parts
	dest := make([]any, 0, groups+7)
	dest = append(dest, &row.Tenant, &row.Meter, &start)
	for i := range row.Dims {
		dest = append(dest, &row.Dims[i])
	}
	dest = append(dest, parts.Dest()...)
	for rows.Next() {
		if err := rows.Scan(dest...); err != nil {
			return nil, err
		}
		sum := parts.Sum()
		if sum.Events == 0 {
			continue
		}
		row.Value, row.Events = sum.Value, sum.Events
		row.Start = Time(start)
		if err := fn(&row); err != nil {
			return err, nil
		}
	}
	return nil, rows.Err()
}
