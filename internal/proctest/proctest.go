// Package proctest runs real servers of other projects (Caddy, nginx,
// Prometheus, ClickHouse, nats-server) for tests: it finds the program, starts it on a
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
	"slices"
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
	missing(t, fmt.Sprintf("%s not installed (apt-get install %s, or scripts/test-deps)", program, pkg))
	return ""
}

// GoBinary returns the path of program, which `go install module@version`
// installs: on the PATH, else in the go command's GOBIN or GOPATH/bin,
// which a PATH often lacks. version pins it: the first of these whose
// --version names version, so a test never runs against a server other
// than the one it was written for. Without one, it skips t, or fails t
// when CI is "true".
func GoBinary(t testing.TB, program, module, version string) string {
	t.Helper()
	var others []string
	for _, bin := range goCandidates(program) {
		out, err := exec.Command(bin, "--version").CombinedOutput()
		if err == nil && strings.Contains(string(out), version) {
			return bin
		}
		others = append(others, fmt.Sprintf("%s says %q (%v)", bin, strings.TrimSpace(string(out)), err))
	}
	msg := fmt.Sprintf("%s not installed", program)
	if len(others) > 0 {
		msg = fmt.Sprintf("%s is not %s: %s", program, version, strings.Join(others, "; "))
	}
	missing(t, fmt.Sprintf("%s (go install %s@%s, or scripts/test-deps)", msg, module, version))
	return ""
}

// goCandidates returns the paths of program on the PATH and in the go
// command's GOBIN and GOPATH/bin, in that order.
func goCandidates(program string) []string {
	var bins []string
	if bin, err := exec.LookPath(program); err == nil {
		bins = append(bins, bin)
	}
	var dirs []string
	if out, err := exec.Command("go", "env", "GOBIN", "GOPATH").Output(); err == nil {
		lines := strings.Split(string(out), "\n")
		if gobin := strings.TrimSpace(lines[0]); gobin != "" {
			dirs = append(dirs, gobin)
		}
		if len(lines) > 1 {
			for _, p := range filepath.SplitList(strings.TrimSpace(lines[1])) {
				dirs = append(dirs, filepath.Join(p, "bin"))
			}
		}
	}
	for _, dir := range dirs {
		bin := filepath.Join(dir, program)
		if fi, err := os.Stat(bin); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 && !slices.Contains(bins, bin) {
			bins = append(bins, bin)
		}
	}
	return bins
}

// missing skips t for a missing program, or fails it when CI is "true":
// CI must run every test.
func missing(t testing.TB, msg string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s; CI must run every test", msg)
	}
	t.Skip(msg)
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
	*Process
	// Addr is the loopback host:port the server listens on.
	Addr string
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
		spec.Ready = Dial
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
					t.Logf("%s output (end):\n%s", spec.Name, s.Log(16<<10))
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
	p, err := Launch(spec.Command(addr), logPath, func() error { return spec.Ready(addr) }, spec.Timeout)
	if err != nil {
		return nil, fmt.Errorf("on %s: %w", addr, err)
	}
	return &Server{Process: p, Addr: addr}, nil
}

// Process is a server process started by Launch.
type Process struct {
	cmd      *exec.Cmd
	log      string // file with the process's stdout and stderr
	exited   chan struct{}
	stopOnce sync.Once
}

// Launch starts cmd, its stdout and stderr appended to the file logPath,
// and waits until ready returns nil. If the process exits first (an error
// wrapping errAddrInUse when its port was taken) or timeout passes, it
// returns an error with the end of the output, and the process is gone.
func Launch(cmd *exec.Cmd, logPath string, ready func() error, timeout time.Duration) (*Process, error) {
	out, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, err
	}
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = SysProcAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	p := &Process{cmd: cmd, log: logPath, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(p.exited) }()
	deadline := time.Now().Add(timeout)
	for {
		err := ready()
		select {
		case <-p.exited:
			out := p.Log(4 << 10)
			err := fmt.Errorf("%s %w (%s): %s", strings.Join(cmd.Args, " "), errExited, cmd.ProcessState, out)
			if strings.Contains(out, "address already in use") {
				err = fmt.Errorf("%w: %w", errAddrInUse, err)
			}
			return nil, err
		default:
		}
		if err == nil {
			return p, nil
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("%s not ready within %s: %v; output: %s", strings.Join(cmd.Args, " "), timeout, err, p.Log(4<<10))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Dial returns nil once addr accepts a TCP connection: the readiness of a
// server that serves as soon as it listens.
func Dial(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}

// Stop sends the process SIGTERM and kills it if it has not exited 15 s
// later (a server may flush its data first). It is idempotent.
func (p *Process) Stop() {
	p.stopOnce.Do(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(15 * time.Second):
			p.cmd.Process.Kill()
			<-p.exited
		}
	})
}

// Kill sends the process SIGKILL and waits until it is gone: a crash, with
// no chance to flush or say goodbye. Stop afterwards is a no-op.
func (p *Process) Kill() {
	p.stopOnce.Do(func() {
		p.cmd.Process.Kill()
		<-p.exited
	})
}

// Pid is the process's id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Log returns the last n bytes of the process's stdout and stderr.
func (p *Process) Log(n int) string {
	data, err := os.ReadFile(p.log)
	if err != nil {
		return err.Error()
	}
	if len(data) > n {
		data = append([]byte("…"), data[len(data)-n:]...)
	}
	return string(data)
}
