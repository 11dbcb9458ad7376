// Package chtest gives tests a fresh database on a real ClickHouse server:
// the server at METERD_TEST_CLICKHOUSE (host:port of the native protocol)
// when it is set, or else a private clickhouse-server that the test process
// starts on first use and stops in Main. Each DSN names a new database,
// dropped when the test ends.
//
// SharedCluster gives tests a private ClickHouse cluster instead: Debian's
// zookeeper and three clickhouse-server processes, two shards of which the
// first has two replicas (cluster.go).
//
// A package using DSN or SharedCluster runs its tests through Main:
//
//	func TestMain(m *testing.M) { chtest.Main(m) }
package chtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"go.uber.org/goleak"

	"github.com/meterd/meterd/internal/proctest"
)

// EnvAddr names the environment variable that points the tests at a running
// server (host:port of its native protocol) instead of a private one.
const EnvAddr = "METERD_TEST_CLICKHOUSE"

// NotInstalled is the message of a test skipped (or, in CI, failed) because
// clickhouse-server is not installed.
const NotInstalled = "clickhouse-server not installed (apt-get install clickhouse-server)"

// ConfigFile is the server configuration a private server starts from; the
// ports and every path are overridden on the command line.
const ConfigFile = "/etc/clickhouse-server/config.xml"

const startTimeout = 60 * time.Second

var errNotInstalled = errors.New(NotInstalled)

var (
	once   sync.Once
	shared struct {
		addr  string
		admin driver.Conn
		srv   *server
		err   error
	}
)

// DSN returns clickhouse://host:port/db for a new, empty database db that is
// dropped when t ends. Without clickhouse-server it skips t, unless the
// environment variable CI is "true": CI must run every test, so there it
// installs the server with scripts/clickhouse-test-server (apt-get) and
// fails t if that does not work.
func DSN(t testing.TB) string {
	t.Helper()
	once.Do(setup)
	if err := shared.err; err != nil {
		if errors.Is(err, errNotInstalled) && os.Getenv("CI") != "true" {
			t.Skip(NotInstalled)
		}
		t.Fatalf("chtest: %v", err)
	}
	name := databaseName(t.Name())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := shared.admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("chtest: create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if err := shared.admin.Exec(ctx, "DROP DATABASE IF EXISTS "+name); err != nil {
			t.Errorf("chtest: drop database %s: %v", name, err)
		}
	})
	return "clickhouse://" + shared.addr + "/" + name
}

// Main runs the tests, stops the private server, if one was started, and
// then fails the run if a goroutine is left (goleak, with opts ignoring the
// ones the package's tests name): a test package using DSN has its
// goroutine-leak check here.
func Main(m *testing.M, opts ...goleak.Option) {
	goleak.VerifyTestMain(teardown{m}, opts...)
}

// teardown runs the tests and then closes what DSN opened, so that goleak
// does not count the server's watcher or the admin connection.
type teardown struct{ m *testing.M }

func (t teardown) Run() int {
	code := t.m.Run()
	if shared.admin != nil {
		shared.admin.Close()
	}
	if sharedCluster.c != nil {
		sharedCluster.c.Stop()
	}
	if shared.srv != nil {
		if err := shared.srv.stop(); err != nil {
			fmt.Fprintf(os.Stderr, "chtest: stop clickhouse-server: %v\n", err)
		}
	}
	return code
}

func setup() {
	shared.addr = os.Getenv(EnvAddr)
	if shared.addr == "" {
		shared.srv, shared.err = startServer()
		if shared.err != nil {
			return
		}
		shared.addr = shared.srv.addr
	}
	shared.admin, shared.err = clickhouse.Open(&clickhouse.Options{
		Addr:        []string{shared.addr},
		DialTimeout: 5 * time.Second,
	})
	if shared.err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shared.err = shared.admin.Ping(ctx)
	}
	if shared.err != nil {
		shared.err = fmt.Errorf("connect to %s: %w", shared.addr, shared.err)
	}
}

