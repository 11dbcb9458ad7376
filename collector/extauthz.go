package collector

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"golang.org/x/net/netutil"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
)

// Defaults of GRPCLimits. Together they bound the memory the gRPC server's
// requests can hold: MaxConnections × MaxConcurrentStreams ×
// MaxRecvMsgBytes = 128 × 4 × 128 KiB = 64 MiB at worst, a quarter of the
// sidecar's 256 MiB. The bytes are spread over many connections and few
// streams each, since connections are what gateways hold open (Envoy one
// per worker thread, and each of a gateway's replicas its own).
const (
	// DefaultGRPCMaxRecvMsgBytes bounds one CheckRequest: Envoy's headers
	// (60 KiB by default, max_request_headers_kb) and their envelope fit.
	DefaultGRPCMaxRecvMsgBytes = 128 << 10
	// DefaultGRPCMaxConcurrentStreams bounds the checks one connection has
	// in flight; Envoy opens another connection past it. A check takes
	// microseconds, so 4 at once carry more than a worker thread sends.
	DefaultGRPCMaxConcurrentStreams = 4
	// DefaultGRPCMaxConnections bounds the open connections; further ones
	// wait in the listen backlog until one closes (grpcMaxConnectionIdle,
	// grpcMaxConnectionAge).
	DefaultGRPCMaxConnections = 128
	// DefaultGRPCKeepaliveMinTime is the shortest interval between a
	// client's keepalive pings; a client pinging more often is sent GOAWAY.
	// Envoy's http2 connection_keepalive interval must be at least this.
	DefaultGRPCKeepaliveMinTime = 10 * time.Second
	// grpcKeepaliveTime and grpcKeepaliveTimeout: the server pings a
	// connection idle for grpcKeepaliveTime and closes it if no answer
	// comes within grpcKeepaliveTimeout, so a gateway that vanished does
	// not hold a connection slot.
	grpcKeepaliveTime    = time.Minute
	grpcKeepaliveTimeout = 20 * time.Second
	// grpcMaxConnectionIdle and grpcMaxConnectionAge close connections
	// without calls for a while, and every connection after a while
	// (GOAWAY, its calls finish within grpcMaxConnectionAgeGrace): a
	// connection slot held by a gateway that keeps idle connections open
	// comes free for one waiting, and load spreads again after a scale-up.
	grpcMaxConnectionIdle     = 5 * time.Minute
	grpcMaxConnectionAge      = 30 * time.Minute
	grpcMaxConnectionAgeGrace = 30 * time.Second
	// grpcMaxHeaderListBytes bounds the HTTP/2 headers (gRPC metadata) of
	// one call; Envoy sends a few hundred bytes.
	grpcMaxHeaderListBytes = 16 << 10
	// grpcHandshakeTimeout bounds a new connection's HTTP/2 preface.
	grpcHandshakeTimeout = 5 * time.Second
)

// GRPCLimits bound the resources of the Envoy ext_authz gRPC server
// (ServeGRPC). Zero fields take the defaults.
type GRPCLimits struct {
	// MaxRecvMsgBytes bounds one CheckRequest (default 128 KiB); a larger
	// one is refused with RESOURCE_EXHAUSTED, which Envoy answers as a
	// failed check (403 unless failure_mode_allow).
	MaxRecvMsgBytes int
	// MaxConcurrentStreams bounds the checks in flight on one connection
	// (default 4).
	MaxConcurrentStreams uint32
	// MaxConnections bounds the open connections (default 128).
	MaxConnections int
	// KeepaliveMinTime is the shortest interval between a client's
	// keepalive pings (default 10s); pings are allowed without calls in
	// flight.
	KeepaliveMinTime time.Duration
}

