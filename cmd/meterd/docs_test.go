package main

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// repoRoot is the repository's top directory, seen from this package.
const repoRoot = "../.."

// docFiles returns the files under repoRoot (paths relative to it, with
// slashes) whose names end in one of exts, leaving out hidden directories
// (.git, editor state) and directories of other tools' packages.
func docFiles(t *testing.T, exts ...string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(repoRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if path != repoRoot && (strings.HasPrefix(name, ".") || name == "node_modules" || name == "vendor") {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() || !slices.Contains(exts, filepath.Ext(name)) {
			return nil
		}
		rel, err := filepath.Rel(repoRoot, path)
		if err != nil {
			return err
		}
		out = append(out, filepath.ToSlash(rel))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) == 0 {
		t.Fatalf("no %v files under %s", exts, repoRoot)
	}
	return out
}

// The repository stands alone: no doc, comment, config or dashboard refers
// to a contract kept outside it. The architecture, contracts and targets are
// in docs/architecture.md, README.md and docs/design-notes.md.
func TestDocsStandAlone(t *testing.T) {
	// Spelled in parts so that this file does not match itself.
	word := "DES" + "IGN"
	forbidden := []struct {
		re   *regexp.Regexp
		what string
	}{
		{regexp.MustCompile(regexp.QuoteMeta(".." + "/shared")), "a path outside the repository"},
		{regexp.MustCompile(`\b` + word + `\b`), "the outside contract " + word + ".md (cite docs/architecture.md#section, a README section or docs/design-notes.md)"},
	}
	files := docFiles(t, ".go", ".md", ".yml", ".yaml", ".json")
	for _, f := range files {
		data, err := os.ReadFile(filepath.Join(repoRoot, f))
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(data), "\n") {
			for _, fb := range forbidden {
				if m := fb.re.FindString(line); m != "" {
					t.Errorf("%s:%d refers to %s (%q): %s", f, i+1, fb.what, m, strings.TrimSpace(line))
				}
			}
		}
	}
	readme, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "](docs/architecture.md)") {
		t.Error("README.md does not link docs/architecture.md")
	}
}

var (
	// mdLink is an inline link or image: [text](target "title").
	mdLink = regexp.MustCompile(`\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+"[^"]*")?\)`)
	// codeSpan is inline code, which holds no links.
	codeSpan = regexp.MustCompile("`[^`\n]*`")
	// heading is an ATX heading.
	heading = regexp.MustCompile(`^#{1,6}\s+(.*?)\s*#*\s*$`)
	// scheme starts an absolute URL.
	scheme = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*:`)
)

// proseLines returns the lines of a markdown document outside fenced code
// blocks; the lines of code blocks are returned empty, so line numbers hold.
func proseLines(doc string) []string {
	lines := strings.Split(doc, "\n")
	fence := ""
	for i, l := range lines {
		trimmed := strings.TrimSpace(l)
		switch {
		case fence == "" && (strings.HasPrefix(trimmed, "```") || strings.HasPrefix(trimmed, "~~~")):
			fence = trimmed[:3]
			lines[i] = ""
		case fence != "":
			if strings.HasPrefix(trimmed, fence) {
				fence = ""
			}
			lines[i] = ""
		}
	}
	return lines
}

// anchors returns the anchors GitHub gives the headings of a markdown
// document: the heading's text (links reduced to their text) lower-cased,
// without punctuation, spaces turned into hyphens; a repeated anchor gets
// -1, -2, ….
func anchors(doc string) map[string]bool {
	out := map[string]bool{}
	seen := map[string]int{}
	for _, l := range proseLines(doc) {
		m := heading.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		text := mdLink.ReplaceAllStringFunc(m[1], func(s string) string {
			return s[1:strings.Index(s, "](")]
		})
		var b strings.Builder
		for _, r := range strings.ToLower(text) {
			switch {
			case unicode.IsLetter(r) || unicode.IsDigit(r) || r == '-' || r == '_':
				b.WriteRune(r)
			case r == ' ':
				b.WriteByte('-')
			}
		}
		a := b.String()
		if n := seen[a]; n > 0 {
			out[a+"-"+strconv.Itoa(n)] = true
		} else {
			out[a] = true
		}
		seen[a]++
	}
	return out
}

// Every relative link of every markdown document (README.md, BENCHMARKS.md,
// docs/, deploy/ and the packages' notes) names a file of the repository,
// and its #anchor, if any, a heading of that file.
func TestDocsLinksResolve(t *testing.T) {
	root, err := filepath.Abs(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	docs := docFiles(t, ".md")
	for _, must := range []string{"README.md", "BENCHMARKS.md", "docs/architecture.md", "docs/design-notes.md", "deploy/README.md"} {
		if !slices.Contains(docs, must) {
			t.Errorf("%s is missing", must)
		}
	}
	cache := map[string]map[string]bool{}
	anchorsOf := func(path string) map[string]bool {
		if a, ok := cache[path]; ok {
			return a
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		cache[path] = anchors(string(data))
		return cache[path]
	}
	links := 0
	for _, f := range docs {
		abs := filepath.Join(root, filepath.FromSlash(f))
		data, err := os.ReadFile(abs)
		if err != nil {
			t.Fatal(err)
		}
		prose := strings.Join(proseLines(string(data)), "\n")
		prose = codeSpan.ReplaceAllStringFunc(prose, func(s string) string {
			// Keep link text in code ([`x`](y)) readable as a link.
			return strings.Repeat("x", len(s))
		})
		for _, m := range mdLink.FindAllStringSubmatchIndex(prose, -1) {
			target := prose[m[2]:m[3]]
			if scheme.MatchString(target) {
				continue
			}
			links++
			line := strings.Count(prose[:m[0]], "\n") + 1
			where := f + ":" + strconv.Itoa(line) + ": " + target
			path, anchor, _ := strings.Cut(target, "#")
			dest := abs
			if path != "" {
				dest = filepath.Join(filepath.Dir(abs), filepath.FromSlash(path))
			}
			if rel, err := filepath.Rel(root, dest); err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
				t.Errorf("%s: leaves the repository", where)
				continue
			}
			st, err := os.Stat(dest)
			if err != nil {
				t.Errorf("%s: no such file", where)
				continue
			}
			if anchor == "" || st.IsDir() || filepath.Ext(dest) != ".md" {
				continue
			}
			if !anchorsOf(dest)[anchor] {
				t.Errorf("%s: no heading with anchor #%s", where, anchor)
			}
		}
	}
	if links < 50 {
		t.Errorf("found only %d relative links; is the link pattern broken?", links)
	}
}

// Every Go package of the repository (every directory holding non-test Go
// files) has its line in docs/architecture.md's package map.
func TestArchitecturePackageMap(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(repoRoot, "docs", "architecture.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(data)
	dirs := map[string]bool{}
	for _, f := range docFiles(t, ".go") {
		if strings.HasSuffix(f, "_test.go") || strings.Contains("/"+f, "/testdata/") {
			continue
		}
		dirs[filepath.ToSlash(filepath.Dir(f))] = true
	}
	if len(dirs) < 20 {
		t.Fatalf("found only %d packages", len(dirs))
	}
	for dir := range dirs {
		if !strings.Contains(doc, "\n| `"+dir+"` |") {
			t.Errorf("package %s has no line in the package map of docs/architecture.md", dir)
		}
	}
}