// databaseName derives a database name from a test name, unique per call.
func databaseName(test string) string {
	var b strings.Builder
	b.WriteString("t_")
	for _, r := range strings.ToLower(test) {
		if b.Len() >= 40 {
			break
		}
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	var suffix [4]byte
	rand.Read(suffix[:])
	return b.String() + "_" + hex.EncodeToString(suffix[:])
}

// startServer starts clickhouse-server on free ports with all its files in a
// temporary directory and waits until it answers. Ports are found free and
// then released, so another process may take one first: start retries.
func startServer() (*server, error) {
	bin, err := serverBinary()
	if err != nil {
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		s, err := tryStart(bin)
		if err == nil || attempt == 3 {
			return s, err
		}
	}
}

// serverBinary returns the path of clickhouse-server, installing it first
// in CI, or an error wrapping errNotInstalled.
func serverBinary() (string, error) {
	bin := proctest.Find("clickhouse-server")
	if bin == "" && os.Getenv("CI") == "true" {
		if err := install(); err != nil {
			return "", fmt.Errorf("%w; installing it failed: %v", errNotInstalled, err)
		}
		bin = proctest.Find("clickhouse-server")
	}
	if bin == "" {
		return "", errNotInstalled
	}
	if _, err := os.Stat(ConfigFile); err != nil {
		return "", fmt.Errorf("clickhouse-server is installed but its configuration is missing: %w", err)
	}
	return bin, nil
}

// install runs scripts/clickhouse-test-server of the enclosing repository,
// under a lock: the test processes of several packages may want it at once.
func install() error {
	dir, err := os.Getwd()
	if err != nil {
		return err
	}
	for {
		script := filepath.Join(dir, "scripts", "clickhouse-test-server")
		if _, err := os.Stat(script); err == nil {
			cmd := exec.Command("flock", filepath.Join(os.TempDir(), "meterd-clickhouse-install.lock"), "bash", script)
			cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
			return cmd.Run()
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return errors.New("scripts/clickhouse-test-server not found above the working directory")
		}
		dir = parent
	}
}

func tryStart(bin string) (*server, error) {
	ports, err := proctest.FreePorts(3)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "meterd-clickhouse-")
	if err != nil {
		return nil, err
	}
	s, err := launch(bin, ConfigFile, ports, dir)
	if err != nil {
		os.RemoveAll(dir)
	}
	return s, err
}

// launch runs clickhouse-server with the configuration file config on
// ports with its files in dir and waits until it answers; on failure the
// process is gone and dir is left.
func launch(bin, config string, ports []int, dir string) (*server, error) {
	// Options after "--" override the configuration file. As root, 18.16
	// runs as is; newer releases refuse only data owned by another user,
	// and this directory is the process's own.
	cmd := exec.Command(bin, "--config-file="+config, "--",
		fmt.Sprintf("--tcp_port=%d", ports[0]),
		fmt.Sprintf("--http_port=%d", ports[1]),
		fmt.Sprintf("--interserver_http_port=%d", ports[2]),
		"--listen_try=1", // do not fail on a host without ::1
		"--path="+dir+"/",
		"--tmp_path="+dir+"/tmp/",
		"--user_files_path="+dir+"/user_files/",
		"--format_schema_path="+dir+"/format_schemas/",
		"--logger.log="+dir+"/log",
		"--logger.errorlog="+dir+"/err",
	)
	cmd.Dir = dir
	addr := fmt.Sprintf("127.0.0.1:%d", ports[0])
	conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{addr}, DialTimeout: time.Second})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ping := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		return conn.Ping(ctx)
	}
	p, err := proctest.Launch(cmd, filepath.Join(dir, "stdout"), ping, startTimeout)
	if err != nil {
		// The server writes why it failed to its error log, not stdout.
		return nil, fmt.Errorf("clickhouse-server: %w; err: %s", err, tailFile(filepath.Join(dir, "err"), 2000))
	}
	return &server{Process: p, addr: addr, dir: dir}, nil
}

// server is a private clickhouse-server with its files in dir.
type server struct {
	*proctest.Process
	addr string
	dir  string
}

// stop terminates the server and removes its directory.
func (s *server) stop() error {
	s.Stop()
	return os.RemoveAll(s.dir)
}

// Server is a private clickhouse-server a fault test owns: it can be stopped
// and started again on the same address with the same data.
type Server struct {
	t     testing.TB
	bin   string
	ports []int
	dir   string
	cur   *server
}

// NewServer starts a private server for t, stopped and removed when t ends.
// Like DSN, it skips t without clickhouse-server, and in CI installs it.
func NewServer(t testing.TB) *Server {
	t.Helper()
	bin, err := serverBinary()
	if err != nil {
		if errors.Is(err, errNotInstalled) && os.Getenv("CI") != "true" {
			t.Skip(NotInstalled)
		}
		t.Fatalf("chtest: %v", err)
	}
	ports, err := proctest.FreePorts(3)
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, bin: bin, ports: ports, dir: t.TempDir()}
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

// Addr is the server's native-protocol host:port.
func (s *Server) Addr() string { return fmt.Sprintf("127.0.0.1:%d", s.ports[0]) }

// DSN names database db on the server (created by the store that opens it).
func (s *Server) DSN(db string) string { return "clickhouse://" + s.Addr() + "/" + db }

// Stop terminates the server, keeping its data; it is a no-op when stopped.
func (s *Server) Stop() {
	if s.cur != nil {
		s.cur.Stop()
		s.cur = nil
	}
}

// Start starts the server again on the same ports and data.
func (s *Server) Start() {
	s.t.Helper()
	if s.cur != nil {
		return
	}
	cur, err := launch(s.bin, ConfigFile, s.ports, s.dir)
	if err != nil {
		s.t.Fatalf("chtest: start clickhouse-server: %v", err)
	}
	s.cur = cur
}
