package chtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/meterd/meterd/internal/proctest"
)

// ClusterName is the name the private cluster has in every server's
// remote_servers.
const ClusterName = "meterd"

// ZooKeeperJar is the server of Debian's zookeeper package, which the
// cluster runs with java.
const ZooKeeperJar = "/usr/share/java/zookeeper.jar"

// ZooKeeperNotInstalled is the message of a cluster test skipped (or, in
// CI, failed) because Debian's zookeeper package is missing.
const ZooKeeperNotInstalled = "zookeeper not installed (apt-get install zookeeper; scripts/test-deps)"

// ClusterLayout is the replicas of each shard of the private cluster: two
// shards, the first with two replicas. Three clickhouse-server processes
// and a ZooKeeper is what the shared 2-core test machine runs beside the
// tests; a second replica of shard 2 would add nothing the first shard does
// not show.
var ClusterLayout = []int{2, 1}

var (
	clusterOnce   sync.Once
	sharedCluster struct {
		c   *Cluster
		err error
	}
)

// Cluster is a private ClickHouse cluster for tests: a ZooKeeper (Debian's
// zookeeper package, run with java on a free port) and clickhouse-server
// processes laid out as ClusterLayout, each on free ports with its files in
// a directory of its own, configured with remote_servers (ClusterName, one
// <shard> per shard with internal_replication), the macros shard (1, 2, …)
// and replica (r1, r2, …), ZooKeeper and distributed DDL. A test can SIGKILL
// a replica and start it again on the same ports and data.
type Cluster struct {
	dir   string
	zk    *proctest.Process
	nodes [][]*node // [shard-1][replica-1]
	admin driver.Conn
}

// node is one clickhouse-server of the cluster.
type node struct {
	mu    sync.Mutex
	bin   string
	dir   string
	ports []int
	cur   *server // nil while stopped
}

// SharedCluster returns the cluster of the test process, started on first
// use and stopped by Main. Without clickhouse-server or zookeeper it skips
// t, unless CI is "true", where it fails t.
func SharedCluster(t testing.TB) *Cluster {
	t.Helper()
	clusterOnce.Do(func() { sharedCluster.c, sharedCluster.err = StartCluster() })
	if err := sharedCluster.err; err != nil {
		if (errors.Is(err, errNotInstalled) || errors.Is(err, errZooKeeperNotInstalled)) && os.Getenv("CI") != "true" {
			t.Skip(err.Error())
		}
		t.Fatalf("chtest: cluster: %v", err)
	}
	return sharedCluster.c
}

var errZooKeeperNotInstalled = errors.New(ZooKeeperNotInstalled)

