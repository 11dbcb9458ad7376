package cli

import (
	"encoding/csv"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// The output layer every client command prints through: one set of rows,
// shown as an aligned table for people (--format table, the default) or as
// CSV or JSON for scripts. A cell is given once, typed, and each format
// renders it: numbers grouped by thousands and empty cells as "-" in the
// table, plain and spreadsheet-safe in CSV.

// Column is a column of a Table.
type Column struct {
	// Name heads the column in CSV (snake_case); "" leaves the column out
	// of CSV.
	Name string
	// Title heads the column in the table; "" leaves it out of the table.
	Title string
}

// Col is a column shown in both CSV and the table, titled as its name
// upper-cased with spaces for underscores: "window_start" → "WINDOW START".
func Col(name string) Column {
	return Column{Name: name, Title: strings.ToUpper(strings.ReplaceAll(name, "_", " "))}
}

// Long is a string cell the table cuts to one line of at most 80 bytes
// (a reason, an error); CSV and JSON keep it whole.
type Long string

// Percent is a percentage cell with one decimal: "12.5" in CSV, "12.5%" in
// the table; nil is none.
type Percent *float64

// AtLeast is a sum that went beyond int64 and reads math.MaxInt64
// (internal/saturating): CSV prints the number, the table "≥ " before it.
type AtLeast int64

// Repeat is a cell repeating the one above it, of the same record: CSV
// prints its value, the table leaves it blank so that a record's lines read
// as one.
type Repeat struct{ V any }

// Table is what a client command prints.
type Table struct {
	Columns []Column
	// Rows hold one cell per column: a string, Long, int, int64, *int64
	// (nil is none), uint64 (a sequence or version: never grouped, 0 is
	// none), bool, time.Time (the zero time is none), Percent, AtLeast or
	// Repeat.
	Rows [][]any
	// JSON is what --format json prints: the records as the API has them.
	JSON any
	// Empty is the table's one line when there is no row.
	Empty string
}

// Add appends a row; it must have one cell per column.
func (t *Table) Add(cells ...any) {
	if len(cells) != len(t.Columns) {
		panic(fmt.Sprintf("cli: a row of %d cells for %d columns", len(cells), len(t.Columns)))
	}
	t.Rows = append(t.Rows, cells)
}

// Print writes t to w in format: table, csv or json (see checkFormat).
func (t *Table) Print(w io.Writer, format string) error {
	switch format {
	case "json":
		return writeJSON(w, t.JSON)
	case "csv":
		cw := csv.NewWriter(w)
		cw.Write(t.header(true))
		for _, r := range t.Rows {
			cw.Write(t.cells(r, true))
		}
		cw.Flush()
		return cw.Error()
	}
	if len(t.Rows) == 0 && t.Empty != "" {
		_, err := fmt.Fprintln(w, t.Empty)
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(t.header(false), "\t"))
	for _, r := range t.Rows {
		fmt.Fprintln(tw, strings.Join(t.cells(r, false), "\t"))
	}
	return tw.Flush()
}

// name is the column's heading in CSV or in the table; "" leaves it out.
func (c Column) name(csv bool) string {
	if csv {
		return c.Name
	}
	return c.Title
}

func (t *Table) header(csv bool) []string {
	var h []string
	for _, c := range t.Columns {
		if name := c.name(csv); name != "" {
			h = append(h, name)
		}
	}
	return h
}

func (t *Table) cells(row []any, csv bool) []string {
	out := make([]string, 0, len(row))
	for i, v := range row {
		switch {
		case t.Columns[i].name(csv) == "":
		case csv:
			out = append(out, csvCell(v))
		default:
			out = append(out, tableCell(v))
		}
	}
	return out
}

// csvCell renders v for CSV: as it is, with no grouping, empty for none.
func csvCell(v any) string {
	switch v := v.(type) {
	case nil:
		return ""
	case string:
		return csvSafe(v)
	case Long:
		return csvSafe(string(v))
	case int:
		return strconv.Itoa(v)
	case int64:
		return strconv.FormatInt(v, 10)
	case AtLeast:
		return strconv.FormatInt(int64(v), 10)
	case *int64:
		if v == nil {
			return ""
		}
		return strconv.FormatInt(*v, 10)
	case uint64:
		return u64(v)
	case bool:
		return strconv.FormatBool(v)
	case time.Time:
		if v.IsZero() {
			return ""
		}
		return v.UTC().Format(time.RFC3339Nano)
	case Percent:
		if v == nil {
			return ""
		}
		return strconv.FormatFloat(*v, 'f', 1, 64)
	case Repeat:
		return csvCell(v.V)
	}
	panic(fmt.Sprintf("cli: no cell of type %T", v))
}

// tableCell renders v for people: numbers grouped, "-" for none.
func tableCell(v any) string {
	s := ""
	switch v := v.(type) {
	case Repeat:
		return ""
	case string:
		s = v // as it is: csvSafe is for spreadsheets
	case Long:
		s = shorten(string(v), 80)
	case int:
		s = Group(int64(v))
	case int64:
		s = Group(v)
	case AtLeast:
		s = "≥ " + Group(int64(v))
	case *int64:
		if v != nil {
			s = Group(*v)
		}
	case time.Time:
		if !v.IsZero() {
			s = v.UTC().Format(time.RFC3339)
		}
	case Percent:
		if v != nil {
			s = strconv.FormatFloat(*v, 'f', 1, 64) + "%"
		}
	default:
		s = csvCell(v)
	}
	if s == "" {
		return "-"
	}
	return s
}

// Field is one line of a record shown for people: a title and a cell.
type Field struct {
	Title string
	Value any
}

// PrintFields writes fields as aligned "Title: value" lines, each value
// rendered as the table renders a cell.
func PrintFields(w io.Writer, fields []Field) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, f := range fields {
		fmt.Fprintf(tw, "%s:\t%s\n", f.Title, tableCell(f.Value))
	}
	return tw.Flush()
}

// formatFlag defines --format, the output of a client command.
func formatFlag(fs *flag.FlagSet, p *string) {
	fs.StringVar(p, "format", "table", "output: table (for people), csv or json (for scripts)")
}

// checkFormat accepts the values of --format.
func checkFormat(format string) error {
	switch format {
	case "table", "csv", "json":
		return nil
	}
	return Mistakef("--format must be table, csv or json, not %q", format)
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func u64(v uint64) string {
	if v == 0 {
		return ""
	}
	return strconv.FormatUint(v, 10)
}

// Group formats n with thousands separators: 1234567 → 1,234,567.
func Group(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	if neg {
		b.WriteByte('-')
	}
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// shorten cuts s to n bytes on a character boundary, on one line.
func shorten(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}

// csvSafe keeps a spreadsheet from reading a cell as a formula (OWASP CSV
// injection): a cell starting with = + - @ tab or CR gets a leading quote.
func csvSafe(s string) string {
	if s != "" && strings.ContainsRune("=+-@\t\r", rune(s[0])) {
		return "'" + s
	}
	return s
}
