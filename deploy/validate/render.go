// Package validate renders meterd's kustomize trees under deploy/ and checks
// every object against the Kubernetes API types, strictly (an unknown or
// misspelt field is an error), and against the invariants meterd's
// deployment depends on (see Check).
//
// It is a module of its own so that meterd's go.mod does not grow with
// kustomize and k8s.io/api; scripts/test runs its tests.
package validate

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// Set is a rendered kustomization, each object decoded into its
// k8s.io/api type.
type Set struct {
	Namespaces   []*corev1.Namespace
	ConfigMaps   []*corev1.ConfigMap
	Secrets      []*corev1.Secret
	Services     []*corev1.Service
	Deployments  []*appsv1.Deployment
	StatefulSets []*appsv1.StatefulSet
	PDBs         []*policyv1.PodDisruptionBudget
}

// scheme holds the only kinds deploy/ may use. A kind outside it (a custom
// resource, say) cannot be checked against k8s.io/api and is an error.
var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, policyv1.AddToScheme} {
		if err := add(s); err != nil {
			panic(err)
		}
	}
	return s
}()

// decoder fails on unknown and duplicate fields, case-sensitively.
var decoder = serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()

// Render runs kustomize on the kustomization in dir, as `kubectl apply -k
// dir` would, and strictly decodes every object it emits.
func Render(dir string) (*Set, error) {
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize %s: %w", dir, err)
	}
	s := &Set{}
	var errs []error
	for _, r := range m.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", r.CurId(), err)
		}
		if err := s.add(y); err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", r.GetKind(), r.GetName(), err))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return s, nil
}

// RenderHelm renders the Helm chart in chart with `helm template` (the
// program helm), as `helm install` would install it under the release
// name meterd, and strictly decodes every object. args go to helm after
// the chart: values files (-f) and --set.
func RenderHelm(helm, chart string, args ...string) (*Set, error) {
	cmd := exec.Command(helm, append([]string{"template", "meterd", chart}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("helm template %s: %v: %s", chart, err, strings.TrimSpace(stderr.String()))
	}
	return Decode(out)
}

// Decode strictly decodes a stream of YAML documents (as `helm template`
// or `kubectl kustomize` print them) into a Set. Documents holding only
// comments are skipped.
func Decode(data []byte) (*Set, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	s := &Set{}
	var errs []error
	for n := 1; ; n++ {
		doc, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
		if empty(doc) {
			continue
		}
		if err := s.add(doc); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", where(doc, n), err))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return s, nil
}

// empty reports whether a YAML document holds only blank lines, comments
// and document markers.
func empty(doc []byte) bool {
	for _, line := range strings.Split(string(doc), "\n") {
		if l := strings.TrimSpace(line); l != "" && l != "---" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

// where names the n-th document of a stream: by the template it came from
// when helm said so in a "# Source:" comment.
func where(doc []byte, n int) string {
	for _, line := range strings.Split(string(doc), "\n") {
		if src, ok := strings.CutPrefix(strings.TrimSpace(line), "# Source: "); ok {
			return src
		}
	}
	return fmt.Sprintf("document %d", n)
}

// add decodes one object into its typed struct.
func (s *Set) add(y []byte) error {
	obj, gvk, err := decoder.Decode(y, nil, nil)
	if err != nil {
		// A strict decoding error still returns the object: the field
		// errors are the point.
		return err
	}
	switch o := obj.(type) {
	case *corev1.Namespace:
		s.Namespaces = append(s.Namespaces, o)
	case *corev1.ConfigMap:
		s.ConfigMaps = append(s.ConfigMaps, o)
	case *corev1.Secret:
		s.Secrets = append(s.Secrets, o)
	case *corev1.Service:
		s.Services = append(s.Services, o)
	case *appsv1.Deployment:
		s.Deployments = append(s.Deployments, o)
	case *appsv1.StatefulSet:
		s.StatefulSets = append(s.StatefulSets, o)
	case *policyv1.PodDisruptionBudget:
		s.PDBs = append(s.PDBs, o)
	default:
		return fmt.Errorf("kind %s is not one deploy/ uses", gvk)
	}
	return nil
}

// object is one object of a Set, with its kind.
type object struct {
	kind string
	metav1.Object
}

// all lists every object of s, kind by kind.
func (s *Set) all() []object {
	var objs []object
	objs = appendKind(objs, "Namespace", s.Namespaces)
	objs = appendKind(objs, "ConfigMap", s.ConfigMaps)
	objs = appendKind(objs, "Secret", s.Secrets)
	objs = appendKind(objs, "Service", s.Services)
	objs = appendKind(objs, "Deployment", s.Deployments)
	objs = appendKind(objs, "StatefulSet", s.StatefulSets)
	return appendKind(objs, "PodDisruptionBudget", s.PDBs)
}

func appendKind[T metav1.Object](objs []object, kind string, of []T) []object {
	for _, o := range of {
		objs = append(objs, object{kind, o})
	}
	return objs
}

// configMap returns the ConfigMap called name, or nil.
func (s *Set) configMap(name string) *corev1.ConfigMap { return byName(s.ConfigMaps, name) }

// secret returns the Secret called name, or nil.
func (s *Set) secret(name string) *corev1.Secret { return byName(s.Secrets, name) }

// byName returns the object of objs called name, or nil.
func byName[T interface{ GetName() string }](objs []T, name string) T {
	for _, o := range objs {
		if o.GetName() == name {
			return o
		}
	}
	var none T
	return none
}

// secretValue returns a Secret's key from data or stringData.
func secretValue(sec *corev1.Secret, key string) (string, bool) {
	if v, ok := sec.Data[key]; ok {
		return string(v), true
	}
	v, ok := sec.StringData[key]
	return v, ok
}
