package main

import (
	"debug/buildinfo"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// The image is built without a Docker engine here, so these tests hold the
// Dockerfile to its promises: a static binary, built the way the Dockerfile
// builds it, stamped with its version, in a final stage that runs as a
// non-root user.

// dockerStage is one FROM … of a Dockerfile with its instructions.
type dockerStage struct {
	from, name string
	instrs     []dockerInstr
}

type dockerInstr struct{ cmd, args string }

// parseDockerfile splits a Dockerfile into stages of instructions, joining
// continued lines and dropping comments.
func parseDockerfile(text string) ([]dockerStage, error) {
	var stages []dockerStage
	var cur strings.Builder
	lines := strings.Split(text, "\n")
	for i := 0; i < len(lines); i++ {
		line := strings.TrimSpace(lines[i])
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		cur.Reset()
		for strings.HasSuffix(line, `\`) {
			cur.WriteString(strings.TrimSuffix(line, `\`) + " ")
			for i++; i < len(lines) && strings.HasPrefix(strings.TrimSpace(lines[i]), "#"); i++ {
			}
			if i == len(lines) {
				return nil, errors.New("the Dockerfile ends in a continued line")
			}
			line = strings.TrimSpace(lines[i])
		}
		cur.WriteString(line)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		in := dockerInstr{strings.ToUpper(cmd), strings.Join(strings.Fields(args), " ")}
		if in.cmd == "FROM" {
			f := strings.Fields(in.args)
			f = slices.DeleteFunc(f, func(s string) bool { return strings.HasPrefix(s, "--platform=") })
			st := dockerStage{from: f[0]}
			if len(f) == 3 && strings.EqualFold(f[1], "AS") {
				st.name = f[2]
			}
			stages = append(stages, st)
			continue
		}
		if len(stages) == 0 {
			if in.cmd == "ARG" {
				continue
			}
			return nil, fmt.Errorf("%s before the first FROM", in.cmd)
		}
		stages[len(stages)-1].instrs = append(stages[len(stages)-1].instrs, in)
	}
	return stages, nil
}

func (s dockerStage) find(cmd, contains string) []string {
	var out []string
	for _, in := range s.instrs {
		if in.cmd == cmd && strings.Contains(in.args, contains) {
			out = append(out, in.args)
		}
	}
	return out
}

func readDockerfile(t *testing.T) []dockerStage {
	t.Helper()
	data, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	stages, err := parseDockerfile(string(data))
	if err != nil {
		t.Fatal(err)
	}
	return stages
}

// dockerBuild returns the go build command of the Dockerfile's build stage.
func dockerBuild(stages []dockerStage) (string, error) {
	for _, s := range stages[:max(len(stages)-1, 0)] {
		if runs := s.find("RUN", "go build"); len(runs) == 1 {
			return runs[0], nil
		}
	}
	return "", errors.New("no build stage runs go build exactly once")
}

var (
	ldflagsRE = regexp.MustCompile(`-ldflags[ =]"([^"]*)"`)
	outputRE  = regexp.MustCompile(`-o (\S+)`)
)

// checkDockerfile lists what is wrong with a Dockerfile for meterd's image.
func checkDockerfile(text string) []error {
	stages, err := parseDockerfile(text)
	if err != nil {
		return []error{err}
	}
	if len(stages) < 2 {
		return []error{fmt.Errorf("%d stages; want a multi-stage build (builder, then runtime)", len(stages))}
	}
	build, err := dockerBuild(stages)
	if err != nil {
		return []error{err}
	}
	var errs []error
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "-X main.version=${VERSION}", "./cmd/meterd"} {
		if !strings.Contains(build, want) {
			errs = append(errs, fmt.Errorf("the go build lacks %q: %s", want, build))
		}
	}
	if !ldflagsRE.MatchString(build) {
		errs = append(errs, fmt.Errorf("the go build has no -ldflags \"…\": %s", build))
	}
	out := outputRE.FindStringSubmatch(build)
	if out == nil {
		return append(errs, fmt.Errorf("the go build names no output (-o): %s", build))
	}

	final := stages[len(stages)-1]
	// distroless/static holds CA certificates; scratch would need a COPY of them.
	if !strings.HasPrefix(final.from, "gcr.io/distroless/static") {
		errs = append(errs, fmt.Errorf("final stage FROM %s; want gcr.io/distroless/static…:nonroot", final.from))
	}
	users := final.find("USER", "")
	if len(users) == 0 {
		errs = append(errs, errors.New("the final stage sets no USER"))
	}
	for _, u := range users {
		if name, _, _ := strings.Cut(u, ":"); name == "0" || name == "root" {
			errs = append(errs, fmt.Errorf("final stage USER %q runs as root", u))
		}
	}
	copies := final.find("COPY", "--from=")
	if len(copies) != 1 {
		return append(errs, fmt.Errorf("final stage copies %d things from other stages; want only the binary", len(copies)))
	}
	f := strings.Fields(copies[0])
	if len(f) != 3 || stages[0].name == "" || f[0] != "--from="+stages[0].name || f[1] != out[1] {
		return append(errs, fmt.Errorf("final stage COPY %q; want the build stage's %s", copies[0], out[1]))
	}
	if ep := final.find("ENTRYPOINT", ""); len(ep) != 1 || ep[0] != fmt.Sprintf(`["%s"]`, f[2]) {
		errs = append(errs, fmt.Errorf("ENTRYPOINT %q; want the exec form of %s alone, so each workload's args pick the subcommand", ep, f[2]))
	}
	return errs
}

