package cli

import (
	"strings"
	"testing"
	"time"
)

// One table, three formats: each cell type rendered for people (grouped,
// "-" for none, cut to a line, a Repeat blank) and for scripts (plain,
// spreadsheet-safe, a Repeat repeated); columns only one format shows.
func TestTablePrint(t *testing.T) {
	limit, pct := int64(1234567), 12.25
	at := time.Date(2026, 12, 1, 9, 30, 0, 500, time.UTC)
	tbl := Table{
		Columns: []Column{Col("tenant"), Col("used"), Col("limit"), {"percent", "USED %"}, Col("seq"), Col("at"), {"why", ""}, {"", "NOTE"}, Col("ok")},
		JSON:    map[string]int{"n": 1},
		Empty:   "nothing",
	}
	tbl.Add("=acme", int64(-1500), &limit, Percent(&pct), uint64(7), at, Long("x"), Long(strings.Repeat("long ", 30)), true)
	tbl.Add(Repeat{"=acme"}, 0, (*int64)(nil), Percent(nil), uint64(0), time.Time{}, "", "", false)

	for _, c := range []struct{ format, want string }{
		{"table", "" +
			"TENANT  USED    LIMIT      USED %  SEQ  AT                    NOTE" + strings.Repeat(" ", 79) + "OK\n" +
			"=acme   -1,500  1,234,567  12.2%   7    2026-12-01T09:30:00Z  " + strings.Repeat("long ", 16) + "…  true\n" +
			"        0       -          -       -    -                     -" + strings.Repeat(" ", 82) + "false\n"},
		{"csv", "" +
			"tenant,used,limit,percent,seq,at,why,ok\n" +
			"'=acme,-1500,1234567,12.2,7,2026-12-01T09:30:00.0000005Z,x,true\n" +
			"'=acme,0,,,,,,false\n"},
		{"json", "{\n  \"n\": 1\n}\n"},
	} {
		var b strings.Builder
		if err := tbl.Print(&b, c.format); err != nil {
			t.Fatal(err)
		}
		if b.String() != c.want {
			t.Errorf("%s:\n%q\nwant\n%q", c.format, b.String(), c.want)
		}
	}
	var b strings.Builder
	(&Table{Columns: []Column{Col("a")}, Empty: "nothing"}).Print(&b, "table")
	if b.String() != "nothing\n" {
		t.Errorf("empty table: %q", b.String())
	}
}
