package validate

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// flags are the flag names of each meterd subcommand, read from the help
// of a meterd binary built from this checkout.
var flags = map[string]map[string]bool{}

// caddy is the caddy binary that parses the Caddyfiles, or "".
var caddy string

func TestMain(m *testing.M) {
	if err := readFlags(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// readFlags builds meterd as the Dockerfile does (a cached build after
// cmd/meterd's TestStaticBinary) and lists each subcommand's flags.
func readFlags() error {
	dir, err := os.MkdirTemp("", "meterd-validate")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "meterd")
	build := exec.Command("go", "build", "-mod=readonly", "-trimpath", "-o", bin, "./cmd/meterd")
	build.Dir = "../.."
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go build meterd: %v\n%s", err, out)
	}
	flagRE := regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`)
	for _, cmd := range meterdCommands {
		help := exec.Command(bin, cmd, "-h")
		help.Env = []string{} // no METERD_* from the environment
		out, err := help.CombinedOutput()
		if err != nil {
			return fmt.Errorf("meterd %s -h: %v\n%s", cmd, err, out)
		}
		flags[cmd] = map[string]bool{}
		for _, m := range flagRE.FindAllStringSubmatch(string(out), -1) {
			flags[cmd][m[1]] = true
		}
		if !flags[cmd]["listen"] || !flags[cmd]["nats-url"] {
			return fmt.Errorf("meterd %s -h lists no --listen or --nats-url:\n%s", cmd, out)
		}
	}
	return nil
}

// findCaddy returns the caddy binary, which scripts/test installs for CI;
// a run outside CI without it skips only the parse by caddy itself.
func findCaddy(t *testing.T) string {
	p, err := exec.LookPath("caddy")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("caddy is not installed (scripts/test installs Debian's caddy)")
		}
		t.Log("caddy is not installed: the Caddyfiles are checked without caddy's own parser")
		return ""
	}
	return p
}

func render(t *testing.T, dir string) *Set {
	t.Helper()
	s, err := Render(dir)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func check(t *testing.T, s *Set, complete bool) []error {
	return Check(s, Options{Complete: complete, Flags: flags, Caddy: findCaddy(t), TempDir: t.TempDir()})
}

// Every tree under deploy/ renders to objects that decode strictly into
// the Kubernetes API types and keep the rules of Check.
func TestTrees(t *testing.T) {
	for _, tc := range []struct {
		dir      string
		complete bool
		// objects by kind, so a tree that renders nothing cannot pass
		kinds map[string]int
	}{
		{"../base", false, map[string]int{"ConfigMap": 2, "Deployment": 2, "StatefulSet": 1, "Service": 4, "PodDisruptionBudget": 3}},
		{"../nats", false, map[string]int{"ConfigMap": 1, "StatefulSet": 1, "Service": 2, "PodDisruptionBudget": 1}},
		{"../clickhouse", false, map[string]int{"ConfigMap": 1, "StatefulSet": 1, "Service": 1}},
		{"../overlays/example", true, map[string]int{"Namespace": 1, "ConfigMap": 4, "Secret": 3, "Deployment": 2, "StatefulSet": 3, "Service": 7, "PodDisruptionBudget": 4}},
		{"../overlays/cluster", true, map[string]int{"Namespace": 1, "ConfigMap": 5, "Secret": 3, "Deployment": 2, "StatefulSet": 4, "Service": 8, "PodDisruptionBudget": 6}},
	} {
		t.Run(strings.TrimPrefix(tc.dir, "../"), func(t *testing.T) {
			s := render(t, tc.dir)
			if got := kinds(s); fmt.Sprint(got) != fmt.Sprint(tc.kinds) {
				t.Errorf("objects %v, want %v", got, tc.kinds)
			}
			for _, err := range check(t, s, tc.complete) {
				t.Error(err)
			}
		})
	}
}

func kinds(s *Set) map[string]int {
	m := map[string]int{}
	for _, o := range s.all() {
		m[o.kind]++
	}
	return m
}

// The example overlay changes what it says it changes: the image tag, the
// gateway's replicas and resources, the plans, and the namespace.
func TestExampleOverlay(t *testing.T) {
	base, ex := render(t, "../base"), render(t, "../overlays/example")
	gw := func(s *Set) (image string, replicas int32, mem string) {
		for _, d := range s.Deployments {
			if d.Name == "gateway" {
				c := d.Spec.Template.Spec.InitContainers[0]
				return c.Image, *d.Spec.Replicas, c.Resources.Limits.Memory().String()
			}
		}
		t.Fatal("no gateway")
		return
	}
	bi, br, bm := gw(base)
	ei, er, em := gw(ex)
	if bi != "ghcr.io/meterd/meterd:main" || ei != "ghcr.io/meterd/meterd:v0.1.0" || br != 2 || er != 3 || bm != "256Mi" || em != "384Mi" {
		t.Errorf("gateway: base %s ×%d %s, example %s ×%d %s", bi, br, bm, ei, er, em)
	}
	for _, cm := range ex.ConfigMaps {
		if strings.HasPrefix(cm.Name, "meterd-config-") && !strings.Contains(cm.Data["meterd.yaml"], "globex:") {
			t.Errorf("the example's meterd-config has not the example's tenants:\n%s", cm.Data["meterd.yaml"])
		}
		if cm.Namespace != "meterd" {
			t.Errorf("ConfigMap %s in namespace %q", cm.Name, cm.Namespace)
		}
	}
}

// The checks fail where they should: each tree under testdata/broken
// overlays the example with one mistake, and must fail with that mistake's
// error and no other.
func TestBroken(t *testing.T) {
	for _, tc := range []struct {
		dir, want string
	}{
		// strict decoding against k8s.io/api
		{"typo-field", `unknown field "spec.template.spec.containers[0].livenessProbe.httpGet.paht"`},
		{"wrong-type", `cannot unmarshal string into Go struct field`},
		{"custom-resource", `no kind "ClickHouseInstallation" is registered`},
		// the rules of Check
		{"no-probe", "Deployment/enforcer container enforcer: no readinessProbe"},
		{"env-typo", "METERD_CLICKHOUSE_DSN is not a flag of meterd enforcer"},
		{"flag-typo", "--listen-addr=:8082 is not a flag of meterd enforcer"},
		{"two-aggregators", "StatefulSet/aggregator: 2 replicas of the aggregator without --share-partitions"},
		{"aggregator-deployment", "Deployment/aggregator: the aggregator must be a StatefulSet"},
		{"caddy-remote", "forward_auth upstream collector.meterd.svc:8080; want the collector sidecar on localhost:8080"},
		{"missing-secret-key", "env METERD_CLICKHOUSE: Secret meterd-secrets-"},
		{"root-user", "violates PodSecurity restricted"},
		{"spool-too-big", "spool-max-bytes \"2147483648\" must be set below the spool volume's sizeLimit 1Gi"},
		{"config-typo", "plans.free.limts: unknown key"},
		{"nats-no-sync", "set sync_interval: always"},
		{"nats-r1", "streams and buckets get 1 replicas, but the NATS cluster has 3 servers"},
		{"nats-password", "Secret meterd-secrets-"},
		{"short-grace", "terminationGracePeriodSeconds 30s < shutdown grace 20s + 10s to flush + 5s preStop"},
		{"unpinned", "is not pinned to a release"},
		{"two-images", "meterd containers use 2 images, want one"},
		// the ClickHouse cluster (overlays/cluster with one mistake)
		{"clickhouse-one-replica", "has 1 replica(s); each shard needs at least 2"},
		{"keeper-two", "StatefulSet/clickhouse-keeper: 2 Keeper servers; a quorum that survives the loss of one needs 3"},
		{"cluster-name-typo", "--clickhouse-cluster meterdx names no cluster of StatefulSet/clickhouse's remote_servers"},
		{"cluster-not-set", "no --clickhouse-cluster, but StatefulSet/clickhouse is cluster meterd"},
		{"cluster-hosts", "cluster meterd lists replicas"},
		{"lease-too-long", "--stale-after 15s, but a takeover of the enforcer (Deployment/enforcer: lease, two polls and a heartbeat period) leaves the gates without a heartbeat for up to 17s"},
		// caddy's own parser (skipped where caddy is not installed, outside CI)
		{"caddy-syntax", "caddy adapt: "},
		{"service-port", "Service/enforcer: port http targets htp, which no container of Deployment/enforcer has"},
	} {
		t.Run(tc.dir, func(t *testing.T) {
			if tc.dir == "caddy-syntax" && findCaddy(t) == "" {
				t.Skip("caddy is not installed")
			}
			s, err := Render(filepath.Join("testdata/broken", tc.dir))
			failsWith(t, s, err, tc.want)
		})
	}
}

// failsWith checks that a whole installation fails with the error want
// and no other: its render's error err, or else the errors Check finds in
// s.
func failsWith(t *testing.T, s *Set, err error, want string) {
	t.Helper()
	var errs []error
	if err != nil {
		errs = []error{err}
	} else {
		errs = check(t, s, true)
	}
	if len(errs) == 0 {
		t.Fatalf("no error; want one mentioning %q", want)
	}
	for _, err := range errs {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %v\nwant only errors mentioning %q", err, want)
		}
	}
}
