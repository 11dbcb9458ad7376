package proctest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// envServe makes the test binary a server for these tests: it listens on
// the address the variable holds until SIGTERM; "taken" prints Linux's
// message for a port in use and exits.
const envServe = "PROCTEST_SERVE"

func TestMain(m *testing.M) {
	if addr := os.Getenv(envServe); addr != "" {
		serve(addr)
		return
	}
	// Fail the tests if a goroutine outlives them.
	goleak.VerifyTestMain(m)
}

func serve(addr string) {
	if addr == "taken" {
		fmt.Println("listen: bind: address already in use")
		os.Exit(1)
	}
	// Catch SIGTERM before listening: a signal that came between the
	// listen and the Notify would kill the process without "terminated".
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	fmt.Println("serving on", addr)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	<-sig
	fmt.Println("terminated")
}

func helper(addr string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envServe+"="+addr)
	return cmd
}

// Start waits until the server accepts connections; Stop terminates it.
func TestStartAndStop(t *testing.T) {
	s := Start(t, Spec{Name: "helper", Command: helper})
	if err := Dial(s.Addr); err != nil {
		t.Fatalf("not serving on %s after Start: %v", s.Addr, err)
	}
	// The helper prints after it listens, so a Dial may succeed first.
	if out := waitLog(s, "serving on "+s.Addr); !strings.Contains(out, "serving on "+s.Addr) {
		t.Errorf("output %q does not say it serves on %s", out, s.Addr)
	}
	s.Stop()
	s.Stop() // idempotent
	if err := Dial(s.Addr); err == nil {
		t.Errorf("%s still accepts connections after Stop", s.Addr)
	}
	if out := s.Log(1 << 10); !strings.Contains(out, "terminated") {
		t.Errorf("output %q: the server was not terminated by SIGTERM", out)
	}
}

// waitLog returns the server's output once it contains want, or after 10 s.
func waitLog(s *Server, want string) string {
	deadline := time.Now().Add(10 * time.Second)
	for {
		out := s.Log(1 << 10)
		if strings.Contains(out, want) || time.Now().After(deadline) {
			return out
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A server whose port was taken is started again on another port.
func TestStartRetriesATakenPort(t *testing.T) {
	var addrs []string
	s := Start(t, Spec{Name: "helper", Command: func(addr string) *exec.Cmd {
		addrs = append(addrs, addr)
		if len(addrs) == 1 {
			return helper("taken")
		}
		return helper(addr)
	}})
	if len(addrs) != 2 || s.Addr != addrs[1] {
		t.Fatalf("Command called with %v, server on %s; want two calls and the second address", addrs, s.Addr)
	}
	if err := Dial(s.Addr); err != nil {
		t.Fatal(err)
	}
}

// Ready decides when the server is ready, and a server that never is fails
// at the timeout.
func TestStartWaitsForReady(t *testing.T) {
	readyAt := time.Now().Add(200 * time.Millisecond)
	s := Start(t, Spec{Name: "helper", Command: helper, Ready: func(addr string) error {
		if time.Now().Before(readyAt) {
			return fmt.Errorf("not yet")
		}
		return Dial(addr)
	}})
	if time.Now().Before(readyAt) {
		t.Errorf("Start returned before Ready said so")
	}
	s.Stop()

	s2, err := launch(Spec{Name: "never", Command: helper, Ready: func(string) error { return fmt.Errorf("never ready") },
		Timeout: 200 * time.Millisecond}, "127.0.0.1:0", t.TempDir()+"/log")
	if err == nil || !strings.Contains(err.Error(), "never ready") {
		s2.Stop()
		t.Fatalf("launch of a server never ready: %v, want the Ready error", err)
	}
}

// Without the program, Binary skips the test, unless CI=true: there it
// fails it.
func TestBinaryMissing(t *testing.T) {
	if os.Getenv("PROCTEST_MISSING") == "1" {
		Binary(t, "meterd-no-such-program", "meterd-no-such-package")
		t.Fatal("Binary returned without the program")
	}
	wantSkipOrFail(t, "TestBinaryMissing", "PROCTEST_MISSING=1",
		"meterd-no-such-program not installed (apt-get install meterd-no-such-package")
}

// GoBinary finds a program that go install put in GOBIN, which the PATH
// lacks, at the pinned version only: another version counts as missing
// (a skip, or a failure under CI=true) and the message says how to install
// the right one.
func TestGoBinary(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "meterd-fake-server")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\necho 'meterd-fake-server: v1.2.3'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if os.Getenv("PROCTEST_GOBIN") != "" {
		GoBinary(t, "meterd-fake-server", "example.com/fake", "v9.9.9")
		t.Fatal("GoBinary returned a program of another version")
	}
	t.Setenv("GOBIN", dir)
	if got := GoBinary(t, "meterd-fake-server", "example.com/fake", "v1.2.3"); got != bin {
		t.Fatalf("GoBinary = %q, want %q from GOBIN", got, bin)
	}
	wantSkipOrFail(t, "TestGoBinary", "PROCTEST_GOBIN=1", "is not v9.9.9", "go install example.com/fake@v9.9.9")
}

// wantSkipOrFail runs test again in a process with env set, where it
// looks for a missing program: it must be skipped, unless CI=true, where
// it must fail; either way its output must hold each of hints.
func wantSkipOrFail(t *testing.T, test, env string, hints ...string) {
	t.Helper()
	for _, tc := range []struct {
		ci   string
		fail bool
		want string
	}{
		{"", false, "--- SKIP: " + test},
		{"false", false, "--- SKIP: " + test},
		{"true", true, "--- FAIL: " + test},
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$", "-test.v")
		cmd.Env = append(os.Environ(), env, "CI="+tc.ci)
		out, err := cmd.CombinedOutput()
		ok := (err != nil) == tc.fail && strings.Contains(string(out), tc.want)
		for _, h := range hints {
			ok = ok && strings.Contains(string(out), h)
		}
		if !ok {
			t.Errorf("CI=%q: %v, output:\n%s\nwant %q and %q", tc.ci, err, out, tc.want, hints)
		}
	}
}
