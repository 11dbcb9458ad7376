package jstest

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/proctest"
)

// serverModule is the module of nats-server: the cluster runs its program
// at the version this module builds in (go.mod), the one the embedded
// Server runs and deploy/nats deploys.
const serverModule = "github.com/nats-io/nats-server/v2"

// Cluster is a JetStream cluster of separate nats-server processes on
// loopback, configured as deploy/nats configures production (file store,
// sync_interval: always, 8 MiB payloads, routes to every server), whose
// servers a test can SIGKILL and start again on the same ports and store
// directories. Unlike Server it needs the nats-server program
// (proctest.GoBinary: go install github.com/nats-io/nats-server/v2@<the
// version in go.mod>, or scripts/test-deps): a crash of a real process is
// the point.
type Cluster struct {
	t     testing.TB
	bin   string
	nodes []*clusterNode

	// nc and js are the test's own connection (the oracle's).
	nc *nats.Conn
	js jetstream.JetStream
}

type clusterNode struct {
	name               string
	dir, conf, log     string
	port, route, httpP int

	mu   sync.Mutex
	proc *proctest.Process // nil while killed
}

// StartCluster starts n servers, waits until JetStream has a meta leader
// and every server is healthy, and connects the test. The servers stop at
// the end of the test; if it failed, the end of each server's log is
// logged.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	c := &Cluster{t: t, bin: proctest.GoBinary(t, "nats-server", serverModule, serverVersion(t))}
	dir := t.TempDir()
	routes := make([]string, n)
	for i := range n {
		nd := &clusterNode{name: fmt.Sprintf("n%d", i), port: FreePort(t), route: FreePort(t), httpP: FreePort(t)}
		nd.dir = filepath.Join(dir, nd.name)
		nd.conf = nd.dir + ".conf"
		nd.log = nd.dir + ".log"
		routes[i] = fmt.Sprintf("nats://127.0.0.1:%d", nd.route)
		c.nodes = append(c.nodes, nd)
	}
	for _, nd := range c.nodes {
		if err := os.WriteFile(nd.conf, []byte(nd.config(routes)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, nd := range c.nodes {
			nd.mu.Lock()
			if nd.proc != nil {
				nd.proc.Stop()
			}
			nd.mu.Unlock()
			if t.Failed() {
				data, _ := os.ReadFile(nd.log)
				t.Logf("nats-server %s log (end):\n%s", nd.name, tail(data, 8<<10))
			}
		}
	})
	for i := range c.nodes {
		c.launch(i)
	}
	c.nc = c.Connect("jstest")
	js, err := jetstream.New(c.nc)
	if err != nil {
		t.Fatal(err)
	}
	c.js = js
	// The servers elect a meta leader a few seconds after they meet.
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := js.AccountInfo(ctx)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("jstest: the cluster has no JetStream meta leader after 30s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for i := range c.nodes {
		c.WaitHealthy(i, 30*time.Second)
	}
	return c
}

// serverVersion is the version of nats-server that go.mod requires (the
// library the embedded Server runs), asked of the go command: a test
// binary's build info lists no dependencies.
func serverVersion(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Version}}", serverModule).Output()
	v := strings.TrimSpace(string(out))
	if err != nil || !strings.HasPrefix(v, "v") {
		t.Fatalf("jstest: go list -m %s: %q %v", serverModule, v, err)
	}
	return v
}

// config is the node's nats-server configuration: deploy/nats/nats.conf's
// settings that decide durability and sizes, on loopback ports, without
// its authorization (the test's servers take no outside connections).
func (nd *clusterNode) config(routes []string) string {
	return fmt.Sprintf(`server_name: %s
listen: 127.0.0.1:%d
http: 127.0.0.1:%d
max_payload: 8MB
jetstream {
  store_dir: %q
  # Room for meterd's streams as a test sizes them (--usage-max-bytes).
  max_file_store: 2G
  max_memory_store: 64M
  sync_interval: always
}
cluster {
  name: meterd
  listen: 127.0.0.1:%d
  no_advertise: true
  routes: [%s]
}
`, nd.name, nd.port, nd.httpP, nd.dir, nd.route, strings.Join(routes, ", "))
}

// launch starts server i and waits until it accepts client connections.
func (c *Cluster) launch(i int) {
	c.t.Helper()
	nd := c.nodes[i]
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.proc != nil {
		c.t.Fatalf("jstest: server %s already running", nd.name)
	}
	cmd := exec.Command(c.bin, "--config", nd.conf)
	addr := fmt.Sprintf("127.0.0.1:%d", nd.port)
	p, err := proctest.Launch(cmd, nd.log, func() error { return proctest.Dial(addr) }, 30*time.Second)
	if err != nil {
		c.t.Fatalf("jstest: nats-server %s: %v", nd.name, err)
	}
	nd.proc = p
}

