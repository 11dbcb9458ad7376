package validate

import (
	"cmp"
	"slices"
	"strconv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// text returns the text of n's element of that name ("" if none).
func (n *xmlNode) text(name string) string {
	if c := n.child(name); c != nil {
		return strings.TrimSpace(c.Text)
	}
	return ""
}

// clickhouseCluster: a ClickHouse StatefulSet of more than one server is a
// replicated cluster meterd can run on (aggregator/clickhouse, "On a
// cluster"): remote_servers lists its pods, in ordinal order, as shards of
// CLICKHOUSE_REPLICAS_PER_SHARD replicas each (the ordinal makes the shard
// macro), at least 2 per shard so a replica's loss loses nothing; the
// shard and replica macros are set; the servers coordinate through every
// server of a Keeper (or ZooKeeper) StatefulSet of at least 3, an odd
// number, so a quorum survives the loss of one; and every meterd component
// that names a cluster names that one, and none leaves it out.
func (c *checker) clickhouseCluster(st *appsv1.StatefulSet, id string, ct *corev1.Container, env map[string]string, roots []*xmlNode) {
	var clusters []*xmlNode
	var keeper, macros *xmlNode
	for _, root := range roots {
		if rs := root.child("remote_servers"); rs != nil {
			for i := range rs.Nodes {
				clusters = append(clusters, &rs.Nodes[i])
			}
		}
		keeper = cmp.Or(root.child("zookeeper"), keeper)
		macros = cmp.Or(root.child("macros"), macros)
	}
	n := int(replicas(st.Spec.Replicas))
	if len(clusters) == 0 {
		if n > 1 {
			c.errorf("%s: %d ClickHouse servers but no cluster in remote_servers: meterd writes one database on one server, or a replicated cluster", id, n)
		}
		c.meterdCluster(id, nil)
		return
	}
	perShard, err := strconv.Atoi(env["CLICKHOUSE_REPLICAS_PER_SHARD"])
	if err != nil || perShard < 1 {
		c.errorf("%s: CLICKHOUSE_REPLICAS_PER_SHARD %q: the start command makes the shard macro from it and the pod's ordinal", id, env["CLICKHOUSE_REPLICAS_PER_SHARD"])
		return
	}
	if macros == nil || macros.child("shard") == nil || macros.child("replica") == nil {
		c.errorf("%s: the macros shard and replica are not set; the replicated tables' paths need them", id)
	}
	var names []string
	for _, cl := range clusters {
		name := cl.XMLName.Local
		names = append(names, name)
		var hosts []string
		shard := 0
		for _, sh := range cl.Nodes {
			if sh.XMLName.Local != "shard" {
				continue
			}
			shard++
			var reps []string
			for _, r := range sh.Nodes {
				if r.XMLName.Local == "replica" {
					reps = append(reps, r.text("host")+":"+r.text("port"))
				}
			}
			if len(reps) < 2 {
				c.errorf("%s: cluster %s shard %d has %d replica(s); each shard needs at least 2, so that losing a replica loses nothing", id, name, shard, len(reps))
			} else if len(reps) != perShard {
				c.errorf("%s: cluster %s shard %d has %d replicas, but CLICKHOUSE_REPLICAS_PER_SHARD is %d", id, name, shard, len(reps), perShard)
			}
			if sh.text("internal_replication") != "true" {
				c.errorf("%s: cluster %s shard %d: set internal_replication true; the tables replicate themselves", id, name, shard)
			}
			hosts = append(hosts, reps...)
		}
		if want := podAddrs(st, containerPort(ct, intstrPort(9000))); !slices.Equal(hosts, want) {
			c.errorf("%s: cluster %s lists replicas %v; want the StatefulSet's %d pods in ordinal order, %d per shard: %v", id, name, hosts, n, perShard, want)
		}
	}
	c.keeper(id, keeper)
	c.meterdCluster(id, names)
}

// keeper: the servers' <zookeeper> lists every server of a Keeper or
// ZooKeeper StatefulSet of at least 3 (an odd number), and nothing else.
func (c *checker) keeper(id string, zk *xmlNode) {
	if zk == nil {
		c.errorf("%s: no <zookeeper>: replicated tables and ON CLUSTER need ClickHouse Keeper or ZooKeeper", id)
		return
	}
	var nodes []string
	for _, nd := range zk.Nodes {
		if nd.XMLName.Local == "node" {
			nodes = append(nodes, nd.text("host")+":"+nd.text("port"))
		}
	}
	for _, st := range c.s.StatefulSets {
		var port int
		for _, ct := range st.Spec.Template.Spec.Containers {
			if strings.Contains(ct.Image, "clickhouse-keeper") || strings.Contains(ct.Image, "zookeeper") {
				port = containerPort(&ct, intstr.FromString("client"))
			}
		}
		if port == 0 {
			continue
		}
		kid := "StatefulSet/" + st.Name
		k := int(replicas(st.Spec.Replicas))
		if k < 3 || k%2 == 0 {
			c.errorf("%s: %d Keeper servers; a quorum that survives the loss of one needs 3 (or 5, an odd number)", kid, k)
			return
		}
		if want := podAddrs(st, port); !slices.Equal(nodes, want) {
			c.errorf("%s: <zookeeper> lists %v; want every server of %s: %v", id, nodes, kid, want)
		}
		c.headless(kid, st)
		return
	}
	if len(nodes) < 3 {
		c.errorf("%s: <zookeeper> lists %d servers and the render has no Keeper StatefulSet; a quorum needs 3", id, len(nodes))
	}
}

// podAddrs returns host:port of each pod of the StatefulSet st, in ordinal
// order, by its stable name under the governing Service.
func podAddrs(st *appsv1.StatefulSet, port int) []string {
	var out []string
	for i := range int(replicas(st.Spec.Replicas)) {
		out = append(out, st.Name+"-"+strconv.Itoa(i)+"."+st.Spec.ServiceName+":"+strconv.Itoa(port))
	}
	return out
}

// meterdCluster: every meterd component with a ClickHouse DSN names one of
// the clusters (--clickhouse-cluster), or none if there is none.
func (c *checker) meterdCluster(id string, clusters []string) {
	for w, ct := range c.s.meterdContainers("") {
		if !hasEnv(ct, "METERD_CLICKHOUSE") {
			continue
		}
		env := envValues(ct)
		name := setting(ct, env, "clickhouse-cluster", "")
		where := w.id + " container " + ct.Name
		switch {
		case name == "" && len(clusters) > 0:
			c.errorf("%s: no --clickhouse-cluster, but %s is cluster %s: its tables would not be replicated", where, id, strings.Join(clusters, ", "))
		case name != "" && !slices.Contains(clusters, name):
			c.errorf("%s: --clickhouse-cluster %s names no cluster of %s's remote_servers (%s)", where, name, id, strings.Join(clusters, ", "))
		}
		if meterdCommand(ct) == "aggregator" && name != "" {
			if s, err := strconv.Atoi(setting(ct, env, "clickhouse-shard", "1")); err != nil || s < 1 {
				c.errorf("%s: --clickhouse-shard %q: a shard number from 1", where, setting(ct, env, "clickhouse-shard", "1"))
			}
		}
	}
}