func (l *GRPCLimits) validate() error {
	if l.MaxRecvMsgBytes < 0 || l.MaxConnections < 0 || l.KeepaliveMinTime < 0 {
		return errors.New("collector: gRPC limits must not be negative")
	}
	setDefault(&l.MaxRecvMsgBytes, DefaultGRPCMaxRecvMsgBytes)
	setDefault(&l.MaxConnections, DefaultGRPCMaxConnections)
	setDefault(&l.KeepaliveMinTime, DefaultGRPCKeepaliveMinTime)
	if l.MaxConcurrentStreams == 0 {
		l.MaxConcurrentStreams = DefaultGRPCMaxConcurrentStreams
	}
	return nil
}

// ServeGRPC serves envoy.service.auth.v3.Authorization/Check, Envoy's
// external authorization over gRPC (Istio's envoyExtAuthzGrpc, Emissary,
// Gloo, Contour), on ln until ctx ends. A check is answered by the very
// code of /v1/check (handleCheck), from the request headers Envoy sends:
// the same identity (API key, else the tenant header), the same price
// (X-Meter, X-Meter-Value), the same event id (X-Request-ID), the same
// policies and the same recording of an allowed call. Allowed → OK;
// anything else → denied with the HTTP status, headers and problem body
// /v1/check would send, which Envoy passes to the client.
//
// Once ctx ends, the server stops accepting and waits up to grace for the
// checks in flight; past it, it closes every connection and returns an
// error. Stop it before the collector's Run (as the HTTP server): an
// allowed call is recorded into the pipeline Run flushes. ServeGRPC closes
// ln.
func (c *Collector) ServeGRPC(ctx context.Context, ln net.Listener, grace time.Duration) error {
	if c.cfg.Gate == nil {
		ln.Close()
		return errors.New("collector: the gRPC ext_authz server needs a gate (Config.Gate)")
	}
	l := c.cfg.GRPC
	srv := grpc.NewServer(
		grpc.MaxRecvMsgSize(l.MaxRecvMsgBytes),
		grpc.MaxConcurrentStreams(l.MaxConcurrentStreams),
		grpc.MaxHeaderListSize(grpcMaxHeaderListBytes),
		grpc.ConnectionTimeout(grpcHandshakeTimeout),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: l.KeepaliveMinTime, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: grpcKeepaliveTime, Timeout: grpcKeepaliveTimeout,
			MaxConnectionIdle: grpcMaxConnectionIdle, MaxConnectionAge: grpcMaxConnectionAge, MaxConnectionAgeGrace: grpcMaxConnectionAgeGrace}),
	)
	authv3.RegisterAuthorizationServer(srv, &extAuthz{c: c})
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(netutil.LimitListener(ln, l.MaxConnections)) }()
	select {
	case err := <-errc:
		srv.Stop() // the connections the listener had accepted
		return fmt.Errorf("collector: gRPC ext_authz server: %w", err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-stopped:
	case <-timer.C:
		// As http.Server.Shutdown past its context: the connections are
		// closed and their checks' clients told, without waiting for the
		// handlers (a check never blocks, so they end at once).
		go srv.Stop()
		return fmt.Errorf("collector: gRPC ext_authz checks still in flight after the shutdown grace of %s; their connections are closed", grace)
	}
	if err := <-errc; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("collector: gRPC ext_authz server: %w", err)
	}
	return nil
}

// extAuthz is the Authorization service of ServeGRPC.
type extAuthz struct {
	authv3.UnimplementedAuthorizationServer
	c *Collector
}

// Check answers one Envoy check with handleCheck, the /v1/check handler:
// the CheckRequest becomes the HTTP request Envoy is authorizing, and what
// the handler writes becomes the CheckResponse.
func (s *extAuthz) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	var rec checkRecorder
	s.c.handleCheck(&rec, checkedRequest(ctx, req.GetAttributes().GetRequest().GetHttp()))
	return rec.response(), nil
}

