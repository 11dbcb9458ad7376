package validate

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// chart is meterd's Helm chart, beside the kustomize trees.
const chart = "../helm/meterd"

// completeValues are the helm arguments of a whole installation: the values of
// testdata/helm/complete.yaml (a pinned image, the Secret created by the
// chart) and the example overlay's plans and tenants.
var completeValues = []string{"-f", "testdata/helm/complete.yaml", "--set-file", "config=../overlays/example/meterd.yaml"}

// findHelm returns the helm binary: on PATH, or where scripts/test-deps
// installs it with go install (GOBIN, else GOPATH/bin), which PATH may
// lack. Without it the tests fail under CI and are skipped elsewhere.
func findHelm(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("helm"); err == nil {
		return p
	}
	out, err := exec.Command("go", "env", "GOBIN", "GOPATH").Output()
	if err == nil {
		gobin, gopath, _ := strings.Cut(string(out), "\n")
		dir := strings.TrimSpace(gobin)
		if gopath = strings.TrimSpace(gopath); dir == "" && gopath != "" {
			dir = filepath.Join(filepath.SplitList(gopath)[0], "bin")
		}
		p := filepath.Join(dir, "helm")
		if fi, err := os.Stat(p); dir != "" && err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("helm is not installed: scripts/test-deps installs it (go install helm.sh/helm/v4/cmd/helm at the version it pins)")
	}
	t.Skip("helm is not installed (scripts/test-deps installs it): the chart is not checked")
	return ""
}

func renderHelm(t *testing.T, args ...string) *Set {
	t.Helper()
	s, err := RenderHelm(findHelm(t), chart, args...)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// helm lint passes on the chart, with its defaults and with the values of
// a whole installation, warnings included (--strict).
func TestHelmLint(t *testing.T) {
	helm := findHelm(t)
	for name, args := range map[string][]string{"defaults": nil, "complete": completeValues} {
		t.Run(name, func(t *testing.T) {
			cmd := exec.Command(helm, append([]string{"lint", "--strict", chart}, args...)...)
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "1 chart(s) linted, 0 chart(s) failed") {
				t.Errorf("helm lint: %v\n%s", err, out)
			}
		})
	}
}

// helmLabels are the labels the chart gives every object's metadata by
// Helm's convention (release, chart, manager) and the base has not. The
// comparison with the base leaves them out, and nothing else.
var helmLabels = []string{"app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart"}

// With its default values the chart renders the objects of the kustomize
// base: the same kinds and names (the ConfigMaps' hashed names included),
// and each object equal to the base's once both are decoded into their
// k8s.io/api types and encoded again, so only meaning counts (key order,
// flow or block style, "1Gi" or 1073741824 do not), but for helmLabels.
func TestHelmChartMatchesBase(t *testing.T) {
	// The chart holds copies of the base's files (a chart must hold its
	// files): said first, since a change renames the ConfigMap.
	for _, f := range []struct{ copy, of string }{
		{chart + "/files/meterd.yaml", "../base/config/meterd.yaml"},
		{chart + "/files/Caddyfile", "../base/gateway/Caddyfile"},
	} {
		c, err1 := os.ReadFile(f.copy)
		o, err2 := os.ReadFile(f.of)
		if err := cmp.Or(err1, err2); err != nil {
			t.Error(err)
		} else if !bytes.Equal(c, o) {
			t.Errorf("%s is not a copy of %s: cp %[2]s %[1]s", f.copy, f.of)
		}
	}
	base, helm := objects(t, render(t, "../base")), objects(t, renderHelm(t))
	for _, id := range slices.Sorted(maps.Keys(base)) {
		if _, ok := helm[id]; !ok {
			t.Errorf("%s: in the base, not in the chart", id)
			continue
		}
		for _, d := range diff("", base[id], helm[id]) {
			t.Errorf("%s %s", id, d)
		}
	}
	for _, id := range slices.Sorted(maps.Keys(helm)) {
		if _, ok := base[id]; !ok {
			t.Errorf("%s: in the chart, not in the base", id)
		}
	}
}

// objects returns the objects of s by kind and name, each as its JSON
// encoding decoded into maps, without helmLabels.
func objects(t *testing.T, s *Set) map[string]any {
	t.Helper()
	m := map[string]any{}
	for _, o := range s.all() {
		j, err := json.Marshal(o.Object)
		if err != nil {
			t.Fatal(err)
		}
		var v map[string]any
		if err := json.Unmarshal(j, &v); err != nil {
			t.Fatal(err)
		}
		if meta, ok := v["metadata"].(map[string]any); ok {
			if labels, ok := meta["labels"].(map[string]any); ok {
				for _, l := range helmLabels {
					delete(labels, l)
				}
			}
		}
		m[o.kind+"/"+o.GetName()] = v
	}
	return m
}

