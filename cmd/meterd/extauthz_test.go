package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	headermutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3" // the router's @type
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"gopkg.in/yaml.v3"

	"github.com/meterd/meterd/collector"
)

// grpcListenLog is the log line of the gRPC ext_authz listener and its
// address.
var grpcListenLog = regexp.MustCompile(`serving Envoy gRPC ext_authz.*addr=(\S+)`)

// `meterd dev` with collector.grpc_listen in its config file serves Envoy's
// gRPC ext_authz beside /v1/check, as Envoy calls it (the caller's API key
// in the headers): acme's calls are allowed until its quota of 3 is
// crossed, then denied with the 402 /v1/check gives; the enforcer's usage
// of acme is exactly the calls answered OK; and the listener stops with
// the process (exit 0).
func TestDevServesEnvoyGRPC(t *testing.T) {
	s := startE2EDev(t, gatewayKeysConfig+"collector:\n  grpc_listen: 127.0.0.1:0\n")
	s.auth = "Bearer " + gatewayAdminKey
	var addr string
	for deadline := time.Now().Add(5 * time.Second); addr == ""; time.Sleep(10 * time.Millisecond) {
		if m := grpcListenLog.FindStringSubmatch(s.stderr.String()); m != nil {
			addr = m[1]
		} else if time.Now().After(deadline) {
			t.Fatalf("no gRPC ext_authz listener in the log:\n%s", s.stderr.tail(8<<10))
		}
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := authv3.NewAuthorizationClient(conn)
	check := func(headers map[string]string) *authv3.CheckResponse {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		resp, err := client.Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{
			Http: &authv3.AttributeContext_HttpRequest{Method: http.MethodGet, Path: "/orders", Headers: headers},
		}}})
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}

	var allowed int64
	var denied *authv3.DeniedHttpResponse
	for i := 0; denied == nil; i++ {
		resp := check(map[string]string{"authorization": "Bearer " + gatewayAcmeKey, "x-request-id": fmt.Sprintf("envoy-acme-%d", i)})
		switch {
		case resp.GetStatus().GetCode() == int32(codes.OK):
			allowed++
		case resp.GetDeniedResponse().GetStatus().GetCode() == http.StatusPaymentRequired:
			denied = resp.GetDeniedResponse()
		default:
			t.Fatalf("call %d: %v, want OK or a 402", i, resp)
		}
		if i > 500 {
			t.Fatalf("acme: no 402 after %d allowed calls", allowed)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if allowed < 3 {
		t.Fatalf("acme denied after %d allowed calls, under its quota of 3", allowed)
	}
	a, err := fetch(s.client, http.MethodGet, s.base+"/v1/check", http.Header{"Authorization": {"Bearer " + gatewayAcmeKey}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if a.status != http.StatusPaymentRequired || string(a.body) != denied.GetBody() {
		t.Fatalf("/v1/check answers %d %s; gRPC denied with\n%s", a.status, a.body, denied.GetBody())
	}
	headers := map[string]string{}
	for _, h := range denied.GetHeaders() {
		headers[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	for _, k := range []string{"Content-Type", "Link"} {
		if got := headers[strings.ToLower(k)]; got != a.header.Get(k) {
			t.Errorf("gRPC %s %q, /v1/check's %q", k, got, a.header.Get(k))
		}
	}
	if headers["retry-after"] == "" {
		t.Error("the gRPC 402 has no Retry-After")
	}
	e2eUsage(t, s, "acme", allowed)

	s.stop()
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatalf("the gRPC listener %s still accepts after meterd dev stopped", addr)
	}
}

// Envoy and Istio cannot be installed here, so their ext_authz recipes in
// the README are decoded with Envoy's own API types (go-control-plane:
// protojson, as Envoy reads YAML, then the types' validators), and their
// money-safety rules are checked: Envoy sends meterd only the caller's API
// key; Istio, whose gRPC provider sends every header, removes the client's
// identity, price and id headers before the check; and the names that tie
// the pieces together match.
func TestEnvoyRecipesAreEnvoyConfig(t *testing.T) {
	wantSent := []string{"authorization", "x-api-key"}
	for _, heading := range []string{"### Envoy (ext_authz, HTTP service)", "### Envoy (ext_authz, gRPC service)"} {
		t.Run(heading, func(t *testing.T) {
			var recipe struct {
				HTTPFilters []any `yaml:"http_filters"`
				Clusters    []any `yaml:"clusters"`
			}
			if err := yaml.Unmarshal([]byte(readmeRecipe(t, heading, "yaml")), &recipe); err != nil {
				t.Fatal(err)
			}
			clusters := map[string]*clusterv3.Cluster{}
			for _, c := range recipe.Clusters {
				var cl clusterv3.Cluster
				envoyDecode(t, c, &cl)
				clusters[cl.GetName()] = &cl
			}
			var authz *extauthzv3.ExtAuthz
			var names []string
			for _, f := range recipe.HTTPFilters {
				var hf hcmv3.HttpFilter
				envoyDecode(t, f, &hf)
				names = append(names, hf.GetName())
				if hf.GetTypedConfig() == nil {
					t.Errorf("filter %s has no typed_config: Envoy refuses it", hf.GetName())
					continue
				}
				if hf.GetName() == "envoy.filters.http.ext_authz" {
					authz = &extauthzv3.ExtAuthz{}
					if err := hf.GetTypedConfig().UnmarshalTo(authz); err != nil {
						t.Fatal(err)
					}
				}
			}
			if authz == nil || !slices.Equal(names, []string{"envoy.filters.http.ext_authz", "envoy.filters.http.router"}) {
				t.Fatalf("filters %v, want ext_authz then the router", names)
			}
			if authz.GetFailureModeAllow() || authz.GetTransportApiVersion() != corev3.ApiVersion_V3 {
				t.Errorf("failure_mode_allow %v, transport_api_version %v; want false and V3", authz.GetFailureModeAllow(), authz.GetTransportApiVersion())
			}
			var sent []string
			for _, p := range authz.GetAllowedHeaders().GetPatterns() {
				if p.GetExact() == "" || p.GetIgnoreCase() {
					sent = append(sent, p.String()) // a prefix or regex could let a price header through
				} else {
					sent = append(sent, p.GetExact())
				}
			}
			if !slices.Equal(sent, wantSent) || len(authz.GetDisallowedHeaders().GetPatterns()) > 0 {
				t.Errorf("sends meterd %q, want only %q", sent, wantSent)
			}
			if strings.Contains(heading, "gRPC") {
				name := authz.GetGrpcService().GetEnvoyGrpc().GetClusterName()
				cl := clusters[name]
				if cl == nil {
					t.Fatalf("grpc_service names cluster %q; the recipe defines %v", name, slices.Collect(maps.Keys(clusters)))
				}
				var opts upstreamhttpv3.HttpProtocolOptions
				if err := cl.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].UnmarshalTo(&opts); err != nil {
					t.Fatalf("cluster %s: no HttpProtocolOptions: %v", name, err)
				}
				ka := opts.GetExplicitHttpConfig().GetHttp2ProtocolOptions().GetConnectionKeepalive()
				if ka == nil || ka.GetInterval().AsDuration() < collector.DefaultGRPCKeepaliveMinTime {
					t.Errorf("cluster %s: HTTP/2 keepalive %v; gRPC needs HTTP/2, and pings no more often than meterd's %v", name, ka, collector.DefaultGRPCKeepaliveMinTime)
				}
				port := cl.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetPortValue()
				if port != 9191 || authz.GetHttpService() != nil {
					t.Errorf("cluster %s on port %d (want the recipes' --grpc-listen 127.0.0.1:9191), http_service %v", name, port, authz.GetHttpService())
				}
			}
		})
	}

	t.Run("### Istio (CUSTOM authorization, gRPC)", func(t *testing.T) {
		dec := yaml.NewDecoder(strings.NewReader(readmeRecipe(t, "### Istio (CUSTOM authorization, gRPC)", "yaml")))
		docs := map[string]map[string]any{}
		for {
			var doc map[string]any
			if err := dec.Decode(&doc); err != nil {
				break
			}
			kind, _ := doc["kind"].(string)
			if _, ok := doc["meshConfig"]; ok {
				kind = "meshConfig"
			}
			docs[kind] = doc
		}
		var istio struct {
			Mesh struct {
				MeshConfig struct {
					ExtensionProviders []struct {
						Name string `yaml:"name"`
						Grpc *struct {
							Service  string `yaml:"service"`
							Port     int    `yaml:"port"`
							FailOpen bool   `yaml:"failOpen"`
						} `yaml:"envoyExtAuthzGrpc"`
					} `yaml:"extensionProviders"`
				} `yaml:"meshConfig"`
			}
			Entry struct {
				Spec struct {
					Hosts     []string            `yaml:"hosts"`
					Endpoints []map[string]string `yaml:"endpoints"`
					Ports     []struct {
						Number   int    `yaml:"number"`
						Protocol string `yaml:"protocol"`
					} `yaml:"ports"`
				} `yaml:"spec"`
			}
			Policy struct {
				Spec struct {
					Selector struct {
						MatchLabels map[string]string `yaml:"matchLabels"`
					} `yaml:"selector"`
					Action   string                `yaml:"action"`
					Provider struct{ Name string } `yaml:"provider"`
					Rules    []map[string]any      `yaml:"rules"`
				} `yaml:"spec"`
			}
			Filter struct {
				Spec struct {
					WorkloadSelector struct {
						Labels map[string]string `yaml:"labels"`
					} `yaml:"workloadSelector"`
					ConfigPatches []struct {
						ApplyTo string `yaml:"applyTo"`
						Match   struct {
							Context  string `yaml:"context"`
							Listener struct {
								FilterChain struct {
									Filter struct {
										Name      string                `yaml:"name"`
										SubFilter struct{ Name string } `yaml:"subFilter"`
									} `yaml:"filter"`
								} `yaml:"filterChain"`
							} `yaml:"listener"`
						} `yaml:"match"`
						Patch struct {
							Operation string `yaml:"operation"`
							Value     any    `yaml:"value"`
						} `yaml:"patch"`
					} `yaml:"configPatches"`
				} `yaml:"spec"`
			}
		}
		for kind, into := range map[string]any{"meshConfig": &istio.Mesh, "ServiceEntry": &istio.Entry, "AuthorizationPolicy": &istio.Policy, "EnvoyFilter": &istio.Filter} {
			doc, ok := docs[kind]
			if !ok {
				t.Fatalf("the Istio recipe has no %s", kind)
			}
			data, _ := yaml.Marshal(doc)
			if err := yaml.Unmarshal(data, into); err != nil {
				t.Fatalf("%s: %v", kind, err)
			}
		}
		providers := istio.Mesh.MeshConfig.ExtensionProviders
		if len(providers) != 1 || providers[0].Grpc == nil || providers[0].Grpc.FailOpen {
			t.Fatalf("extension providers %+v, want one envoyExtAuthzGrpc, not failing open", providers)
		}
		p := providers[0]
		e := istio.Entry.Spec
		if !slices.Equal(e.Hosts, []string{p.Grpc.Service}) || len(e.Endpoints) != 1 || e.Endpoints[0]["address"] != "127.0.0.1" ||
			len(e.Ports) != 1 || e.Ports[0].Number != p.Grpc.Port || e.Ports[0].Protocol != "GRPC" || p.Grpc.Port != 9191 {
			t.Errorf("ServiceEntry %+v does not name the collector sidecar at 127.0.0.1:%d as %q", e, p.Grpc.Port, p.Grpc.Service)
		}
		pol := istio.Policy.Spec
		if pol.Action != "CUSTOM" || pol.Provider.Name != p.Name || len(pol.Rules) != 1 || len(pol.Rules[0]) != 0 {
			t.Errorf("AuthorizationPolicy %+v, want CUSTOM with provider %q on every request", pol, p.Name)
		}
		f := istio.Filter.Spec
		if !maps.Equal(f.WorkloadSelector.Labels, pol.Selector.MatchLabels) || len(f.ConfigPatches) != 1 {
			t.Fatalf("EnvoyFilter %+v: want one patch on the workloads of the AuthorizationPolicy (%v)", f, pol.Selector.MatchLabels)
		}
		cp := f.ConfigPatches[0]
		m := cp.Match.Listener.FilterChain.Filter
		if cp.ApplyTo != "HTTP_FILTER" || cp.Match.Context != "GATEWAY" || cp.Patch.Operation != "INSERT_BEFORE" ||
			m.Name != "envoy.filters.network.http_connection_manager" || m.SubFilter.Name != "envoy.filters.http.ext_authz" {
			t.Errorf("EnvoyFilter patch %+v: want an HTTP filter inserted before the gateway's ext_authz", cp)
		}
		var hf hcmv3.HttpFilter
		envoyDecode(t, cp.Patch.Value, &hf)
		var hm headermutationv3.HeaderMutation
		if err := hf.GetTypedConfig().UnmarshalTo(&hm); err != nil {
			t.Fatalf("the EnvoyFilter's filter is not a HeaderMutation: %v", err)
		}
		var removed []string
		for _, mu := range hm.GetMutations().GetRequestMutations() {
			if mu.GetRemove() == "" {
				t.Errorf("request mutation %v is not a removal", mu)
			}
			removed = append(removed, mu.GetRemove())
		}
		if want := []string{"x-tenant-id", "x-meter", "x-meter-value", "x-request-id"}; !slices.Equal(removed, want) {
			t.Errorf("the EnvoyFilter removes %q, want %q", removed, want)
		}
	})
}

// envoyDecode reads v, a YAML value of an Envoy config, into m as Envoy
// does (proto JSON, Any resolved by its @type) and runs m's validator.
func envoyDecode(t *testing.T, v any, m interface {
	proto.Message
	ValidateAll() error
}) {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := protojson.Unmarshal(data, m); err != nil {
		t.Fatalf("not an Envoy %T: %v\n%s", m, err, data)
	}
	if err := m.ValidateAll(); err != nil {
		t.Fatalf("invalid %T: %v", m, err)
	}
}