// checkedRequest is the HTTP request a CheckRequest describes: its method,
// path, host and headers. Envoy sends the headers lower-cased, in headers,
// or in header_map when encode_raw_headers is set. Only headers count, as
// for /v1/check: AttributeContext.HttpRequest.id is Envoy's x-request-id,
// which the client may have chosen (Envoy keeps a client's x-request-id
// unless told otherwise), so it is not the event id unless the gateway
// lets the header itself through.
func checkedRequest(ctx context.Context, h *authv3.AttributeContext_HttpRequest) *http.Request {
	header := make(http.Header, len(h.GetHeaders())+len(h.GetHeaderMap().GetHeaders()))
	for k, v := range h.GetHeaders() {
		if !strings.HasPrefix(k, ":") { // HTTP/2 pseudo-headers are not headers
			header.Add(k, v)
		}
	}
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		if !strings.HasPrefix(hv.GetKey(), ":") {
			v := hv.GetValue()
			if raw := hv.GetRawValue(); len(raw) > 0 {
				v = string(raw)
			}
			header.Add(hv.GetKey(), v)
		}
	}
	method := h.GetMethod()
	if method == "" {
		method = http.MethodGet
	}
	u := &url.URL{Path: "/"}
	if p, err := url.ParseRequestURI(h.GetPath()); err == nil {
		u = p
	}
	r := &http.Request{Method: method, URL: u, Proto: "HTTP/2.0", ProtoMajor: 2, Header: header, Host: h.GetHost(), RequestURI: h.GetPath()}
	return r.WithContext(ctx)
}

// checkRecorder is the http.ResponseWriter handleCheck writes a gRPC
// check's answer to.
type checkRecorder struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (r *checkRecorder) Header() http.Header {
	if r.header == nil {
		r.header = http.Header{}
	}
	return r.header
}

func (r *checkRecorder) WriteHeader(status int) {
	if r.status == 0 {
		r.status = status
	}
}

func (r *checkRecorder) Write(b []byte) (int, error) {
	r.WriteHeader(http.StatusOK)
	return r.body.Write(b)
}

// response turns the recorded answer into Envoy's: 200 is OK, anything
// else is denied with that status, the headers (Content-Length aside:
// Envoy sets it for the body it sends) and the body.
func (r *checkRecorder) response() *authv3.CheckResponse {
	status := r.status
	if status == 0 {
		status = http.StatusOK
	}
	if status == http.StatusOK {
		return &authv3.CheckResponse{
			Status:       &rpcstatus.Status{Code: int32(codes.OK)},
			HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{}},
		}
	}
	denied := &authv3.DeniedHttpResponse{
		Status: &typev3.HttpStatus{Code: typev3.StatusCode(status)},
		Body:   r.body.String(),
	}
	for _, k := range slices.Sorted(maps.Keys(r.header)) {
		vs := r.header[k]
		if k == "Content-Length" {
			continue
		}
		for i, v := range vs {
			// The first value replaces what Envoy would send under that
			// name; more values (none today) are added beside it.
			action := corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
			if i > 0 {
				action = corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD
			}
			denied.Headers = append(denied.Headers, &corev3.HeaderValueOption{
				Header:       &corev3.HeaderValue{Key: strings.ToLower(k), Value: v},
				AppendAction: action,
			})
		}
	}
	return &authv3.CheckResponse{
		Status:       &rpcstatus.Status{Code: int32(grpcCode(status)), Message: http.StatusText(status)},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: denied},
	}
}

// grpcCode is the gRPC status of a denied check. Envoy denies on any code
// but OK and answers the client with DeniedHttpResponse; the code is for
// Envoy's logs and stats and for other clients of the API.
func grpcCode(status int) codes.Code {
	switch {
	case status == http.StatusUnauthorized:
		return codes.Unauthenticated
	case status == http.StatusPaymentRequired, status == http.StatusForbidden:
		return codes.PermissionDenied
	case status == http.StatusServiceUnavailable:
		return codes.Unavailable
	case status >= 400 && status < 500:
		return codes.InvalidArgument
	}
	return codes.Internal
}
