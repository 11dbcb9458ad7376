// Package proctest runs real servers of other projects (Caddy, nginx,
// Prometheus, ClickHouse) for tests: it finds the program, starts it on a
// free loopback port, waits until it is ready and stops it when the test
// ends.
//
// Without the program a test is skipped, unless the environment variable CI
// is "true": CI must run every test, and scripts/test installs what they
// need (scripts/test-deps, scripts/clickhouse-test-server) before it runs
// them, so there a missing program fails the test.
package proctest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Binary returns the path of program, which the Debian package pkg
// installs; it also looks in /usr/sbin and /sbin, which a non-login PATH
// may lack. Without it, it skips t, or fails t when CI is "true".
func Binary(t testing.TB, program, pkg string) string {
	t.Helper()
	if bin := Find(program); bin != "" {
		return bin
	}
	msg := fmt.Sprintf("%s not installed (apt-get install %s, or scripts/test-deps)", program, pkg)
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s; CI must run every test", msg)
	}
	t.Skip(msg)
	return ""
}

// Find returns the path of program, also where the PATH lacks /usr/sbin,
// or "" when it is not installed.
func Find(program string) string {
	if bin, err := exec.LookPath(program); err == nil {
		return bin
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin"} {
		bin := filepath.Join(dir, program)
		if fi, err := os.Stat(bin); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return bin
		}
	}
	return ""
}

// FreePorts returns n loopback TCP ports that were free a moment ago: another
// process may take one before the caller binds it.
func FreePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// Spec says how to run a server.
type Spec struct {
	// Name names the server in messages and its log file.
	Name string
	// Command returns the command that serves on addr (127.0.0.1:port);
	// it may write the configuration the command reads first. It is
	// called again with another port when the server exits at start
	// because another process took the port.
	Command func(addr string) *exec.Cmd
	// Ready returns nil once the server on addr is ready. By default the
	// server is ready when addr accepts a TCP connection.
	Ready func(addr string) error
	// Timeout bounds the wait for Ready (default 30 s).
	Timeout time.Duration
}

// Server is a process started by Start.
type Server struct {
	// Addr is the loopback host:port the server listens on.
	Addr string

	name     string
	cmd      *exec.Cmd
	log      string // file with the process's stdout and stderr
	exited   chan struct{}
	stopOnce sync.Once
}

// attempts is how often Start tries a port: another process may take the
// one it found free before the server binds it.
const attempts = 3

// Start runs the server of spec on a free loopback port and waits until it
// is ready. It fails t if the server does not get ready, and stops the
// server when t ends, logging the end of its output if t failed.
func Start(t testing.TB, spec Spec) *Server {
	t.Helper()
	if spec.Ready == nil {
		spec.Ready = dial
	}
	if spec.Timeout == 0 {
		spec.Timeout = 30 * time.Second
	}
	dir := t.TempDir()
	for attempt := 1; ; attempt++ {
		ports, err := FreePorts(1)
		if err != nil {
			t.Fatal(err)
		}
		addr := fmt.Sprintf("127.0.0.1:%d", ports[0])
		s, err := launch(spec, addr, filepath.Join(dir, fmt.Sprintf("%s-%d.log", spec.Name, attempt)))
		if err == nil {
			t.Cleanup(func() {
				s.Stop()
				if t.Failed() {
					t.Logf("%s output (end):\n%s", s.name, s.Log(16<<10))
				}
			})
			return s
		}
		if !errors.Is(err, errAddrInUse) || attempt == attempts {
			t.Fatalf("%s: %v", spec.Name, err)
		}
		t.Logf("%s: %v; trying another port", spec.Name, err)
	}
}

var (
	// errExited is the error of a server that exited before it was ready.
	errExited = errors.New("exited before it was ready")
	// errAddrInUse is the error of one that exited because its port was
	// taken: Linux's message for EADDRINUSE, which every server prints.
	errAddrInUse = errors.New("its port was taken")
)

func launch(spec Spec, addr, logPath string) (*Server, error) {
	out, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer out.Close()
	cmd := spec.Command(addr)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = SysProcAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	s := &Server{Addr: addr, name: spec.Name, cmd: cmd, log: logPath, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(s.exited) }()
	deadline := time.Now().Add(spec.Timeout)
	for {
		err := spec.Ready(addr)
		select {
		case <-s.exited:
			out := s.Log(4 << 10)
			err := fmt.Errorf("%s %w (%s): %s", strings.Join(cmd.Args, " "), errExited, cmd.ProcessState, out)
			if strings.Contains(out, "address already in use") {
				err = fmt.Errorf("%w: %w", errAddrInUse, err)
			}
			return nil, err
		default:
		}
		if err == nil {
			return s, nil
		}
		if time.Now().After(deadline) {
			s.Stop()
			return nil, fmt.Errorf("%s not ready on %s within %s: %v; output: %s", strings.Join(cmd.Args, " "), addr, spec.Timeout, err, s.Log(4<<10))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func dial(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}

// Stop sends the server SIGTERM and kills it if it has not exited 10 s
// later. It is idempotent.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(10 * time.Second):
			s.cmd.Process.Kill()
			<-s.exited
		}
	})
}

// Log returns the last n bytes of the server's stdout and stderr.
func (s *Server) Log(n int) string {
	data, err := os.ReadFile(s.log)
	if err != nil {
		return err.Error()
	}
	if len(data) > n {
		data = append([]byte("…"), data[len(data)-n:]...)
	}
	return string(data)
}
