package collector

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/meterd/meterd/gate"
	"github.com/meterd/meterd/schemas"
)

// grpcEnv is a collector's gRPC ext_authz server on a loopback port, and a
// gRPC client of it over Envoy's own API types.
type grpcEnv struct {
	client authv3.AuthorizationClient
	conn   *grpc.ClientConn
	stop   context.CancelFunc
	done   chan error
	// graceExpected: the test makes ServeGRPC outlast its grace.
	graceExpected bool
}

// startGRPC serves col's ext_authz on a free loopback port until the end of
// the test (or until stop) with a shutdown grace of 10 s, and dials it.
func startGRPC(t testing.TB, col *Collector) *grpcEnv {
	t.Helper()
	return startGRPCGrace(t, col, 10*time.Second)
}

func startGRPCGrace(t testing.TB, col *Collector, grace time.Duration) *grpcEnv {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	g := &grpcEnv{stop: stop, done: make(chan error, 1)}
	go func() { g.done <- col.ServeGRPC(ctx, ln, grace) }()
	g.conn = dialGRPC(t, ln.Addr().String())
	g.client = authv3.NewAuthorizationClient(g.conn)
	t.Cleanup(func() {
		g.conn.Close()
		if err := g.shutdown(); err != nil && !g.graceExpected {
			t.Errorf("ServeGRPC: %v", err)
		}
	})
	return g
}

func dialGRPC(t testing.TB, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// shutdown stops the server and waits, at most 15 s, for ServeGRPC.
func (g *grpcEnv) shutdown() error {
	g.stop()
	select {
	case err := <-g.done:
		g.done <- err // a second call returns it again
		return err
	case <-time.After(15 * time.Second):
		return errors.New("ServeGRPC did not return 15 s after its context ended")
	}
}

// checkRequest is the CheckRequest Envoy sends for a GET /orders carrying
// headers, in the lower-cased headers map, or in header_map as with
// encode_raw_headers.
func checkRequest(headers map[string]string, raw bool) *authv3.CheckRequest {
	h := &authv3.AttributeContext_HttpRequest{
		Id: "envoy-made-id", Method: http.MethodGet, Path: "/orders?page=2", Host: "api.example.com", Protocol: "HTTP/1.1",
	}
	if raw {
		h.HeaderMap = &corev3.HeaderMap{}
		for _, k := range slices.Sorted(maps.Keys(headers)) {
			h.HeaderMap.Headers = append(h.HeaderMap.Headers, &corev3.HeaderValue{Key: strings.ToLower(k), RawValue: []byte(headers[k])})
		}
	} else {
		h.Headers = map[string]string{":method": "GET", ":path": "/orders?page=2", ":authority": "api.example.com"}
		for k, v := range headers {
			h.Headers[strings.ToLower(k)] = v
		}
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{Http: h}}}
}

func (g *grpcEnv) check(t testing.TB, headers map[string]string, raw bool) *authv3.CheckResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	resp, err := g.client.Check(ctx, checkRequest(headers, raw))
	if err != nil {
		t.Fatalf("Check %v: %v", headers, err)
	}
	return resp
}

// deniedHeaders are the headers of a denied CheckResponse by lower-cased
// name.
func deniedHeaders(d *authv3.DeniedHttpResponse) map[string][]string {
	out := map[string][]string{}
	for _, h := range d.GetHeaders() {
		out[h.GetHeader().GetKey()] = append(out[h.GetHeader().GetKey()], h.GetHeader().GetValue())
	}
	return out
}