// diff lists where the JSON values a (the base's) and b (the chart's)
// differ, by path.
func diff(path string, a, b any) []string {
	switch av := a.(type) {
	case map[string]any:
		bv, ok := b.(map[string]any)
		if !ok {
			break
		}
		keys := slices.Collect(maps.Keys(av))
		for k := range bv {
			if _, ok := av[k]; !ok {
				keys = append(keys, k)
			}
		}
		slices.Sort(keys)
		var out []string
		for _, k := range keys {
			out = append(out, diff(path+"."+k, av[k], bv[k])...)
		}
		return out
	case []any:
		bv, ok := b.([]any)
		if !ok || len(av) != len(bv) {
			break
		}
		var out []string
		for i := range av {
			out = append(out, diff(fmt.Sprintf("%s[%d]", path, i), av[i], bv[i])...)
		}
		return out
	default:
		if reflect.DeepEqual(a, b) {
			return nil
		}
	}
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	return []string{fmt.Sprintf("%s: base %s, chart %s", path, ja, jb)}
}

// The chart keeps every rule of Check, as the kustomize trees do: with its
// defaults (meterd's objects alone, like the base) and as a whole
// installation (its own Secret, a pinned image, the example's plans).
func TestHelmChart(t *testing.T) {
	for _, tc := range []struct {
		name     string
		args     []string
		complete bool
		kinds    map[string]int
	}{
		{"defaults", nil, false, map[string]int{"ConfigMap": 2, "Deployment": 2, "StatefulSet": 1, "Service": 4, "PodDisruptionBudget": 3}},
		{"complete", completeValues, true, map[string]int{"ConfigMap": 2, "Secret": 1, "Deployment": 2, "StatefulSet": 1, "Service": 4, "PodDisruptionBudget": 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := renderHelm(t, tc.args...)
			if got := kinds(s); fmt.Sprint(got) != fmt.Sprint(tc.kinds) {
				t.Errorf("objects %v, want %v", got, tc.kinds)
			}
			for _, err := range check(t, s, tc.complete) {
				t.Error(err)
			}
		})
	}
}

// A change of the Secret the chart creates, or of the config file, renames
// the object, so the pods that read it roll (Check's references rule sees
// that they refer to the new name).
func TestHelmChangeRenames(t *testing.T) {
	names := func(args ...string) (secret, config string) {
		s := renderHelm(t, append(slices.Clone(completeValues), args...)...)
		if len(s.Secrets) != 1 {
			t.Fatalf("%d Secrets, want 1", len(s.Secrets))
		}
		for _, cm := range s.ConfigMaps {
			if strings.HasPrefix(cm.Name, "meterd-config-") {
				config = cm.Name
			}
		}
		return s.Secrets[0].Name, config
	}
	sec, cfg := names()
	sec2, cfg2 := names("--set", "secret.natsUrl=nats://meterd:another-password@nats:4222", "--set-file", "config=../base/config/meterd.yaml")
	if !strings.HasPrefix(sec, "meterd-secrets-") || sec == sec2 || cfg == "" || cfg == cfg2 {
		t.Errorf("Secret %s then %s, ConfigMap %s then %s: want new names", sec, sec2, cfg, cfg2)
	}
}

// A bad value fails: in helm itself where the chart requires a value, else
// in the rules of Check, with that mistake's error and no other (as
// TestBroken does for the kustomize trees). Each case is a whole
// installation (complete) with one value changed.
func TestHelmBadValues(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		set        []string
	}{
		{"enforcer-replicas-0", "PodDisruptionBudget/enforcer: guards Deployment/enforcer of 0 replica",
			[]string{"--set", "enforcer.replicas=0"}},
		{"no-resources", "StatefulSet/aggregator container aggregator: no ",
			[]string{"--set", "aggregator.resources=null"}},
		{"no-caddy-limit", "Deployment/gateway container caddy: no memory limit",
			[]string{"--set", "gateway.caddy.resources.limits=null"}},
		{"spool-too-big", `spool-max-bytes "2147483648" must be set below the spool volume's sizeLimit 1Gi`,
			[]string{"--set", "gateway.spool.maxBytes=2147483648"}},
		{"env-typo", "METERD_CLICKHOUSE_DSN is not a flag of meterd enforcer",
			[]string{"--set", "enforcer.extraEnv[0].name=METERD_CLICKHOUSE_DSN,enforcer.extraEnv[0].value=clickhouse://x"}},
		{"unpinned", "image ghcr.io/meterd/meterd:latest is not pinned to a release",
			[]string{"--set", "image.tag=latest"}},
		{"config-typo", "plans.free.limts: unknown key",
			[]string{"--set-file", "config=testdata/broken/config-typo/meterd.yaml"}},
		{"bad-quantity", "quantities must match the regular expression",
			[]string{"--set", "gateway.spool.sizeLimit=1GB"}},
		{"no-nats-url", "secret.natsUrl is required with secret.create",
			[]string{"--set", "secret.natsUrl="}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := RenderHelm(findHelm(t), chart, append(slices.Clone(completeValues), tc.set...)...)
			failsWith(t, s, err, tc.want)
		})
	}
}