func TestDockerfile(t *testing.T) {
	data, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range checkDockerfile(string(data)) {
		t.Error(err)
	}

	// The checks can fail: each change below breaks one promise.
	for _, tc := range []struct{ old, new, want string }{
		{"AS build", "AS builder", "want the build stage's"},
		{"FROM gcr.io/distroless/static-debian12:nonroot\n", "", "want a multi-stage build"},
		{"USER 65532:65532", "USER root", "runs as root"},
		{"USER 65532:65532", "", "sets no USER"},
		{"CGO_ENABLED=0 GOOS", "GOOS", `lacks "CGO_ENABLED=0"`},
		{"-trimpath", "", `lacks "-trimpath"`},
		{"gcr.io/distroless/static-debian12:nonroot", "debian:12", "want gcr.io/distroless/static"},
		{`ENTRYPOINT ["/usr/local/bin/meterd"]`, `ENTRYPOINT ["/usr/local/bin/meterd", "collector"]`, "exec form"},
	} {
		if !strings.Contains(string(data), tc.old) {
			t.Fatalf("the Dockerfile no longer holds %q: update this test", tc.old)
		}
		errs := checkDockerfile(strings.Replace(string(data), tc.old, tc.new, 1))
		if !strings.Contains(fmt.Sprint(errs), tc.want) {
			t.Errorf("%q → %q: errors %v, want one mentioning %q", tc.old, tc.new, errs, tc.want)
		}
	}

	ignore, err := os.ReadFile("../../.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(ignore), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			lines = append(lines, l)
		}
	}
	if !slices.Contains(lines, ".git") {
		t.Error(".dockerignore does not exclude .git")
	}
	for _, need := range []string{"*", "go.mod", "go.sum", "cmd", "internal", "schemas"} {
		if slices.Contains(lines, need) {
			t.Errorf(".dockerignore excludes %s, which the build needs", need)
		}
	}
}

// The binary built as the Dockerfile builds it is static (no interpreter,
// no shared library) and reports the version the build stamped.
func TestStaticBinary(t *testing.T) {
	build, err := dockerBuild(readDockerfile(t))
	if err != nil {
		t.Fatal(err)
	}
	const version = "v9.8.7-imagetest"
	ldflags := strings.ReplaceAll(ldflagsRE.FindStringSubmatch(build)[1], "${VERSION}", version)
	bin := filepath.Join(t.TempDir(), "meterd")
	cmd := exec.CommandContext(t.Context(), "go", "build", "-trimpath", "-ldflags", ldflags, "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if err := staticELF(bin); err != nil {
		t.Error(err)
	}
	info, err := buildinfo.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	settings := map[string]string{}
	for _, s := range info.Settings {
		settings[s.Key] = s.Value
	}
	if settings["CGO_ENABLED"] != "0" || settings["-trimpath"] != "true" {
		t.Errorf("build settings %v; want CGO_ENABLED=0 and -trimpath", settings)
	}
	out, err := exec.CommandContext(t.Context(), bin, "version").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "meterd "+version {
		t.Errorf("meterd version: %q, %v; want %q", out, err, "meterd "+version)
	}
}

// staticELF fails unless the ELF file at path needs no dynamic loader and
// no shared library.
func staticELF(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		switch p.Type {
		case elf.PT_INTERP:
			return fmt.Errorf("%s has an interpreter (PT_INTERP): dynamically linked", path)
		case elf.PT_DYNAMIC:
			return fmt.Errorf("%s has a dynamic section (PT_DYNAMIC)", path)
		}
	}
	libs, err := f.ImportedLibraries()
	if err != nil {
		return err
	}
	if len(libs) > 0 {
		return fmt.Errorf("%s needs shared libraries %v", path, libs)
	}
	return nil
}

// The check itself can fail: the go command is dynamically linked on most
// systems, and a system binary almost surely is.
func TestStaticELFRejectsDynamic(t *testing.T) {
	for _, p := range []string{"/bin/sh", "/usr/bin/env"} {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		if err := staticELF(p); err == nil {
			t.Errorf("%s passed as static", p)
		}
		return
	}
	t.Fatal("no dynamically linked system binary to test the check on")
}