// Every denial over gRPC is what /v1/check answers for the same headers,
// byte for byte: the HTTP status, the problem body, and every header but
// Date and Content-Length (which Envoy sets for the body it sends) —
// Content-Type, X-Content-Type-Options, Retry-After, Link. Blocked tenants
// (quota with Retry-After, unpaid without), the unknown-tenant policy, a
// stale gate under the deny policy, missing identity, and malformed
// tenant, meter and value.
func TestExtAuthzDeniedAsV1Check(t *testing.T) {
	env := newCheckEnv(t, func(c *Config) { c.UnknownTenantPolicy = gate.Deny })
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC) // the collector's clock in tests
	env.block(t, schemas.Decision{
		Tenant: "acme", Reason: schemas.ReasonQuotaExceeded, Meter: "api_calls", Limit: 1000, Used: 1004,
		PeriodStart: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC), PeriodEnd: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC),
		BillingURL: "https://billing.example.com/acme", Version: 42, DecidedAt: now,
	})
	env.block(t, schemas.Decision{Tenant: "globex", Reason: schemas.ReasonPaymentOverdue,
		BillingURL: "https://billing.example.com/globex", Version: 1, DecidedAt: now})
	g := startGRPC(t, env.col)
	stale := newStaleDenyEnv(t)
	gStale := startGRPC(t, stale.col)

	for _, tc := range []struct {
		name    string
		stale   bool
		headers map[string]string
		status  int
	}{
		{"quota exceeded", false, map[string]string{"X-Tenant-ID": "acme"}, 402},
		{"quota exceeded by API key", false, map[string]string{"Authorization": "Bearer " + ingestAcmeKey, "X-Tenant-ID": "initech"}, 402},
		{"payment overdue", false, map[string]string{"X-Tenant-ID": "globex", "X-Meter": "tokens", "X-Meter-Value": "9"}, 402},
		{"unknown tenant denied", false, map[string]string{"X-Tenant-ID": "stranger"}, 403},
		{"stale gate denies", true, map[string]string{"X-Tenant-ID": "initech"}, 503},
		{"no identity", false, map[string]string{"X-Meter": "api_calls"}, 401},
		{"unknown API key", false, map[string]string{"X-API-Key": "not-a-key-of-this-collector"}, 401},
		{"malformed tenant", false, map[string]string{"X-Tenant-ID": "no spaces"}, 400},
		{"malformed meter", false, map[string]string{"X-Tenant-ID": "initech", "X-Meter": "Bad"}, 400},
		{"negative value", false, map[string]string{"X-Tenant-ID": "initech", "X-Meter-Value": "-3"}, 400},
		{"value too large", false, map[string]string{"X-Tenant-ID": "initech", "X-Meter-Value": strconv.Itoa(schemas.MaxValue + 1)}, 400},
		{"value not a number", false, map[string]string{"X-Tenant-ID": "initech", "X-Meter-Value": "1e3"}, 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srvURL, ge := env.srv.URL, g
			if tc.stale {
				srvURL, ge = stale.srv.URL, gStale
			}
			req, _ := http.NewRequest(http.MethodGet, srvURL+"/v1/check", nil)
			for k, v := range tc.headers {
				req.Header.Set(k, v)
			}
			hresp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			hbody, _ := io.ReadAll(hresp.Body)
			hresp.Body.Close()
			if hresp.StatusCode != tc.status {
				t.Fatalf("/v1/check: status %d, want %d: %s", hresp.StatusCode, tc.status, hbody)
			}
			want := map[string][]string{}
			for k, v := range hresp.Header {
				if k != "Date" && k != "Content-Length" {
					want[strings.ToLower(k)] = v
				}
			}
			for _, raw := range []bool{false, true} {
				resp := ge.check(t, tc.headers, raw)
				d := resp.GetDeniedResponse()
				if d == nil || resp.GetStatus().GetCode() == int32(codes.OK) {
					t.Fatalf("raw %v: not denied: %v", raw, resp)
				}
				if got := int(d.GetStatus().GetCode()); got != tc.status {
					t.Errorf("raw %v: HTTP status %d, want %d", raw, got, tc.status)
				}
				if d.GetBody() != string(hbody) {
					t.Errorf("raw %v: body\n%s\nwant /v1/check's\n%s", raw, d.GetBody(), hbody)
				}
				if got := deniedHeaders(d); !maps.EqualFunc(got, want, slices.Equal) {
					t.Errorf("raw %v: headers %v, want /v1/check's %v", raw, got, want)
				}
			}
		})
	}
	// The 402's Retry-After and Link are there, not just equal.
	d := g.check(t, map[string]string{"X-Tenant-ID": "acme"}, false).GetDeniedResponse()
	if h := deniedHeaders(d); h["retry-after"][0] != "820800" || h["link"][0] != `<https://billing.example.com/acme>; rel="payment"` ||
		h["content-type"][0] != schemas.MediaProblem {
		t.Errorf("402 headers %v", h)
	}
	if n := len(env.streamEvents(t)); n != 0 {
		t.Errorf("denied checks recorded %d events", n)
	}
}

