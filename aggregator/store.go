package aggregator

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/meterd/meterd/schemas"
)

// Increment is schemas.Increment, the store's unit of counted usage. The
// alias keeps the stores' signatures; the type lives in schemas so the
// enforcer can read totals without importing the aggregator.
type Increment = schemas.Increment

// ErrInvalidEvent is returned by Apply, wrapped with the batch and event, for
// an event no store can hold: one that breaks the rules of schemas.Event or
// whose time lies outside [MinEventTime, MaxEventTime). Nothing of that call
// is written; retrying the same batches fails the same way, so the caller
// dead-letters the batch instead. It is the only error a store may return
// for the data: every other error (the database down, read-only, locked,
// out of parts, slow, missing a table) is the store's, and the aggregator
// retries it for as long as it lasts.
var ErrInvalidEvent = errors.New("aggregator: event cannot be stored")

// ErrDeadline is returned (wrapped, with context.DeadlineExceeded) by a
// store write whose context deadline passed before the write became durable
// or left the process.
var ErrDeadline = errors.New("aggregator: the write's deadline passed before it was done")

// CheckDeadline returns an error once ctx is done or its deadline has passed
// on the clock. Stores call it just before a write becomes durable or its
// data leaves the process: a writer's deadline is the end of its lease (see
// the package documentation), and in a process that just woke from a freeze
// (SIGSTOP) the context's own timer may not have fired yet.
func CheckDeadline(ctx context.Context) error {
	if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
		return fmt.Errorf("%w: %w", ErrDeadline, context.DeadlineExceeded)
	}
	return ctx.Err()
}

// The range [MinEventTime, MaxEventTime) of event times a store holds:
// ClickHouse's DateTime range, less its last second so that every range of
// times has an exclusive upper bound the database can represent.
var (
	MinEventTime = time.Unix(0, 0).UTC()
	MaxEventTime = time.Unix(1<<32-1, 0).UTC()
)

// Store persists batches with exactly-once effect per event (tenant, id).
//
// Times are kept to the second: an event's time is truncated to its second
// when it is stored, and every range [from, to) selects the events whose
// stored time t satisfies from <= t < to. Usage is kept per event (raw events,
// the source of truth) and per UTC hour (rollups, derived from the raw events
// and repairable from them by Reconcile).
//
// Apply and Reconcile are serialised by the store; a store assumes it is the
// only writer of its database (one aggregator consumes the usage stream
// sequentially). Total, Totals, Usage and Ping may run concurrently with
// them.
type Store interface {
	Reporter

	// Apply durably writes the events of batches, skipping every event whose
	// (tenant, id) the store already holds (from any earlier batch, however
	// long ago) or that appears earlier in these batches, and returns the
	// increments of the events it newly counted, one per (tenant, meter, hour)
	// sorted by tenant, meter and hour. When Apply returns nil the effect is
	// durable; when it returns an error, some of the events may have been
	// written: calling Apply again with the same batches still counts each
	// event exactly once. A store without transactions reports usage that a
	// failed call wrote but did not finish counting in the increments of a
	// later successful call, and usage that a failed call counted completely
	// in no increment: after a failed Apply, whoever sums increments reseeds
	// from Totals. Apply fails with ErrInvalidEvent, writing nothing, if an
	// event cannot be stored.
	Apply(ctx context.Context, batches []*schemas.Batch) ([]Increment, error)

	// Total returns the sum of values of tenant's meter for events with
	// from <= time < to. It is exact for any bounds: whole hours are read
	// from the hourly rollups, the partial hours at either end (if from or to
	// is not on an hour) from the raw events, so hour-aligned bounds read
	// rollups only.
	Total(ctx context.Context, tenant, meter string, from, to time.Time) (int64, error)

	// Totals returns the sums of values and numbers of events per (tenant,
	// meter) for from <= time < to over all tenants, with Hour = from, sorted
	// by tenant and meter; pairs without events in the range are left out.
	// Bounds are read as by Total. The enforcer seeds from it.
	Totals(ctx context.Context, from, to time.Time) ([]Increment, error)

	// TenantTotals returns what Totals returns for tenant alone. The
	// enforcer reads tenant by tenant when Totals fails while the store
	// answers, so that whatever breaks one tenant's query costs no other
	// tenant its seed.
	TenantTotals(ctx context.Context, tenant string, from, to time.Time) ([]Increment, error)

	// Reconcile verifies the hourly rollups against the raw events for every
	// hour that intersects [from, to) and repairs every difference. It returns
	// how many rollup rows (tenant, meter, hour, dimensions) were wrong.
	// Repairs are not reported as increments: whoever holds running totals
	// reseeds them with Totals after a non-zero result.
	Reconcile(ctx context.Context, from, to time.Time) (int, error)

	// Ping reports whether the store's database is reachable.
	Ping(ctx context.Context) error

	// Close releases the store's resources; the store must not be used after.
	Close() error
}