// StartCluster starts ZooKeeper and the servers of ClusterLayout and waits
// until every server answers and reaches ZooKeeper. On failure everything
// it started is stopped and the error says which process failed and ends
// with the end of its log.
func StartCluster() (*Cluster, error) {
	bin, err := serverBinary()
	if err != nil {
		return nil, err
	}
	java := proctest.Find("java")
	if _, err := os.Stat(ZooKeeperJar); err != nil || java == "" {
		return nil, errZooKeeperNotInstalled
	}
	dir, err := os.MkdirTemp("", "meterd-chcluster-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{dir: dir}
	if err := c.start(java, bin); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

func (c *Cluster) start(java, bin string) error {
	n := 1
	for _, replicas := range ClusterLayout {
		n += 3 * replicas
	}
	ports, err := proctest.FreePorts(n)
	if err != nil {
		return err
	}
	zkPort, ports := ports[0], ports[1:]
	if c.zk, err = startZooKeeper(java, filepath.Join(c.dir, "zk"), zkPort); err != nil {
		return err
	}
	for s, replicas := range ClusterLayout {
		var shard []*node
		for r := range replicas {
			nd := &node{bin: bin, dir: filepath.Join(c.dir, fmt.Sprintf("s%dr%d", s+1, r+1)), ports: ports[:3]}
			ports = ports[3:]
			shard = append(shard, nd)
		}
		c.nodes = append(c.nodes, shard)
	}
	for s, shard := range c.nodes {
		for r, nd := range shard {
			if err := nd.configure(c.remoteServers(), zkPort, s+1, r+1); err != nil {
				return err
			}
		}
	}
	// The servers start concurrently: each takes seconds.
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for _, shard := range c.nodes {
		for _, nd := range shard {
			wg.Go(func() { errs <- nd.start() })
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return err
		}
	}
	if c.admin, err = clickhouse.Open(&clickhouse.Options{Addr: []string{c.Addr(1, 1)}, DialTimeout: 5 * time.Second}); err != nil {
		return err
	}
	for s, shard := range c.nodes {
		for r := range shard {
			if err := c.waitZooKeeper(s+1, r+1); err != nil {
				return err
			}
		}
	}
	return nil
}

// waitZooKeeper waits until the server reads ZooKeeper.
func (c *Cluster) waitZooKeeper(shard, replica int) error {
	conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{c.Addr(shard, replica)}, DialTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer conn.Close()
	deadline := time.Now().Add(startTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		var n uint64
		err := conn.QueryRow(ctx, `SELECT count() FROM system.zookeeper WHERE path = '/'`).Scan(&n)
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("clickhouse-server of shard %d replica %d does not reach ZooKeeper within %s: %v; err: %s",
				shard, replica, startTimeout, err, tailFile(filepath.Join(c.nodes[shard-1][replica-1].dir, "err"), 2000))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// remoteServers is the cluster's remote_servers entry.
func (c *Cluster) remoteServers() string {
	var b strings.Builder
	b.WriteString("<" + ClusterName + ">\n")
	for _, shard := range c.nodes {
		b.WriteString("      <shard>\n        <internal_replication>true</internal_replication>\n")
		for _, nd := range shard {
			fmt.Fprintf(&b, "        <replica><host>127.0.0.1</host><port>%d</port></replica>\n", nd.ports[0])
		}
		b.WriteString("      </shard>\n")
	}
	b.WriteString("    </" + ClusterName + ">")
	return b.String()
}

// configure writes the node's configuration: copies of the system's
// config.xml and users.xml (so that config.d beside them is this node's)
// and config.d/cluster.xml.
func (nd *node) configure(remoteServers string, zkPort, shard, replica int) error {
	if err := os.MkdirAll(filepath.Join(nd.dir, "config.d"), 0o755); err != nil {
		return err
	}
	for _, f := range []string{ConfigFile, filepath.Join(filepath.Dir(ConfigFile), "users.xml")} {
		if err := copyFile(f, filepath.Join(nd.dir, filepath.Base(f))); err != nil {
			return err
		}
	}
	// <yandex> is the root 18.16 requires; current releases accept it.
	// The ports are in the file as well as on the command line: 18.16
	// decides which replicas of remote_servers are this server (is_local,
	// so that a Distributed table reads its own replica of its shard) from
	// the file alone.
	cfg := fmt.Sprintf(`<yandex>
  <tcp_port>%d</tcp_port>
  <http_port>%d</http_port>
  <interserver_http_port>%d</interserver_http_port>
  <interserver_http_host>127.0.0.1</interserver_http_host>
  <logger><level>information</level></logger>
  <remote_servers>
    %s
  </remote_servers>
  <zookeeper>
    <node><host>127.0.0.1</host><port>%d</port></node>
    <session_timeout_ms>4000</session_timeout_ms>
  </zookeeper>
  <macros>
    <shard>%d</shard>
    <replica>r%d</replica>
  </macros>
  <distributed_ddl>
    <path>/clickhouse/task_queue/ddl</path>
  </distributed_ddl>
</yandex>
`, nd.ports[0], nd.ports[1], nd.ports[2], remoteServers, zkPort, shard, replica)
	return os.WriteFile(filepath.Join(nd.dir, "config.d", "cluster.xml"), []byte(cfg), 0o644)
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// start starts the node's server; a no-op while it runs.
func (nd *node) start() error {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cur != nil {
		return nil
	}
	cur, err := launch(nd.bin, filepath.Join(nd.dir, "config.xml"), nd.ports, nd.dir)
	if err != nil {
		return fmt.Errorf("%s: %w", filepath.Base(nd.dir), err)
	}
	nd.cur = cur
	return nil
}

// Addr is the native-protocol host:port of a replica (shard and replica
// counted from 1).
func (c *Cluster) Addr(shard, replica int) string {
	return fmt.Sprintf("127.0.0.1:%d", c.nodes[shard-1][replica-1].ports[0])
}

// Shards is the number of shards.
func (c *Cluster) Shards() int { return len(c.nodes) }

// Replicas is the number of replicas of shard.
func (c *Cluster) Replicas(shard int) int { return len(c.nodes[shard-1]) }

// DSN returns clickhouse://host:port/db with the first replica of shard 1
// and a database name new to the cluster, which the store creates ON
// CLUSTER; it is dropped on every server when t ends.
func (c *Cluster) DSN(t testing.TB) string {
	t.Helper()
	name := databaseName(t.Name())
	t.Cleanup(func() {
		if t.Failed() {
			c.logErrors(t)
		}
		// Every replica must answer, or the drop waits for it.
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		ctx = clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"distributed_ddl_task_timeout": 60}))
		if err := c.admin.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" ON CLUSTER "+ClusterName); err != nil {
			t.Errorf("chtest: drop database %s on the cluster: %v", name, err)
		}
	})
	return "clickhouse://" + c.Addr(1, 1) + "/" + name
}

// logErrors logs the end of every server's error log and ZooKeeper's log.
func (c *Cluster) logErrors(t testing.TB) {
	for s, shard := range c.nodes {
		for r, nd := range shard {
			t.Logf("clickhouse-server shard %d replica %d, error log (end):\n%s", s+1, r+1, tailFile(filepath.Join(nd.dir, "err"), 4<<10))
		}
	}
	t.Logf("zookeeper log (end):\n%s", tailFile(filepath.Join(c.dir, "zk", "log"), 4<<10))
}

// Kill SIGKILLs a replica: a crash, its data left as it was on disk.
func (c *Cluster) Kill(shard, replica int) {
	nd := c.nodes[shard-1][replica-1]
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cur != nil {
		nd.cur.Kill()
		nd.cur = nil
	}
}

// Start starts a killed replica again on its ports and data and waits until
// it answers and reaches ZooKeeper.
func (c *Cluster) Start(t testing.TB, shard, replica int) {
	t.Helper()
	if err := c.nodes[shard-1][replica-1].start(); err != nil {
		t.Fatalf("chtest: start clickhouse-server: %v", err)
	}
	if err := c.waitZooKeeper(shard, replica); err != nil {
		t.Fatalf("chtest: %v", err)
	}
}

// Exec runs query on one replica.
func (c *Cluster) Exec(ctx context.Context, shard, replica int, query string) error {
	conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{c.Addr(shard, replica)}, DialTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Exec(ctx, query)
}

// Sync waits until every replica of the database's replicated tables has
// fetched what the others hold (SYSTEM SYNC REPLICA on each), so that reads
// through a Distributed table, which ask any replica, see every write.
func (c *Cluster) Sync(ctx context.Context, db string) error {
	for s, shard := range c.nodes {
		for r := range shard {
			conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{c.Addr(s+1, r+1)}, DialTimeout: 5 * time.Second})
			if err != nil {
				return err
			}
			err = syncReplica(ctx, conn, db)
			conn.Close()
			if err != nil {
				return fmt.Errorf("shard %d replica %d: %w", s+1, r+1, err)
			}
		}
	}
	return nil
}