// The oracle of recording: many concurrent checks over several connections,
// allowed and blocked tenants mixed, each with its own X-Request-ID; the
// events in the stream are exactly the ids answered OK, each once, with the
// meter and value of their headers — and none of a denied call.
func TestExtAuthzAllowedCountedOnce(t *testing.T) {
	env := newCheckEnv(t, nil)
	env.block(t, schemas.Decision{Tenant: "acme", Reason: schemas.ReasonSuspended, Version: 1, DecidedAt: time.Now()})
	g := startGRPC(t, env.col)
	// More clients than connections share: several HTTP/2 connections,
	// as Envoy's worker threads open.
	clients := []authv3.AuthorizationClient{g.client}
	for range 3 {
		c := dialGRPC(t, g.conn.Target())
		t.Cleanup(func() { c.Close() })
		clients = append(clients, authv3.NewAuthorizationClient(c))
	}
	const workers, perWorker = 16, 40
	var (
		mu      sync.Mutex
		okIDs   = map[string]int{}
		denied  int
		wg      sync.WaitGroup
		errOnce sync.Once
		firstEr error
	)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := clients[w%len(clients)]
			for i := range perWorker {
				tenant := []string{"initech", "hooli", "acme"}[(w+i)%3]
				id := fmt.Sprintf("call-%d-%d", w, i)
				h := map[string]string{"X-Tenant-ID": tenant, "X-Request-ID": id, "X-Meter": "tokens", "X-Meter-Value": strconv.Itoa(i)}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				resp, err := client.Check(ctx, checkRequest(h, i%2 == 0))
				cancel()
				if err != nil {
					errOnce.Do(func() { firstEr = err })
					return
				}
				mu.Lock()
				switch c := resp.GetStatus().GetCode(); {
				case c == int32(codes.OK) && tenant != "acme":
					okIDs[tenant+"/"+id]++
				case c == int32(codes.PermissionDenied) && tenant == "acme" && resp.GetDeniedResponse().GetStatus().GetCode() == 402:
					denied++
				default:
					errOnce.Do(func() { firstEr = fmt.Errorf("%s %s: unexpected answer %v", tenant, id, resp) })
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if firstEr != nil {
		t.Fatal(firstEr)
	}
	wantDenied := 0
	for w := range workers {
		for i := range perWorker {
			if (w+i)%3 == 2 {
				wantDenied++
			}
		}
	}
	if denied != wantDenied || len(okIDs)+denied != workers*perWorker {
		t.Fatalf("%d answered OK and %d denied, want %d and %d", len(okIDs), denied, workers*perWorker-wantDenied, wantDenied)
	}
	env.waitStreamEvents(t, okIDs) // the ids answered OK, once each
	// Each event carries the meter and value of its call's headers.
	got := map[string]string{}
	env.eachStreamEvent(t, func(e schemas.Event) { got[e.Tenant+"/"+e.ID] = fmt.Sprintf("%s=%d", e.Meter, e.Value) })
	for w := range workers {
		for i := range perWorker {
			tenant := []string{"initech", "hooli", "acme"}[(w+i)%3]
			if tenant == "acme" {
				continue
			}
			if v, ok := got[tenant+"/"+fmt.Sprintf("call-%d-%d", w, i)]; !ok || v != fmt.Sprintf("tokens=%d", i) {
				t.Fatalf("%s call-%d-%d recorded as %q, want tokens=%d", tenant, w, i, v, i)
			}
		}
	}
}

// A CheckRequest without X-Request-ID gets an id of the collector's own,
// never Envoy's AttributeContext id (which a client may choose): two calls
// are two events.
func TestExtAuthzIgnoresEnvoyRequestID(t *testing.T) {
	env := newCheckEnv(t, nil)
	g := startGRPC(t, env.col)
	for range 2 {
		if resp := g.check(t, map[string]string{"X-Tenant-ID": "initech"}, false); resp.GetStatus().GetCode() != int32(codes.OK) {
			t.Fatalf("not allowed: %v", resp)
		}
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		seen := env.streamEvents(t)
		if len(seen) == 2 && seen["initech/envoy-made-id"] == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stream holds %v, want two events with ids of their own", seen)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The gRPC server's bounds: a CheckRequest over MaxRecvMsgBytes is refused
// with RESOURCE_EXHAUSTED (and records nothing); past MaxConnections a new
// connection waits until one closes.
func TestExtAuthzLimits(t *testing.T) {
	env := newCheckEnv(t, func(c *Config) { c.GRPC = GRPCLimits{MaxRecvMsgBytes: 4 << 10, MaxConnections: 1} })
	g := startGRPC(t, env.col)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	_, err := g.client.Check(ctx, checkRequest(map[string]string{"X-Tenant-ID": "initech", "X-Padding": strings.Repeat("p", 8<<10)}, false))
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("an 8 KiB CheckRequest over a 4 KiB bound: %v, want ResourceExhausted", err)
	}
	if resp := g.check(t, map[string]string{"X-Tenant-ID": "initech", "X-Request-ID": "small"}, false); resp.GetStatus().GetCode() != int32(codes.OK) {
		t.Fatalf("a small check after the refused one: %v", resp)
	}

	second := dialGRPC(t, g.conn.Target())
	defer second.Close()
	short, cancelShort := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancelShort()
	_, err = authv3.NewAuthorizationClient(second).Check(short, checkRequest(map[string]string{"X-Tenant-ID": "initech", "X-Request-ID": "second"}, false), grpc.WaitForReady(true))
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("a second connection while the one allowed is open: %v, want it to wait (DeadlineExceeded)", err)
	}
	g.conn.Close()
	ctx2, cancel2 := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel2()
	resp, err := authv3.NewAuthorizationClient(second).Check(ctx2, checkRequest(map[string]string{"X-Tenant-ID": "initech", "X-Request-ID": "second"}, false), grpc.WaitForReady(true))
	if err != nil || resp.GetStatus().GetCode() != int32(codes.OK) {
		t.Fatalf("the second connection once the first closed: %v %v", resp, err)
	}
	env.waitStreamEvents(t, map[string]int{"initech/small": 1, "initech/second": 1})
}

// Shutdown: with a client still connected, ServeGRPC returns promptly once
// its context ends (GracefulStop closes idle connections; the checks in
// flight finish), and once the client is closed no goroutine of the gRPC
// server, its connections or its listener is left.
func TestExtAuthzShutdownLeaksNothing(t *testing.T) {
	env := newCheckEnv(t, nil)
	g := startGRPC(t, env.col)
	for i := range 20 {
		if resp := g.check(t, map[string]string{"X-Tenant-ID": "initech", "X-Request-ID": fmt.Sprintf("c%d", i)}, false); resp.GetStatus().GetCode() != int32(codes.OK) {
			t.Fatalf("check %d: %v", i, resp)
		}
	}
	if len(grpcGoroutines()) == 0 {
		t.Fatal("no gRPC goroutines while serving: the leak check below would prove nothing")
	}
	start := time.Now()
	if err := g.shutdown(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("ServeGRPC took %v to stop with an idle client connected; want it well under the 10 s grace", d)
	}
	g.conn.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		left := grpcGoroutines()
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines of the gRPC server left after shutdown:\n%s", len(left), strings.Join(left, "\n\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// grpcGoroutines are the stacks of the goroutines of a gRPC server: its
// Serve loop, its connections' transports and stream handlers, the
// connection-limiting listener and ServeGRPC itself (a client's are not).
func grpcGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "grpc.(*Server)") || strings.Contains(g, "transport.(*http2Server)") ||
			strings.Contains(g, "transport.NewServerTransport") || strings.Contains(g, "golang.org/x/net/netutil") ||
			strings.Contains(g, "collector.(*Collector).ServeGRPC") || strings.Contains(g, "collector.(*extAuthz)") {
			out = append(out, g)
		}
	}
	return out
}

