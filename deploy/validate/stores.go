package validate

import (
	"encoding/xml"
	"net/url"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/nats-io/nats-server/v2/server"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func isNATS(st *appsv1.StatefulSet) bool {
	return natsContainer(st) != nil
}

func natsContainer(st *appsv1.StatefulSet) *corev1.Container {
	for i, ct := range st.Spec.Template.Spec.Containers {
		if len(ct.Command) > 0 && ct.Command[0] == "nats-server" {
			return &st.Spec.Template.Spec.Containers[i]
		}
	}
	return nil
}

// podEnv returns the environment ct would see: literal values with
// $(VAR) references expanded, Secret values when the Secret is in the
// render (else a placeholder), and field references as of pod 0.
func (c *checker) podEnv(st *appsv1.StatefulSet, ct *corev1.Container) map[string]string {
	env := map[string]string{}
	for _, e := range ct.Env {
		switch {
		case e.ValueFrom == nil:
			v := e.Value
			for k, kv := range env {
				v = strings.ReplaceAll(v, "$("+k+")", kv)
			}
			env[e.Name] = v
		case e.ValueFrom.FieldRef != nil:
			env[e.Name] = st.Name + "-0"
		case e.ValueFrom.SecretKeyRef != nil:
			env[e.Name] = "placeholder-" + e.Name
			if sec := c.s.secret(e.ValueFrom.SecretKeyRef.Name); sec != nil {
				if v, ok := secretValue(sec, e.ValueFrom.SecretKeyRef.Key); ok {
					env[e.Name] = v
				}
			}
		default:
			env[e.Name] = "0"
		}
	}
	return env
}

// nats: the NATS cluster is what meterd's streams need (docs/architecture.md#exactly-once): at
// least 3 servers routed to each other, JetStream on a persistent volume,
// fsync before every acknowledgement, and messages as large as
// METERD_USAGE's. Its configuration is parsed by nats-server itself, so an
// unknown or misspelt setting fails here as it would fail the server.
func (c *checker) nats() {
	for _, st := range c.s.StatefulSets {
		ct := natsContainer(st)
		if ct == nil {
			continue
		}
		id := "StatefulSet/" + st.Name
		n := int(replicas(st.Spec.Replicas))
		if n < 3 {
			c.errorf("%s: %d servers; R3 streams need 3", id, n)
		}
		i := slices.Index(ct.Args, "--config")
		if i < 0 || i+1 == len(ct.Args) {
			c.errorf("%s: nats-server without --config", id)
			continue
		}
		w := workload{id: id, pod: &st.Spec.Template, sts: st}
		data, ok := c.fileData(w, id, ct, ct.Args[i+1])
		if !ok {
			continue
		}
		opts, err := c.processNATSConfig(c.tempFile("nats.conf", data), c.podEnv(st, ct))
		if err != nil {
			c.errorf("%s: nats.conf: %v", id, err)
			continue
		}
		if !opts.JetStream {
			c.errorf("%s: JetStream is off", id)
		}
		if !opts.SyncAlways {
			c.errorf("%s: JetStream acknowledges before fsync; set sync_interval: always (docs/architecture.md#exactly-once)", id)
		}
		if opts.MaxPayload < 8<<20 {
			c.errorf("%s: max_payload %d < 8 MiB, the largest batch METERD_USAGE takes", id, opts.MaxPayload)
		}
		onClaim := false
		for _, m := range ct.VolumeMounts {
			for _, t := range st.Spec.VolumeClaimTemplates {
				onClaim = onClaim || m.Name == t.Name && strings.HasPrefix(path.Clean(opts.StoreDir)+"/", path.Clean(m.MountPath)+"/")
			}
		}
		if !onClaim {
			c.errorf("%s: the JetStream store_dir %s is not on a volumeClaimTemplate", id, opts.StoreDir)
		}
		if containerPort(ct, intstrPort(opts.Port)) == 0 || containerPort(ct, intstrPort(opts.Cluster.Port)) == 0 {
			c.errorf("%s: nats.conf listens on %d (clients) and %d (routes); the container declares %v", id, opts.Port, opts.Cluster.Port, ct.Ports)
		}
		var routes, want []string
		for _, r := range opts.Routes {
			routes = append(routes, r.Host)
		}
		for i := range n {
			want = append(want, st.Name+"-"+strconv.Itoa(i)+"."+st.Spec.ServiceName+":"+strconv.Itoa(opts.Cluster.Port))
		}
		slices.Sort(routes)
		if opts.Cluster.Name == "" || !slices.Equal(routes, want) {
			c.errorf("%s: cluster %q routes %v; want one to each of the %d servers: %v", id, opts.Cluster.Name, routes, n, want)
		}
		c.headless(id, st)
		if u, where := c.meterdURL("METERD_NATS_URL"); u != nil {
			c.serviceFor(u, where, w, "client")
			pass, _ := u.User.Password()
			if !slices.ContainsFunc(opts.Users, func(usr *server.User) bool {
				return usr.Username == u.User.Username() && usr.Password == pass
			}) {
				c.errorf("%s: %s: user %q with that password is not a user of nats.conf", id, where, u.User.Username())
			}
		}
	}
}

