// Package validate renders meterd's kustomize trees under deploy/ and checks
// every object against the Kubernetes API types, strictly (an unknown or
// misspelt field is an error), and against the invariants meterd's
// deployment depends on (see Check).
//
// It is a module of its own so that meterd's go.mod does not grow with
// kustomize and k8s.io/api; scripts/test runs its tests.
package validate

import (
	"errors"
	"fmt"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
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
