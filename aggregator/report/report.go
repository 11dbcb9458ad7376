// Package report serves usage reports over HTTP: GET /v1/usage (docs/architecture.md#http-apis)
// sums a store's usage per tenant, meter, window and grouped dimensions and
// streams the rows as JSON or CSV.
//
// Windows are UTC hours, days and calendar months, or the tenant's own
// billing periods (whole UTC days, so a period is folded from daily rows).
// Every row counts the events with window_start <= time < window_end; the
// first and last windows are clipped to the query's [from, to), so a row
// never claims usage outside the range asked for.
package report

import (
	"bufio"
	"cmp"
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/saturating"
	"github.com/meterd/meterd/schemas"
)

// Media types of the report.
const (
	MediaJSON = "application/json"
	MediaCSV  = "text/csv"
)

// Windows of a report (the window parameter).
const (
	WindowHour   = "hour"
	WindowDay    = "day"
	WindowMonth  = "month"
	WindowPeriod = "period"
)

// Bounds of a query.
const (
	// MaxHourRange is the longest range of an hourly report.
	MaxHourRange = 93 * 24 * time.Hour
	// MaxGroupBy is the most dimensions a report groups by (an event has at
	// most schemas.MaxDimensions).
	MaxGroupBy = schemas.MaxDimensions
)

// csvColumns are the fixed columns of a CSV report; the grouped dimensions
// come between window_end and value.
var csvColumns = []string{"tenant", "meter", "window_start", "window_end", "value", "events"}

// Config configures a Handler.
type Config struct {
	Store aggregator.Reporter
	// Keys authenticates requests: a tenant key reads its own tenant, an
	// admin key every tenant.
	Keys *auth.Keys
	// Catalog returns the current plans and tenants: the billing periods of
	// window=period. Nil means every tenant has monthly periods from the 1st.
	Catalog func() *catalog.Catalog
	Logger  *slog.Logger
	// Now is the clock of the default range; nil means time.Now.
	Now func() time.Time
}

// Handler serves GET /v1/usage.
type Handler struct {
	cfg Config
	log *slog.Logger
}

// New returns a Handler.
func New(cfg Config) (*Handler, error) {
	if cfg.Store == nil {
		return nil, errors.New("report: Store is required")
	}
	if cfg.Keys == nil {
		return nil, errors.New("report: Keys is required (auth.Open() for none)")
	}
	if cfg.Catalog == nil {
		empty, _ := catalog.NewCatalog(nil, nil)
		cfg.Catalog = func() *catalog.Catalog { return empty }
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Handler{cfg: cfg, log: log}, nil
}

// Register adds GET /v1/usage to mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.Handle("GET /v1/usage", h)
}

// Query is a parsed report request.
type Query struct {
	aggregator.UsageQuery
	Window string // hour, day, month or period
	CSV    bool
}

// params are the query parameters GET /v1/usage knows.
var params = map[string]bool{"tenant": true, "meter": true, "from": true, "to": true, "window": true, "group_by": true, "format": true}