// processNATSConfig parses a nats-server configuration file with env set,
// as the server would at start.
func (c *checker) processNATSConfig(file string, env map[string]string) (*server.Options, error) {
	for k, v := range env {
		old, had := os.LookupEnv(k)
		os.Setenv(k, v)
		defer func() {
			if had {
				os.Setenv(k, old)
			} else {
				os.Unsetenv(k)
			}
		}()
	}
	return server.ProcessConfigFile(file)
}

// headless: the StatefulSet's service publishes every pod's address, ready
// or not: servers must resolve each other to become ready.
func (c *checker) headless(id string, st *appsv1.StatefulSet) {
	for _, svc := range c.s.Services {
		if svc.Name == st.Spec.ServiceName {
			if svc.Spec.ClusterIP != corev1.ClusterIPNone || !svc.Spec.PublishNotReadyAddresses {
				c.errorf("%s: Service %s must be headless and publish not-ready addresses", id, svc.Name)
			}
			return
		}
	}
	c.errorf("%s: no Service %s", id, st.Spec.ServiceName)
}

// xmlNode is any element of a ClickHouse configuration file.
type xmlNode struct {
	XMLName xml.Name
	Attrs   []xml.Attr `xml:",any,attr"`
	Nodes   []xmlNode  `xml:",any"`
	Text    string     `xml:",chardata"`
}

func (n *xmlNode) child(name string) *xmlNode {
	for i := range n.Nodes {
		if n.Nodes[i].XMLName.Local == name {
			return &n.Nodes[i]
		}
	}
	return nil
}

func (n *xmlNode) attr(name string) string {
	for _, a := range n.Attrs {
		if a.Name.Local == name {
			return a.Value
		}
	}
	return ""
}

// clickhouse: the server's configuration files are well-formed XML, every
// password it takes from the environment is set, and meterd's DSN names a
// user of the server with that password, through its Service.
func (c *checker) clickhouse() {
	for _, st := range c.s.StatefulSets {
		for _, ct := range st.Spec.Template.Spec.Containers {
			if !strings.Contains(ct.Image, "clickhouse-server") {
				continue
			}
			id := "StatefulSet/" + st.Name
			w := workload{id: id, pod: &st.Spec.Template, sts: st}
			env := c.podEnv(st, &ct)
			passwords := map[string]string{} // user → password
			roots := c.clickhouseFiles(w, id, &ct)
			for _, root := range roots {
				users := root.child("users")
				if users == nil {
					continue
				}
				for _, u := range users.Nodes {
					p := u.child("password")
					if p == nil {
						continue
					}
					if v := p.attr("from_env"); v != "" {
						if _, ok := env[v]; !ok {
							c.errorf("%s: user %s takes its password from %s, which the container does not set", id, u.XMLName.Local, v)
						}
						passwords[u.XMLName.Local] = env[v]
					}
				}
			}
			if u, where := c.meterdURL("METERD_CLICKHOUSE"); u != nil {
				c.serviceFor(u, where, w, "native")
				c.clickhouseUser(id, where, u, passwords)
			}
			c.clickhouseCluster(st, id, &ct, env, roots)
		}
	}
}

// clickhouseFiles returns the parsed configuration files ct mounts under
// /etc/clickhouse-server/, reporting those that are not XML with a root
// <clickhouse>.
func (c *checker) clickhouseFiles(w workload, id string, ct *corev1.Container) []*xmlNode {
	var roots []*xmlNode
	for _, m := range ct.VolumeMounts {
		if !strings.HasPrefix(m.MountPath, "/etc/clickhouse-server/") || !strings.HasSuffix(m.MountPath, ".xml") {
			continue
		}
		data, ok := c.fileData(w, id, ct, m.MountPath)
		if !ok {
			continue
		}
		var root xmlNode
		if err := xml.Unmarshal(data, &root); err != nil {
			c.errorf("%s: %s: %v", id, m.MountPath, err)
			continue
		}
		if root.XMLName.Local != "clickhouse" {
			c.errorf("%s: %s: root element <%s>, want <clickhouse>", id, m.MountPath, root.XMLName.Local)
		}
		roots = append(roots, &root)
	}
	return roots
}

func (c *checker) clickhouseUser(id, where string, u *url.URL, passwords map[string]string) {
	pass, _ := u.User.Password()
	if want, ok := passwords[u.User.Username()]; !ok || want != pass {
		c.errorf("%s: %s: user %q with that password is not a user of the server", id, where, u.User.Username())
	}
	if db := strings.Trim(u.Path, "/"); db == "" {
		c.errorf("%s: %s names no database", id, where)
	}
}

func intstrPort(p int) intstr.IntOrString { return intstr.FromInt(p) }
