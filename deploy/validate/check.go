package validate

import (
	"cmp"
	"fmt"
	"iter"
	"maps"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	psapi "k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"

	"github.com/meterd/meterd/internal/config"
)

// Options say what Check may assume of a render.
type Options struct {
	// Complete marks a whole installation (an overlay): every ConfigMap and
	// Secret a pod refers to must be in it, and the meterd image pinned.
	Complete bool
	// Flags are the flag names of each meterd subcommand, as `meterd CMD -h`
	// lists them. Every flag in args and every METERD_* variable in env
	// must be one: ApplyEnv ignores an unknown variable, so a misspelt
	// METERD_CLICKHOUSE_DSN would silently leave the store unset.
	Flags map[string]map[string]bool
	// Caddy, when set, is a caddy binary that parses each Caddyfile.
	Caddy string
	// TempDir holds files written for the parsers (config, nats.conf).
	TempDir string
}

// workload is a Deployment or StatefulSet, seen through what the checks need.
type workload struct {
	id       string // "Deployment/gateway"
	replicas int32
	pod      *corev1.PodTemplateSpec
	sts      *appsv1.StatefulSet // nil for a Deployment
}

func (s *Set) workloads() []workload {
	var ws []workload
	for _, d := range s.Deployments {
		ws = append(ws, workload{"Deployment/" + d.Name, replicas(d.Spec.Replicas), &d.Spec.Template, nil})
	}
	for _, st := range s.StatefulSets {
		ws = append(ws, workload{"StatefulSet/" + st.Name, replicas(st.Spec.Replicas), &st.Spec.Template, st})
	}
	return ws
}

func replicas(r *int32) int32 {
	if r == nil {
		return 1
	}
	return *r
}

// running lists the containers that run for the pod's life: the main ones
// and the native sidecars (init containers with restartPolicy Always).
func running(pod *corev1.PodSpec) []*corev1.Container {
	var cs []*corev1.Container
	for i := range pod.InitContainers {
		if c := &pod.InitContainers[i]; c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			cs = append(cs, c)
		}
	}
	for i := range pod.Containers {
		cs = append(cs, &pod.Containers[i])
	}
	return cs
}

// meterdCommands are the subcommands a deployment runs; the first arg of a
// meterd container names one.
var meterdCommands = []string{"collector", "aggregator", "enforcer"}

// defaultListen is each subcommand's --listen default.
var defaultListen = map[string]string{"collector": ":8080", "aggregator": ":8081", "enforcer": ":8082"}

// meterdCommand returns the subcommand c runs, or "": the image's
// entrypoint (or meterd named as the command) with the subcommand first in
// args.
func meterdCommand(c *corev1.Container) string {
	entry := len(c.Command) == 0 || len(c.Command) == 1 && path.Base(c.Command[0]) == "meterd"
	if entry && len(c.Args) > 0 && slices.Contains(meterdCommands, c.Args[0]) {
		return c.Args[0]
	}
	return ""
}

// meterdContainers yields each running container (see running) of a workload that
// runs meterd's subcommand cmd, or any of meterd's subcommands when cmd is
// "", with its workload.
func (s *Set) meterdContainers(cmd string) iter.Seq2[workload, *corev1.Container] {
	return func(yield func(workload, *corev1.Container) bool) {
		for _, w := range s.workloads() {
			for _, ct := range running(&w.pod.Spec) {
				if c := meterdCommand(ct); c == "" || cmd != "" && c != cmd {
					continue
				}
				if !yield(w, ct) {
					return
				}
			}
		}
	}
}

// Check lists every way the render s breaks the rules of meterd's
// deployment; none means it passes.
func Check(s *Set, o Options) []error {
	c := &checker{s: s, o: o}
	c.workloads()
	c.meterd()
	c.services()
	c.pdbs()
	c.gateway()
	c.nats()
	c.clickhouse()
	c.failover()
	if o.Complete {
		c.references()
	}
	return c.errs
}

type checker struct {
	s     *Set
	o     Options
	errs  []error
	files map[*corev1.Container]*config.File // the config file of each meterd container that has one
}

func (c *checker) errorf(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf(format, args...))
}

// psa evaluates the Pod Security Standards as the admission controller does.
var psa = func() policy.Evaluator {
	e, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		panic(err)
	}
	return e
}()