// ParseQuery reads a report request from its query parameters and Accept
// header. now is the clock of the default range; cat gives the billing
// periods of the default range of window=period. It returns every wrong
// parameter.
func ParseQuery(v url.Values, accept string, now time.Time, cat *catalog.Catalog) (Query, []schemas.InvalidParam) {
	var q Query
	var bad []schemas.InvalidParam
	invalid := func(name, reason string) { bad = append(bad, schemas.InvalidParam{Name: name, Reason: reason}) }
	one := func(name string) string {
		vs := v[name]
		if len(vs) > 1 {
			invalid(name, "given more than once")
		}
		if len(vs) == 0 {
			return ""
		}
		return vs[0]
	}
	for _, name := range slices.Sorted(maps.Keys(v)) {
		if !params[name] {
			invalid(name, "unknown parameter; known: tenant, meter, from, to, window, group_by, format")
		}
	}

	// Given but empty is wrong, not absent: tenant= (a script's unset
	// variable) would give an admin every tenant's report.
	if q.Tenant = one("tenant"); v.Has("tenant") && !schemas.ValidTenant(q.Tenant) {
		invalid("tenant", "must be "+schemas.TenantGrammar)
	}
	if q.Meter = one("meter"); v.Has("meter") && !schemas.ValidMeter(q.Meter) {
		invalid("meter", "must match "+schemas.MeterGrammar)
	}

	q.Window = cmp.Or(one("window"), WindowDay)
	switch q.Window {
	case WindowHour:
		q.Granularity = aggregator.Hourly
	case WindowDay, WindowPeriod:
		q.Granularity = aggregator.Daily
	case WindowMonth:
		q.Granularity = aggregator.Monthly
	default:
		invalid("window", "must be hour, day, month or period")
		q.Window, q.Granularity = WindowDay, aggregator.Daily
	}

	seen := map[string]bool{}
	for _, list := range v["group_by"] {
		for _, name := range strings.Split(list, ",") {
			name = strings.TrimSpace(name)
			switch {
			case !schemas.ValidDimensionKey(name):
				invalid("group_by", fmt.Sprintf("%q is not a dimension name (%s)", name, schemas.DimensionKeyGrammar))
			case seen[name]:
				invalid("group_by", fmt.Sprintf("%q is given twice", name))
			default:
				seen[name] = true
				q.GroupBy = append(q.GroupBy, name)
			}
		}
	}
	if len(q.GroupBy) > MaxGroupBy {
		invalid("group_by", fmt.Sprintf("at most %d dimensions", MaxGroupBy))
	}

	switch f := one("format"); f {
	case "":
		q.CSV = acceptsCSV(accept)
	case "csv":
		q.CSV = true
	case "json":
	default:
		invalid("format", "must be json or csv")
	}
	if q.CSV {
		for _, name := range q.GroupBy {
			if slices.Contains(csvColumns, name) {
				invalid("group_by", fmt.Sprintf("dimension %q has the name of a fixed CSV column; ask for JSON (format=json) to group by it", name))
			}
		}
	}

	var fromOK, toOK bool
	q.From, fromOK = parseTime(one("from"), "from", invalid)
	q.To, toOK = parseTime(one("to"), "to", invalid)
	if !toOK {
		q.To = now.UTC()
	}
	if !fromOK {
		q.From = defaultFrom(q, cat)
	}
	switch {
	case !q.From.Before(q.To):
		invalid("from", "must be before to ("+q.To.Format(time.RFC3339)+")")
	case q.From.Before(aggregator.MinEventTime):
		invalid("from", "must not be before "+aggregator.MinEventTime.Format(time.RFC3339))
	case q.To.After(aggregator.MaxEventTime):
		invalid("to", "must not be after "+aggregator.MaxEventTime.Format(time.RFC3339))
	case q.Window == WindowHour && q.To.Sub(q.From) > MaxHourRange:
		invalid("window", "hourly windows cover at most 93 days; narrow from/to or use window=day")
	}
	return q, bad
}

// parseTime parses an RFC 3339 parameter; ok is false when it is absent or
// wrong (and then reported).
func parseTime(s, name string, invalid func(name, reason string)) (time.Time, bool) {
	if s == "" {
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		invalid(name, "must be an RFC 3339 time such as 2026-11-01T00:00:00Z")
		return time.Time{}, false
	}
	return t.UTC(), true
}

// defaultFrom is the start of the range when from is not given: the start
// of the current billing period of the tenant (of the earliest among all
// tenants without a tenant) for window=period, of the current UTC day for
// window=hour, and of the current UTC month otherwise.
func defaultFrom(q Query, cat *catalog.Catalog) time.Time {
	at := q.To.Add(-time.Second)
	switch q.Window {
	case WindowHour:
		return aggregator.Daily.BucketStart(at)
	case WindowPeriod:
		if q.Tenant != "" {
			return cat.PeriodOf(q.Tenant, at).Start
		}
		from := aggregator.Monthly.BucketStart(at)
		for _, t := range cat.TenantNames() {
			if s := cat.PeriodOf(t, at).Start; s.Before(from) {
				from = s
			}
		}
		return from
	}
	return aggregator.Monthly.BucketStart(at)
}