// N is the number of servers.
func (c *Cluster) N() int { return len(c.nodes) }

// Name is the server_name of server i, as stream and consumer infos name
// their leader and replicas.
func (c *Cluster) Name(i int) string { return c.nodes[i].name }

// Index is the index of the server named name, or -1.
func (c *Cluster) Index(name string) int {
	for i, nd := range c.nodes {
		if nd.name == name {
			return i
		}
	}
	return -1
}

// URL lists the client URLs of every server, as components take them
// (--nats-url): a client whose server dies reconnects to another.
func (c *Cluster) URL() string {
	urls := make([]string, len(c.nodes))
	for i, nd := range c.nodes {
		urls[i] = fmt.Sprintf("nats://127.0.0.1:%d", nd.port)
	}
	return strings.Join(urls, ",")
}

// Kill SIGKILLs server i and waits until it is gone: acknowledged writes
// must survive on the other servers.
func (c *Cluster) Kill(i int) {
	nd := c.nodes[i]
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.proc == nil {
		c.t.Fatalf("jstest: server %s is not running", nd.name)
	}
	nd.proc.Kill()
	nd.proc = nil
}

// Start starts server i again, on its ports and store directory, and waits
// until it is healthy and every stream has caught up on it.
func (c *Cluster) Start(i int, timeout time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	c.Restart(i, timeout)
	c.WaitCurrent(i, time.Until(deadline))
}

// Restart starts server i again, on its ports and store directory, and
// waits until it is healthy, not until it is current: a follower catching up
// while a heavy load goes on may take minutes on a loaded machine (call
// WaitCurrent once the load stops).
func (c *Cluster) Restart(i int, timeout time.Duration) {
	c.t.Helper()
	c.launch(i)
	c.WaitHealthy(i, timeout)
}

// WaitCurrent waits until server i leads, or is a current follower of,
// every replicated stream: /healthz may answer 200 before a restarted
// server has learnt how far behind it is.
func (c *Cluster) WaitCurrent(i int, timeout time.Duration) {
	c.t.Helper()
	name := c.nodes[i].name
	ctx, cancel := context.WithTimeout(context.Background(), max(timeout, time.Second))
	defer cancel()
	var behind string
	for {
		behind = ""
		names := c.js.StreamNames(ctx)
		for stream := range names.Name() {
			s, err := c.js.Stream(ctx, stream)
			if err != nil {
				behind = fmt.Sprintf("%s: %v", stream, err)
				break
			}
			if !current(s.CachedInfo(), name) {
				behind = fmt.Sprintf("%s: cluster %+v", stream, s.CachedInfo().Cluster)
				break
			}
		}
		if behind == "" && names.Err() != nil {
			behind = names.Err().Error()
		}
		if behind == "" {
			return
		}
		select {
		case <-ctx.Done():
			c.t.Fatalf("jstest: nats-server %s not current within %s: %s", name, timeout, behind)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// current reports whether server leads the stream of info or follows it,
// caught up; a stream of one replica elsewhere counts as current.
func current(info *jetstream.StreamInfo, server string) bool {
	if info.Config.Replicas <= 1 {
		return true
	}
	if info.Cluster == nil || info.Cluster.Leader == "" {
		return false
	}
	if info.Cluster.Leader == server {
		return true
	}
	for _, r := range info.Cluster.Replicas {
		if r.Name == server {
			return r.Current && !r.Offline
		}
	}
	return false
}

// WaitHealthy waits until server i's /healthz answers 200: JetStream is
// on, the server is in the cluster and its streams and consumers are
// current.
func (c *Cluster) WaitHealthy(i int, timeout time.Duration) {
	c.t.Helper()
	url := fmt.Sprintf("http://127.0.0.1:%d/healthz", c.nodes[i].httpP)
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(timeout)
	for {
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("jstest: nats-server %s not healthy after %s: %v", c.nodes[i].name, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Conn is the test's own connection, which reconnects forever.
func (c *Cluster) Conn() *nats.Conn { return c.nc }

// JetStream is the JetStream context of the test's own connection.
func (c *Cluster) JetStream() jetstream.JetStream { return c.js }

// Connect opens another connection to the cluster with broker.Connect,
// closed at the end of the test.
func (c *Cluster) Connect(name string, opts ...nats.Option) *nats.Conn {
	c.t.Helper()
	return connect(c.t, c.URL(), name, opts)
}

func tail(data []byte, n int) string {
	if len(data) > n {
		data = append([]byte("…"), data[len(data)-n:]...)
	}
	return string(data)
}