// workloads: every pod meets the "restricted" Pod Security Standard, and
// every container that runs for the pod's life has probes, resources and a
// read-only root filesystem.
func (c *checker) workloads() {
	for _, w := range c.s.workloads() {
		results := psa.EvaluatePod(psapi.LevelVersion{Level: psapi.LevelRestricted, Version: psapi.LatestVersion()}, &w.pod.ObjectMeta, &w.pod.Spec)
		if agg := policy.AggregateCheckResults(results); !agg.Allowed {
			c.errorf("%s: violates PodSecurity restricted: %s", w.id, strings.Join(agg.ForbiddenDetails, "; "))
		}
		if w.pod.Spec.AutomountServiceAccountToken == nil || *w.pod.Spec.AutomountServiceAccountToken {
			c.errorf("%s: mounts a service account token it has no use for", w.id)
		}
		for _, ct := range running(&w.pod.Spec) {
			id := w.id + " container " + ct.Name
			if ct.LivenessProbe == nil {
				c.errorf("%s: no livenessProbe", id)
			}
			if ct.ReadinessProbe == nil {
				c.errorf("%s: no readinessProbe", id)
			}
			for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
				if _, ok := ct.Resources.Requests[r]; !ok {
					c.errorf("%s: no %s request", id, r)
				}
			}
			if _, ok := ct.Resources.Limits[corev1.ResourceMemory]; !ok {
				c.errorf("%s: no memory limit", id)
			}
			if sc := ct.SecurityContext; sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				c.errorf("%s: the root filesystem is writable", id)
			}
		}
	}
}

// meterd: the rules of meterd's own containers.
func (c *checker) meterd() {
	images := map[string][]string{}
	seen := map[string]bool{}
	for w, ct := range c.s.meterdContainers("") {
		cmd := meterdCommand(ct)
		seen[cmd] = true
		id := w.id + " container " + ct.Name
		images[ct.Image] = append(images[ct.Image], id)
		if c.o.Complete {
			if tag := imageTag(ct.Image); tag == "" || tag == "latest" || tag == "main" {
				c.errorf("%s: image %s is not pinned to a release", id, ct.Image)
			}
		}
		c.flags(id, cmd, ct)
		env := envValues(ct)
		c.probes(id, cmd, ct, env)
		c.grace(w, id, ct, env)
		c.configFile(w, id, ct, env)
		if cmd == "collector" {
			c.spool(w, id, ct, env)
		}
		if cmd == "aggregator" {
			c.aggregator(w, id, ct, env)
		}
	}
	if len(images) > 1 {
		c.errorf("meterd containers use %d images, want one: %v", len(images), images)
	}
	for _, cmd := range meterdCommands {
		if len(seen) > 0 && !seen[cmd] {
			c.errorf("no container runs meterd %s", cmd)
		}
	}
}

// aggregator: a StatefulSet (stable pod names are the members' names, and
// a replacement starts once the old pod is gone); more than one replica
// only with --share-partitions, which needs ClickHouse: one writer per
// partition, never two aggregators of every partition beside each other.
func (c *checker) aggregator(w workload, id string, ct *corev1.Container, env map[string]string) {
	if w.sts == nil {
		c.errorf("%s: the aggregator must be a StatefulSet: one writer per partition (README, \"Several aggregators\"), never two at once", w.id)
		return
	}
	shared := boolSetting(ct, env, "share-partitions")
	if w.replicas > 1 && !shared {
		c.errorf("%s: %d replicas of the aggregator without --share-partitions: one would write and the others only wait; set --share-partitions to divide the partitions between them", w.id, w.replicas)
	}
	if shared && setting(ct, env, "clickhouse", "") == "" && !hasEnv(ct, "METERD_CLICKHOUSE") {
		c.errorf("%s: --share-partitions needs ClickHouse (METERD_CLICKHOUSE or --clickhouse): the embedded store has one writing process", id)
	}
}

// boolSetting reads the boolean flag name of ct: --name, --name=true or
// its METERD_ variable.
func boolSetting(ct *corev1.Container, env map[string]string, name string) bool {
	for _, a := range ct.Args {
		if n, v, hasV := strings.Cut(strings.TrimLeft(a, "-"), "="); strings.HasPrefix(a, "-") && n == name {
			return !hasV || v == "true" || v == "1"
		}
	}
	v := env[config.EnvName(name)]
	return v == "true" || v == "1"
}