// acceptsCSV reports whether an Accept header prefers CSV: it names
// text/csv and not application/json ahead of it.
func acceptsCSV(accept string) bool {
	for _, part := range strings.Split(accept, ",") {
		media, _, _ := strings.Cut(part, ";")
		switch strings.ToLower(strings.TrimSpace(media)) {
		case MediaCSV:
			return true
		case MediaJSON:
			return false
		}
	}
	return false
}

// ServeHTTP answers GET /v1/usage.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p, err := h.cfg.Keys.Authenticate(r)
	if err != nil {
		auth.Unauthorized(w, err)
		return
	}
	cat := h.cfg.Catalog()
	// An undecodable pair is a 400 of its own: dropped, tenant=%zz would
	// read as no tenant and give an admin every tenant's report.
	v, undecodable := schemas.ParseQuery(r.URL.RawQuery)
	if !p.Admin && v.Get("tenant") == "" {
		v.Set("tenant", p.Tenant) // a tenant key reads its own tenant
	}
	q, bad := ParseQuery(v, r.Header.Get("Accept"), h.cfg.Now(), cat)
	if bad = append(undecodable, bad...); len(bad) > 0 {
		schemas.NewInvalidParams(bad).Write(w)
		return
	}
	if !p.MayActFor(q.Tenant) {
		schemas.NewProblem(schemas.ProblemForbidden, "this API key may read only its own tenant's usage").Write(w)
		return
	}
	h.stream(w, r.Context(), q, cat)
}

// Row is one row of a report.
type Row struct {
	Tenant, Meter          string
	WindowStart, WindowEnd time.Time
	Dims                   []string // values of Query.GroupBy
	Value, Events          int64
}

// Saturated reports whether a sum of r lies beyond int64 and reads as
// math.MaxInt64 (internal/saturating): the usage is at least that.
func (r *Row) Saturated() bool {
	return saturating.Saturated(r.Value) || saturating.Saturated(r.Events)
}

// stream writes the report. The answer is buffered until its first 64 KiB
// are ready, so an error early on is still a problem+json answer; a store
// error after that aborts the response, which the client sees as a broken
// transfer rather than a short report.
func (h *Handler) stream(w http.ResponseWriter, ctx context.Context, q Query, cat *catalog.Catalog) {
	out := &lazyWriter{w: w}
	bw := bufio.NewWriterSize(out, 64<<10)
	var enc encoder
	if q.CSV {
		out.contentType = MediaCSV + "; charset=utf-8; header=present"
		enc = newCSVEncoder(bw, q)
	} else {
		out.contentType = MediaJSON
		enc = &jsonEncoder{w: bw, q: q}
	}
	err := enc.begin()
	if err == nil {
		err = Run(ctx, h.cfg.Store, q, cat, enc.row)
	}
	if err == nil {
		err = enc.end()
	}
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		return
	}
	if out.started {
		h.log.Warn("usage report aborted", "err", err, "tenant", q.Tenant)
		panic(http.ErrAbortHandler)
	}
	if ctx.Err() != nil {
		return // the client went away
	}
	h.log.Error("usage report failed", "err", err, "tenant", q.Tenant)
	schemas.NewProblem(schemas.ProblemStoreUnavailable, "the usage store could not answer; retry").Write(w)
}

// lazyWriter sets the headers and the 200 status on the first write.
type lazyWriter struct {
	w           http.ResponseWriter
	contentType string
	started     bool
}

func (l *lazyWriter) Write(p []byte) (int, error) {
	if !l.started {
		l.started = true
		l.w.Header().Set("Content-Type", l.contentType)
		l.w.Header().Set("Cache-Control", "no-store")
		l.w.WriteHeader(http.StatusOK)
	}
	return l.w.Write(p)
}

// Run reads q from store and calls fn with each report row, in order of
// tenant, meter, window start and grouped dimension values. fn must not
// keep the row.
func Run(ctx context.Context, store aggregator.Reporter, q Query, cat *catalog.Catalog, fn func(*Row) error) error {
	var row Row
	if q.Window != WindowPeriod {
		return store.Usage(ctx, q.UsageQuery, func(u *aggregator.UsageRow) error {
			row = Row{Tenant: u.Tenant, Meter: u.Meter, Dims: u.Dims, Value: u.Value, Events: u.Events}
			row.WindowStart, row.WindowEnd = clip(u.Start, q.Granularity.BucketEnd(u.Start), q.From, q.To)
			return fn(&row)
		})
	}
	f := folder{q: q, cat: cat, emit: fn}
	if err := store.Usage(ctx, q.UsageQuery, f.add); err != nil {
		return err
	}
	return f.flush()
}