// Granularity is the length of the buckets a usage report sums into: UTC
// hours, days or calendar months.
type Granularity int

// Granularities of UsageQuery.
const (
	Hourly Granularity = iota + 1
	Daily
	Monthly
)

// String returns "hour", "day" or "month".
func (g Granularity) String() string {
	switch g {
	case Hourly:
		return "hour"
	case Daily:
		return "day"
	case Monthly:
		return "month"
	}
	return fmt.Sprintf("Granularity(%d)", int(g))
}

// BucketStart returns the start of the bucket of granularity g holding t, in
// UTC.
func (g Granularity) BucketStart(t time.Time) time.Time {
	t = t.UTC()
	switch g {
	case Hourly:
		return t.Truncate(time.Hour)
	case Daily:
		return time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, time.UTC)
	case Monthly:
		return time.Date(t.Year(), t.Month(), 1, 0, 0, 0, 0, time.UTC)
	}
	panic("aggregator: invalid granularity " + g.String())
}

// BucketEnd returns the end of the bucket of granularity g that starts at
// start.
func (g Granularity) BucketEnd(start time.Time) time.Time {
	switch g {
	case Hourly:
		return start.Add(time.Hour)
	case Daily:
		return start.AddDate(0, 0, 1)
	case Monthly:
		return start.AddDate(0, 1, 0)
	}
	panic("aggregator: invalid granularity " + g.String())
}

// UsageQuery selects usage for a report. The caller validates it: names
// follow their grammar (schemas.ValidTenant, ValidMeter, ValidDimensionKey),
// GroupBy holds no name twice, and From < To.
type UsageQuery struct {
	Tenant      string // "" for every tenant
	Meter       string // "" for every meter
	From, To    time.Time
	Granularity Granularity
	// GroupBy names the dimensions rows are split by, in the order of
	// UsageRow.Dims; empty sums over all dimensions.
	GroupBy []string
}

// UsageRow is the usage of a tenant's meter in one bucket for one
// combination of the values of the grouped dimensions.
type UsageRow struct {
	Tenant, Meter string
	// Start is the start of the bucket (UTC), not clipped to the query's
	// From: the first and last buckets may hold only part of their usage.
	Start time.Time
	// Dims holds the value of each dimension of UsageQuery.GroupBy, "" for
	// events without that dimension.
	Dims          []string
	Value, Events int64
}

// Reporter answers usage reports.
type Reporter interface {
	// Usage calls fn with the usage of the events with From <= time < To
	// (read as by Store.Total: whole hours from the rollups, partial hours
	// at either end from the raw events), one row per (tenant, meter,
	// bucket, dims) that has events, in order of tenant, meter, Start and
	// then Dims (byte order, element by element). fn may not keep the row:
	// it is reused. An error of fn stops Usage, which returns it.
	Usage(ctx context.Context, q UsageQuery, fn func(*UsageRow) error) error
}