// hasEnv reports whether ct sets the variable name, by value or from a
// reference.
func hasEnv(ct *corev1.Container, name string) bool {
	for _, e := range ct.Env {
		if e.Name == name {
			return true
		}
	}
	return false
}

// imageTag returns the tag of an image reference, or "" when it has none.
func imageTag(image string) string {
	name, _, _ := strings.Cut(image, "@")
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		return name[i+1:]
	}
	return ""
}

// flags: every --flag in args and METERD_* variable is a flag of cmd.
func (c *checker) flags(id, cmd string, ct *corev1.Container) {
	known := c.o.Flags[cmd]
	if known == nil {
		c.errorf("%s: no flag list for meterd %s", id, cmd)
		return
	}
	for _, a := range ct.Args[1:] {
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !known[name] {
			c.errorf("%s: %s is not a flag of meterd %s", id, a, cmd)
		}
	}
	envs := map[string]bool{}
	for f := range known {
		envs[config.EnvName(f)] = true
	}
	for _, e := range ct.Env {
		if strings.HasPrefix(e.Name, "METERD_") && !envs[e.Name] {
			c.errorf("%s: %s is not a flag of meterd %s (its variables: %s)", id, e.Name, cmd, strings.Join(slices.Sorted(maps.Keys(envs)), ", "))
		}
	}
	for _, e := range ct.EnvFrom {
		c.errorf("%s: envFrom %v hides which METERD_* variables are set; list them in env", id, e)
	}
}

// setting returns the value of flag name for ct: from args, else env, else def.
func setting(ct *corev1.Container, env map[string]string, name, def string) string {
	for i, a := range ct.Args {
		n, v, hasV := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || n != name {
			continue
		}
		if hasV {
			return v
		}
		if i+1 < len(ct.Args) {
			return ct.Args[i+1]
		}
	}
	if v, ok := env[config.EnvName(name)]; ok {
		return v
	}
	return def
}

// envValues returns the literal env values of ct.
func envValues(ct *corev1.Container) map[string]string {
	env := map[string]string{}
	for _, e := range ct.Env {
		if e.ValueFrom == nil {
			env[e.Name] = e.Value
		}
	}
	return env
}

// probes: liveness asks /healthz and readiness /readyz, on the port meterd
// listens on.
func (c *checker) probes(id, cmd string, ct *corev1.Container, env map[string]string) {
	_, port, err := net.SplitHostPort(setting(ct, env, "listen", defaultListen[cmd]))
	if err != nil {
		c.errorf("%s: --listen: %v", id, err)
		return
	}
	for _, p := range []struct {
		kind, path string
		probe      *corev1.Probe
	}{{"liveness", "/healthz", ct.LivenessProbe}, {"readiness", "/readyz", ct.ReadinessProbe}} {
		if p.probe == nil {
			continue // reported by workloads
		}
		g := p.probe.HTTPGet
		if g == nil || g.Path != p.path || strconv.Itoa(containerPort(ct, g.Port)) != port {
			c.errorf("%s: %s probe %+v; want GET %s on the port meterd listens on (%s)", id, p.kind, g, p.path, port)
		}
	}
}

// containerPort resolves a named or numbered port of ct; 0 if unknown.
func containerPort(ct *corev1.Container, p intstr.IntOrString) int {
	for _, cp := range ct.Ports {
		if p.Type == intstr.String && cp.Name == p.StrVal || p.Type == intstr.Int && cp.ContainerPort == p.IntVal {
			return int(cp.ContainerPort)
		}
	}
	return 0
}