// clip returns [start, end) ∩ [from, to).
func clip(start, end, from, to time.Time) (time.Time, time.Time) {
	if start.Before(from) {
		start = from
	}
	if end.After(to) {
		end = to
	}
	return start, end
}

// folder sums daily rows into billing periods. Rows arrive in order of
// tenant, meter, day and dims; one period of one tenant's meter is open at
// a time, and its rows leave sorted by dims when a row of a later period,
// meter or tenant arrives.
type folder struct {
	q    Query
	cat  *catalog.Catalog
	emit func(*Row) error

	open   bool
	tenant string
	meter  string
	period catalog.Period
	sums   map[string]*Row // by dims joined with NUL
}

func (f *folder) add(u *aggregator.UsageRow) error {
	if !f.open || u.Tenant != f.tenant || u.Meter != f.meter || !f.period.Contains(u.Start) {
		if err := f.flush(); err != nil {
			return err
		}
		f.open, f.tenant, f.meter = true, u.Tenant, u.Meter
		f.period = f.cat.PeriodOf(u.Tenant, u.Start)
		if f.sums == nil {
			f.sums = map[string]*Row{}
		}
	}
	key := strings.Join(u.Dims, "\x00")
	r := f.sums[key]
	if r == nil {
		r = &Row{Tenant: u.Tenant, Meter: u.Meter, Dims: slices.Clone(u.Dims)}
		r.WindowStart, r.WindowEnd = clip(f.period.Start, f.period.End, f.q.From, f.q.To)
		f.sums[key] = r
	}
	r.Value = saturating.Add(r.Value, u.Value)
	r.Events = saturating.Add(r.Events, u.Events)
	return nil
}

func (f *folder) flush() error {
	if !f.open {
		return nil
	}
	f.open = false
	rows := make([]*Row, 0, len(f.sums))
	for _, r := range f.sums {
		rows = append(rows, r)
	}
	clear(f.sums)
	slices.SortFunc(rows, func(a, b *Row) int { return slices.Compare(a.Dims, b.Dims) })
	for _, r := range rows {
		if err := f.emit(r); err != nil {
			return err
		}
	}
	return nil
}

// encoder writes a report in one format.
type encoder interface {
	begin() error
	row(r *Row) error
	end() error
}

// Document is the JSON form of a report, for clients to decode: the
// encoder writes it by hand, row by row, and the tests check that every
// report they read decodes into a Document with no member left over and
// encodes back to the same JSON.
type Document struct {
	Window  string        `json:"window"`
	From    time.Time     `json:"from"`
	To      time.Time     `json:"to"`
	GroupBy []string      `json:"group_by"`
	Rows    []DocumentRow `json:"rows"`
}

// DocumentRow is a row of a Document.
type DocumentRow struct {
	Tenant      string    `json:"tenant"`
	Meter       string    `json:"meter"`
	WindowStart time.Time `json:"window_start"`
	WindowEnd   time.Time `json:"window_end"`
	Value       int64     `json:"value"`
	Events      int64     `json:"events"`
	// Saturated is set when Value or Events sums beyond int64 and reads
	// math.MaxInt64 (Row.Saturated): the usage is at least that.
	Saturated bool `json:"saturated,omitempty"`
	// Dimensions holds the values of GroupBy, "" for an event without one.
	Dimensions map[string]string `json:"dimensions"`
}

// jsonEncoder writes a Document:
//
//	{"window":"day","from":…,"to":…,"group_by":[…],"rows":[{…},…]}
//
// with each row {tenant, meter, window_start, window_end, value, events,
// dimensions}, and "saturated":true before dimensions in a row whose sum
// lies beyond int64 (Row.Saturated).
type jsonEncoder struct {
	w    *bufio.Writer
	q    Query
	buf  []byte
	rows int
}