func syncReplica(ctx context.Context, conn driver.Conn, db string) error {
	rows, err := conn.Query(ctx, `SELECT name FROM system.tables WHERE database = ? AND engine LIKE 'Replicated%'`, db)
	if err != nil {
		return err
	}
	var tables []string
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			rows.Close()
			return err
		}
		tables = append(tables, name)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	for _, tbl := range tables {
		if err := conn.Exec(ctx, "SYSTEM SYNC REPLICA "+db+"."+tbl); err != nil {
			return fmt.Errorf("sync %s: %w", tbl, err)
		}
	}
	return nil
}

// Stop stops the servers and ZooKeeper and removes their files.
func (c *Cluster) Stop() {
	if c.admin != nil {
		c.admin.Close()
	}
	var wg sync.WaitGroup
	for _, shard := range c.nodes {
		for _, nd := range shard {
			wg.Go(func() {
				nd.mu.Lock()
				defer nd.mu.Unlock()
				if nd.cur != nil {
					nd.cur.Stop()
					nd.cur = nil
				}
			})
		}
	}
	wg.Wait()
	if c.zk != nil {
		c.zk.Stop()
	}
	if os.Getenv("METERD_TEST_KEEP_CLUSTER") != "" {
		fmt.Fprintf(os.Stderr, "chtest: the cluster's files are kept in %s\n", c.dir)
		return
	}
	os.RemoveAll(c.dir)
}

// startZooKeeper runs a standalone ZooKeeper from Debian's package with its
// data and configuration in dir, on port, and waits until it serves.
func startZooKeeper(java, dir string, port int) (*proctest.Process, error) {
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o755); err != nil {
		return nil, err
	}
	cfg := fmt.Sprintf(`tickTime=500
dataDir=%s/data
clientPort=%d
clientPortAddress=127.0.0.1
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=srvr
`, dir, port)
	if err := os.WriteFile(filepath.Join(dir, "zoo.cfg"), []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	// The jar's manifest names its dependencies; slf4j-simple, where the
	// package's dependencies installed it, writes the server's log.
	cp := ZooKeeperJar
	if _, err := os.Stat("/usr/share/java/slf4j-simple.jar"); err == nil {
		cp += ":/usr/share/java/slf4j-simple.jar"
	}
	cmd := exec.Command(java, "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", cp,
		"org.apache.zookeeper.server.ZooKeeperServerMain", filepath.Join(dir, "zoo.cfg"))
	cmd.Dir = dir
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	p, err := proctest.Launch(cmd, filepath.Join(dir, "log"), func() error { return serving(addr) }, startTimeout)
	if err != nil {
		return nil, fmt.Errorf("zookeeper: %w", err)
	}
	return p, nil
}

// serving returns nil once the ZooKeeper at addr serves requests. Its
// answer to ruok ("imok") comes before that, and a clickhouse-server 18.16
// whose first session fails its handshake may crash.
func serving(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("srvr")); err != nil {
		return err
	}
	b, err := io.ReadAll(io.LimitReader(c, 4<<10))
	if err != nil {
		return err
	}
	if !strings.Contains(string(b), "Mode: standalone") {
		return fmt.Errorf("zookeeper answers srvr with %q", b)
	}
	return nil
}

// tailFile returns the last n bytes of a file.
func tailFile(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(data) > n {
		data = data[len(data)-n:]
	}
	return string(data)
}