// grace: the pod's termination grace covers meterd's shutdown: the HTTP
// grace for in-flight requests, the flush after it, and any preStop delay
// of the pod's other containers (a sidecar stops after them).
func (c *checker) grace(w workload, id string, ct *corev1.Container, env map[string]string) {
	grace, err := time.ParseDuration(setting(ct, env, "shutdown-grace", "30s"))
	if err != nil {
		c.errorf("%s: shutdown-grace: %v", id, err)
		return
	}
	var delay time.Duration
	for _, o := range running(&w.pod.Spec) {
		if o.Lifecycle != nil && o.Lifecycle.PreStop != nil && o.Lifecycle.PreStop.Sleep != nil {
			delay = max(delay, time.Duration(o.Lifecycle.PreStop.Sleep.Seconds)*time.Second)
		}
	}
	const flush = 10 * time.Second
	tgps := 30 * time.Second
	if p := w.pod.Spec.TerminationGracePeriodSeconds; p != nil {
		tgps = time.Duration(*p) * time.Second
	}
	if tgps < grace+flush+delay {
		c.errorf("%s: terminationGracePeriodSeconds %v < shutdown grace %v + %v to flush + %v preStop: SIGKILL before the flush ends", id, tgps, grace, flush, delay)
	}
}

// mountedFile finds the ConfigMap or Secret volume of w mounted so that ct
// sees it at file, and the key it shows there.
func mountedFile(w workload, ct *corev1.Container, file string) (vol *corev1.Volume, key string, ok bool) {
	for _, m := range ct.VolumeMounts {
		var rel string
		switch {
		case m.SubPath != "" && m.MountPath == file:
			rel = m.SubPath
		case m.SubPath == "" && path.Dir(file) == path.Clean(m.MountPath):
			rel = path.Base(file)
		default:
			continue
		}
		for i := range w.pod.Spec.Volumes {
			v := &w.pod.Spec.Volumes[i]
			if v.Name != m.Name {
				continue
			}
			var items []corev1.KeyToPath
			switch {
			case v.ConfigMap != nil:
				items = v.ConfigMap.Items
			case v.Secret != nil:
				items = v.Secret.Items
			default:
				return v, "", false
			}
			if len(items) == 0 {
				return v, rel, true
			}
			for _, it := range items {
				if it.Path == rel {
					return v, it.Key, true
				}
			}
			return v, "", false
		}
	}
	return nil, "", false
}

// configFile: the files named by METERD_CONFIG and METERD_API_KEYS_FILE are
// mounted, and parse with meterd's own loaders; the streams' replicas match
// the NATS cluster.
func (c *checker) configFile(w workload, id string, ct *corev1.Container, env map[string]string) {
	var file *config.File
	if p := setting(ct, env, "config", ""); p != "" {
		data, ok := c.fileData(w, id, ct, p)
		if ok {
			f, err := config.Load(c.tempFile("meterd.yaml", data))
			if err != nil {
				c.errorf("%s: %v", id, err)
			}
			file = f
			if c.files == nil {
				c.files = map[*corev1.Container]*config.File{}
			}
			c.files[ct] = f
		}
	}
	if p := setting(ct, env, "api-keys-file", ""); p != "" {
		if data, ok := c.fileData(w, id, ct, p); ok {
			keys, err := config.LoadAPIKeys(c.tempFile("api-keys.yaml", data))
			if err != nil {
				c.errorf("%s: %v", id, err)
			} else if len(keys) == 0 {
				c.errorf("%s: %s holds no keys", id, p)
			}
		}
	}
	if meterdCommand(ct) == "collector" {
		return // the collector creates no streams or buckets
	}
	want := 0
	for _, st := range c.s.StatefulSets {
		if isNATS(st) {
			want = int(replicas(st.Spec.Replicas))
		}
	}
	fileReplicas := 0
	if file != nil {
		fileReplicas = file.NATS.Replicas
	}
	got := setting(ct, env, "nats-replicas", strconv.Itoa(cmp.Or(fileReplicas, 3)))
	if want != 0 && got != strconv.Itoa(want) {
		c.errorf("%s: streams and buckets get %s replicas, but the NATS cluster has %d servers", id, got, want)
	}
}

// fileData returns the content of file as ct sees it, when the object
// holding it is in the render. A file not mounted at all is an error.
func (c *checker) fileData(w workload, id string, ct *corev1.Container, file string) ([]byte, bool) {
	v, key, ok := mountedFile(w, ct, file)
	if !ok {
		c.errorf("%s: %s is not a file of a mounted ConfigMap or Secret", id, file)
		return nil, false
	}
	switch {
	case v.ConfigMap != nil:
		if cm := c.s.configMap(v.ConfigMap.Name); cm != nil {
			d, ok := cm.Data[key]
			if !ok {
				c.errorf("%s: ConfigMap %s has no key %s for %s", id, cm.Name, key, file)
			}
			return []byte(d), ok
		}
	case v.Secret != nil:
		if sec := c.s.secret(v.Secret.SecretName); sec != nil {
			d, ok := secretValue(sec, key)
			if !ok {
				c.errorf("%s: Secret %s has no key %s for %s", id, sec.Name, key, file)
			}
			return []byte(d), ok
		}
	}
	return nil, false // not in this render: references() decides for a whole installation
}

