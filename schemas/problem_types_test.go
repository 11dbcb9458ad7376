package schemas

import (
	"flag"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

var updateReadme = flag.Bool("update-readme", false, "rewrite README.md's problem-types section from the table")

var slugPattern = regexp.MustCompile(`^[a-z]+(-[a-z]+)*$`)

// Every row of the table is complete and consistent: a slug is one type,
// a title is its status's text (what the bodies have always carried), and
// the 402 types are exactly the block reasons'.
func TestProblemTypesTable(t *testing.T) {
	seen := map[string]ProblemType{}
	for _, typ := range ProblemTypes() {
		info := problemTypes[typ]
		if !slugPattern.MatchString(info.slug) {
			t.Errorf("type %d: slug %q", typ, info.slug)
		}
		if other, dup := seen[info.slug]; dup {
			t.Errorf("slug %q is types %d and %d", info.slug, other, typ)
		}
		seen[info.slug] = typ
		if info.status < 400 || info.status > 599 || info.title != http.StatusText(info.status) {
			t.Errorf("%s: status %d, title %q", info.slug, info.status, info.title)
		}
		if info.when == "" || strings.Contains(info.when, "|") || strings.Contains(info.when, "\n") {
			t.Errorf("%s: when %q must be one line without |", info.slug, info.when)
		}
		if got := typ.URI(); got != "https://meterd.dev/problems/"+info.slug {
			t.Errorf("%s: URI %q", info.slug, got)
		}
		p := NewProblem(typ, "d")
		if p.Type != typ.URI() || p.Status != info.status || p.Title != info.title || p.Detail != "d" {
			t.Errorf("%s: NewProblem = %+v", info.slug, p)
		}
		if r, ok := blockReason(typ); (info.status == http.StatusPaymentRequired) != ok {
			t.Errorf("%s: status %d but block reason %q", info.slug, info.status, r)
		}
	}
	if len(seen) != int(problemTypeEnd)-1 {
		t.Errorf("%d types in the table, %d constants", len(seen), problemTypeEnd-1)
	}
}

// blockReason returns the reason whose 402 type typ is.
func blockReason(typ ProblemType) (Reason, bool) {
	for r, rt := range reasonProblem {
		if rt == typ {
			return r, true
		}
	}
	return "", false
}

// No handler builds a problem type by hand: outside schemas, no Go code
// names the type URI's base or builds a Problem literal, so every type
// comes from the table.
func TestProblemsOnlyFromTable(t *testing.T) {
	forbidden := []string{"ProblemBase", "meterd.dev/problems", "schemas.Problem{"}
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "schemas" || strings.HasPrefix(d.Name(), ".") && path != "..") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, f := range forbidden {
			if strings.Contains(string(src), f) {
				t.Errorf("%s holds %q: build problems with schemas.NewProblem(schemas.Problem…, detail)", path, f)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

const (
	readmeBegin = "<!-- problem-types:begin"
	readmeEnd   = "<!-- problem-types:end -->"
)

// readmeSection renders the table as README.md lists it.
func readmeSection() string {
	var b strings.Builder
	b.WriteString("| type | status | when |\n|---|---|---|\n")
	for _, typ := range ProblemTypes() {
		info := problemTypes[typ]
		b.WriteString("| `" + info.slug + "` | `" + strconv.Itoa(info.status) + "` | " + info.when + " |\n")
	}
	return b.String()
}

// README.md's problem-types section is the table; every status table and
// every problem named elsewhere in README.md and docs/ agrees with it: a
// named type exists and has the status it is shown with.
func TestReadmeProblemTypes(t *testing.T) {
	const path = "../README.md"
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	readme := string(raw)
	begin := strings.Index(readme, readmeBegin)
	end := strings.Index(readme, readmeEnd)
	if begin < 0 || end < begin {
		t.Fatalf("README.md has no %s … %s section", readmeBegin, readmeEnd)
	}
	begin += strings.Index(readme[begin:], "\n") + 1
	if got, want := readme[begin:end], readmeSection(); got != want {
		if !*updateReadme {
			t.Fatalf("README.md's problem types are not the table's; run go test ./schemas -run TestReadmeProblemTypes -update-readme\n got:\n%s\nwant:\n%s", got, want)
		}
		readme = readme[:begin] + want + readme[end:]
		if err := os.WriteFile(path, []byte(readme), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	bySlug := map[string]int{}
	statuses := map[int]bool{}
	for _, typ := range ProblemTypes() {
		bySlug[typ.Slug()] = typ.Status()
		statuses[typ.Status()] = true
	}
	docs := map[string]string{path: readme}
	notes, _ := filepath.Glob("../docs/*.md")
	for _, n := range notes {
		b, err := os.ReadFile(n)
		if err != nil {
			t.Fatal(err)
		}
		docs[n] = string(b)
	}
	check := func(where, slug string, status int) {
		t.Helper()
		want, ok := bySlug[slug]
		switch {
		case !ok:
			t.Errorf("%s: problem type %q is not in the table", where, slug)
		case status != 0 && status != want:
			t.Errorf("%s: %s shown with %d; its status is %d", where, slug, status, want)
		}
	}
	statusCell := regexp.MustCompile("^`([45][0-9][0-9])`$")
	typeCell := regexp.MustCompile("^`[a-z-]+`(, `[a-z-]+`)*$")
	uri := regexp.MustCompile(`meterd\.dev/problems/([a-z-]+)"?(?:,"title":"[^"]*","status":([0-9]+))?`)
	named := regexp.MustCompile("`([45][0-9][0-9])` problem `([a-z-]+)`")
	for name, text := range docs {
		for i, line := range strings.Split(text, "\n") {
			where := name + ":" + strconv.Itoa(i+1)
			// A status table: | `413` | `body-too-large`, … | when |
			if cells := strings.Split(strings.Trim(line, " |"), " | "); strings.HasPrefix(line, "| `") && len(cells) > 1 {
				if m := statusCell.FindStringSubmatch(cells[0]); m != nil {
					status, _ := strconv.Atoi(m[1])
					if !statuses[status] {
						t.Errorf("%s: status %d is no problem type's", where, status)
					}
					for _, c := range cells[1:] {
						if typeCell.MatchString(c) {
							for _, s := range strings.Split(c, ", ") {
								check(where, strings.Trim(s, "`"), status)
							}
						}
					}
				}
			}
			for _, m := range uri.FindAllStringSubmatch(line, -1) {
				status, _ := strconv.Atoi(m[2])
				check(where, m[1], status)
			}
			for _, m := range named.FindAllStringSubmatch(line, -1) {
				status, _ := strconv.Atoi(m[1])
				check(where, m[2], status)
			}
		}
	}
}
