package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
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