func (c *checker) tempFile(name string, data []byte) string {
	dir, err := os.MkdirTemp(c.o.TempDir, "file")
	if err != nil {
		panic(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		panic(err)
	}
	return p
}

// spool: the collector's spool is a volume, and its bound stays below the
// volume's sizeLimit (past which the kubelet evicts the pod).
func (c *checker) spool(w workload, id string, ct *corev1.Container, env map[string]string) {
	dir := setting(ct, env, "spool-dir", "./meterd-spool")
	var vol *corev1.Volume
	for _, m := range ct.VolumeMounts {
		if path.Clean(m.MountPath) == path.Clean(dir) {
			for i := range w.pod.Spec.Volumes {
				if w.pod.Spec.Volumes[i].Name == m.Name {
					vol = &w.pod.Spec.Volumes[i]
				}
			}
		}
	}
	if vol == nil || vol.EmptyDir == nil && vol.PersistentVolumeClaim == nil && vol.Ephemeral == nil {
		c.errorf("%s: the spool %s is not on an emptyDir or persistent volume", id, dir)
		return
	}
	if vol.EmptyDir == nil || vol.EmptyDir.SizeLimit == nil {
		return
	}
	max := setting(ct, env, "spool-max-bytes", "")
	n, err := strconv.ParseInt(max, 10, 64)
	if err != nil || n <= 0 || n >= vol.EmptyDir.SizeLimit.Value() {
		c.errorf("%s: spool-max-bytes %q must be set below the spool volume's sizeLimit %s", id, max, vol.EmptyDir.SizeLimit)
	}
}

// services: each Service selects a workload's pods, on ports they have.
func (c *checker) services() {
	for _, svc := range c.s.Services {
		w := c.selected("Service/"+svc.Name, svc.Spec.Selector)
		if w == nil {
			continue
		}
		for _, p := range svc.Spec.Ports {
			tp := p.TargetPort
			if tp.Type == intstr.Int && tp.IntVal == 0 {
				tp = intstr.FromInt32(p.Port)
			}
			found := false
			for _, ct := range running(&w.pod.Spec) {
				found = found || containerPort(ct, tp) != 0
			}
			if !found {
				c.errorf("Service/%s: port %s targets %s, which no container of %s has", svc.Name, p.Name, tp.String(), w.id)
			}
		}
	}
}

// selected returns the one workload whose pods selector matches.
func (c *checker) selected(id string, selector map[string]string) *workload {
	if len(selector) == 0 {
		c.errorf("%s: empty selector", id)
		return nil
	}
	sel := labels.SelectorFromSet(selector)
	var match []workload
	for _, w := range c.s.workloads() {
		if sel.Matches(labels.Set(w.pod.Labels)) {
			match = append(match, w)
		}
	}
	if len(match) != 1 {
		c.errorf("%s: selector %v matches %d workloads, want 1", id, selector, len(match))
		return nil
	}
	return &match[0]
}

// pdbs: a PodDisruptionBudget guards a workload of several replicas (on a
// single one it would either block every drain or protect nothing).
func (c *checker) pdbs() {
	for _, p := range c.s.PDBs {
		sel, err := metav1.LabelSelectorAsMap(p.Spec.Selector)
		if err != nil {
			c.errorf("PodDisruptionBudget/%s: %v", p.Name, err)
			continue
		}
		w := c.selected("PodDisruptionBudget/"+p.Name, sel)
		if w != nil && w.replicas < 2 {
			c.errorf("PodDisruptionBudget/%s: guards %s of %d replica", p.Name, w.id, w.replicas)
		}
	}
}

// references: in a whole installation every ConfigMap and Secret a pod
// needs exists, with the keys it reads.
func (c *checker) references() {
	has := func(kind, name, key string, optional *bool) error {
		if optional != nil && *optional {
			return nil
		}
		switch kind {
		case "ConfigMap":
			cm := c.s.configMap(name)
			if cm == nil {
				return fmt.Errorf("no ConfigMap %s", name)
			}
			if _, ok := cm.Data[key]; key != "" && !ok {
				return fmt.Errorf("ConfigMap %s has no key %s", name, key)
			}
		case "Secret":
			sec := c.s.secret(name)
			if sec == nil {
				return fmt.Errorf("no Secret %s", name)
			}
			if _, ok := secretValue(sec, key); key != "" && !ok {
				return fmt.Errorf("Secret %s has no key %s", name, key)
			}
		}
		return nil
	}
	for _, w := range c.s.workloads() {
		for _, v := range w.pod.Spec.Volumes {
			var errs []error
			switch {
			case v.ConfigMap != nil:
				errs = append(errs, has("ConfigMap", v.ConfigMap.Name, "", v.ConfigMap.Optional))
				for _, it := range v.ConfigMap.Items {
					errs = append(errs, has("ConfigMap", v.ConfigMap.Name, it.Key, v.ConfigMap.Optional))
				}
			case v.Secret != nil:
				errs = append(errs, has("Secret", v.Secret.SecretName, "", v.Secret.Optional))
				for _, it := range v.Secret.Items {
					errs = append(errs, has("Secret", v.Secret.SecretName, it.Key, v.Secret.Optional))
				}
			}
			for _, err := range errs {
				if err != nil {
					c.errorf("%s volume %s: %v", w.id, v.Name, err)
				}
			}
		}
		cs := append(running(&w.pod.Spec), initOnly(&w.pod.Spec)...)
		for _, ct := range cs {
			for _, e := range ct.Env {
				var err error
				switch {
				case e.ValueFrom == nil:
				case e.ValueFrom.SecretKeyRef != nil:
					r := e.ValueFrom.SecretKeyRef
					err = has("Secret", r.Name, r.Key, r.Optional)
				case e.ValueFrom.ConfigMapKeyRef != nil:
					r := e.ValueFrom.ConfigMapKeyRef
					err = has("ConfigMap", r.Name, r.Key, r.Optional)
				}
				if err != nil {
					c.errorf("%s container %s env %s: %v", w.id, ct.Name, e.Name, err)
				}
			}
		}
	}
}

func initOnly(pod *corev1.PodSpec) []*corev1.Container {
	var cs []*corev1.Container
	for i := range pod.InitContainers {
		if c := &pod.InitContainers[i]; c.RestartPolicy == nil {
			cs = append(cs, c)
		}
	}
	return cs
}

// secretRef returns the Secret and key an env variable of ct comes from.
func secretRef(ct *corev1.Container, name string) (secret, key string) {
	for _, e := range ct.Env {
		if e.Name == name && e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			return e.ValueFrom.SecretKeyRef.Name, e.ValueFrom.SecretKeyRef.Key
		}
	}
	return "", ""
}