// heldGate allows every tenant, but only once the test releases the check:
// a check in flight for as long as the test wants.
type heldGate struct {
	entered chan struct{}
	release chan struct{}
}

func (g *heldGate) Check(string) gate.Verdict {
	g.entered <- struct{}{}
	<-g.release
	return gate.Verdict{}
}

// A check in flight when the collector stops is answered (and recorded)
// within the grace; past the grace its connection is closed, and ServeGRPC
// returns then, not when the check would have ended.
func TestExtAuthzGracefulStop(t *testing.T) {
	held := &heldGate{entered: make(chan struct{}, 1), release: make(chan struct{})}
	env := newIngestEnv(t, func(c *Config) { c.Gate = held })
	call := func(g *grpcEnv, id string) chan error {
		res := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp, err := g.client.Check(ctx, checkRequest(map[string]string{"X-Tenant-ID": "initech", "X-Request-ID": id}, false))
			if err == nil && resp.GetStatus().GetCode() != int32(codes.OK) {
				err = fmt.Errorf("not allowed: %v", resp)
			}
			res <- err
		}()
		<-held.entered
		return res
	}

	g := startGRPCGrace(t, env.col, 5*time.Second)
	res := call(g, "in-flight")
	g.stop()
	select {
	case err := <-g.done:
		t.Fatalf("ServeGRPC returned (%v) with a check in flight, within the grace", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(held.release)
	if err := <-res; err != nil {
		t.Fatalf("the check in flight at shutdown: %v, want it answered OK", err)
	}
	if err := g.shutdown(); err != nil {
		t.Fatal(err)
	}
	env.waitStreamEvents(t, map[string]int{"initech/in-flight": 1})

	held.release = make(chan struct{})
	defer close(held.release)
	g2 := startGRPCGrace(t, env.col, 300*time.Millisecond)
	g2.graceExpected = true
	res = call(g2, "past-grace")
	start := time.Now()
	if err := g2.shutdown(); err == nil || !strings.Contains(err.Error(), "after the shutdown grace") {
		t.Fatalf("ServeGRPC past its grace: %v, want the error that says so", err)
	}
	if d := time.Since(start); d < 250*time.Millisecond || d > 3*time.Second {
		t.Errorf("ServeGRPC returned %v after its context ended, want about its 300 ms grace", d)
	}
	if err := <-res; status.Code(err) != codes.Unavailable {
		t.Errorf("the check held past the grace: %v, want Unavailable (its connection closed)", err)
	}
}