func (e *jsonEncoder) begin() error {
	b := append(e.buf[:0], `{"window":`...)
	b = schemas.AppendJSONString(b, e.q.Window)
	b = append(b, `,"from":"`...)
	b = e.q.From.AppendFormat(b, time.RFC3339)
	b = append(b, `","to":"`...)
	b = e.q.To.AppendFormat(b, time.RFC3339)
	b = append(b, `","group_by":[`...)
	for i, d := range e.q.GroupBy {
		if i > 0 {
			b = append(b, ',')
		}
		b = schemas.AppendJSONString(b, d)
	}
	b = append(b, `],"rows":[`...)
	e.buf = b
	_, err := e.w.Write(b)
	return err
}

func (e *jsonEncoder) row(r *Row) error {
	b := e.buf[:0]
	if e.rows > 0 {
		b = append(b, ',')
	}
	e.rows++
	b = append(b, "\n"+`{"tenant":`...)
	b = schemas.AppendJSONString(b, r.Tenant)
	b = append(b, `,"meter":`...)
	b = schemas.AppendJSONString(b, r.Meter)
	b = append(b, `,"window_start":"`...)
	b = r.WindowStart.AppendFormat(b, time.RFC3339)
	b = append(b, `","window_end":"`...)
	b = r.WindowEnd.AppendFormat(b, time.RFC3339)
	b = append(b, `","value":`...)
	b = strconv.AppendInt(b, r.Value, 10)
	b = append(b, `,"events":`...)
	b = strconv.AppendInt(b, r.Events, 10)
	if r.Saturated() {
		b = append(b, `,"saturated":true`...)
	}
	b = append(b, `,"dimensions":{`...)
	for i, d := range e.q.GroupBy {
		if i > 0 {
			b = append(b, ',')
		}
		b = schemas.AppendJSONString(b, d)
		b = append(b, ':')
		b = schemas.AppendJSONString(b, r.Dims[i])
	}
	b = append(b, "}}"...)
	e.buf = b
	_, err := e.w.Write(b)
	return err
}

func (e *jsonEncoder) end() error {
	_, err := e.w.WriteString("]}\n")
	return err
}

// csvEncoder writes RFC 4180 CSV with a header row: tenant, meter,
// window_start, window_end, one column per grouped dimension named after it,
// value, events.
type csvEncoder struct {
	w       *csv.Writer
	groupBy []string
	fields  []string
}

func newCSVEncoder(w *bufio.Writer, q Query) *csvEncoder {
	return &csvEncoder{w: csv.NewWriter(w), groupBy: q.GroupBy, fields: make([]string, 0, len(csvColumns)+len(q.GroupBy))}
}

// CSVHeader returns the header row of a CSV report grouped by groupBy.
func CSVHeader(groupBy []string) []string {
	h := append([]string{}, csvColumns[:4]...)
	h = append(h, groupBy...)
	return append(h, csvColumns[4:]...)
}

func (e *csvEncoder) begin() error { return e.w.Write(CSVHeader(e.groupBy)) }

func (e *csvEncoder) row(r *Row) error {
	f := append(e.fields[:0], CSVCell(r.Tenant), CSVCell(r.Meter), r.WindowStart.Format(time.RFC3339), r.WindowEnd.Format(time.RFC3339))
	for _, d := range r.Dims {
		f = append(f, CSVCell(d))
	}
	f = append(f, strconv.FormatInt(r.Value, 10), strconv.FormatInt(r.Events, 10))
	e.fields = f
	return e.w.Write(f)
}

// CSVCell returns a cell of text from an API client (a tenant, a meter, a
// dimension value) as a CSV cell a spreadsheet shows instead of running:
// Excel, LibreOffice and Google Sheets take a cell that starts with = + -
// @, a tab or a carriage return as a formula (=HYPERLINK(…) sends a click
// anywhere), so such a cell gets a leading single quote, as OWASP's "CSV
// Injection" advises. Other cells, and JSON reports, are left as they are.
func CSVCell(s string) string {
	if s != "" && strings.IndexByte("=+-@\t\r", s[0]) >= 0 {
		return "'" + s
	}
	return s
}

func (e *csvEncoder) end() error {
	e.w.Flush()
	return e.w.Error()
}