// meterdURL returns the value of a meterd component's variable (nats-url,
// clickhouse-dsn) parsed as a URL, when its Secret is in the render.
func (c *checker) meterdURL(variable string) (*url.URL, string) {
	for _, ct := range c.s.meterdContainers("") {
		name, key := secretRef(ct, variable)
		sec := c.s.secret(name)
		if sec == nil {
			continue
		}
		v, ok := secretValue(sec, key)
		if !ok {
			continue
		}
		u, err := url.Parse(strings.SplitN(v, ",", 2)[0])
		if err != nil {
			c.errorf("Secret %s key %s: %v", name, key, err)
			return nil, ""
		}
		return u, fmt.Sprintf("Secret %s key %s", name, key)
	}
	return nil, ""
}

// serviceFor checks that host:port of u reaches a port of the workload w
// through a Service of the render.
func (c *checker) serviceFor(u *url.URL, where string, w workload, targetName string) {
	host := strings.SplitN(u.Hostname(), ".", 2)[0]
	for _, svc := range c.s.Services {
		if svc.Name != host || !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(w.pod.Labels)) {
			continue
		}
		for _, p := range svc.Spec.Ports {
			if strconv.Itoa(int(p.Port)) == u.Port() && p.TargetPort.String() == targetName {
				return
			}
		}
	}
	c.errorf("%s: %s reaches no Service port of %s's %s", where, u.Host, w.id, targetName)
}
