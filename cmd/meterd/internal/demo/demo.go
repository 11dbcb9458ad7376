// Package demo is `meterd demo`: the whole pipeline in one process, a
// simulated gateway and billing provider in front of it, and the reports
// that show every allowed call counted once.
package demo

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meterd/meterd/aggregator/report"
	"github.com/meterd/meterd/cmd/meterd/internal/cli"
	"github.com/meterd/meterd/enforcer"
)

// The demo's catalog: two plans, four tenants, keys and a webhook secret.
const (
	adminKey      = "demo-admin-key-0000000000"
	webhookSecret = "whsec_demo"
	freeLimit     = 500
)

var configYAML = fmt.Sprintf(`plans:
  free: {period: monthly, limits: {api_calls: %d}, on_exceed: block}
  pro:  {period: monthly, limits: {api_calls: 1000000, tokens: 5000000}, on_exceed: overage}
tenants:
  acme:     {plan: free, billing_url: "https://billing.example.com/acme"}
  globex:   {plan: free, billing_url: "https://billing.example.com/globex"}
  initech:  {plan: pro,  billing_url: "https://billing.example.com/initech"}
  umbrella: {plan: pro,  customer_id: cus_umbrella, billing_url: "https://billing.example.com/umbrella"}
api_keys:
  - {key: %s, admin: true}
enforcer:
  webhook_secret: %s
  heartbeat_every: 1s
`, freeLimit, adminKey, webhookSecret)

// tenant is a tenant the simulated gateway sends calls for.
type tenant struct {
	name   string
	plan   string
	rate   int // calls per second
	model  string
	ok     atomic.Int64
	denied atomic.Int64
	tokens atomic.Int64
	errors atomic.Int64 // calls without an answer
	// lostTokens is set when a batch of token events was not accepted.
	lostTokens atomic.Bool
}

// Dev runs `meterd dev` with args and returns its exit code. Once it
// serves, it prints "listening on http://ADDR" on stdout.
type Dev func(ctx context.Context, args []string, stdout, stderr io.Writer) int

// Run runs `meterd demo`: the whole pipeline in this process on embedded
// defaults, started with dev, a simulated gateway and billing provider in
// front, and the reports at the end.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer, dev Dev) error {
	fs := flag.NewFlagSet("meterd demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	seconds := fs.Duration("traffic", 6*time.Second, "how long the simulated gateway sends calls")
	keep := fs.Bool("keep", false, "keep the data directory (and its log) at the end")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	start := time.Now()
	out := &printer{w: stdout, start: start}

	dir, err := os.MkdirTemp("", "meterd-demo-")
	if err != nil {
		return err
	}
	logPath := filepath.Join(dir, "meterd.log")
	failed := true
	defer func() {
		if failed || *keep {
			fmt.Fprintf(stdout, "\nData and log kept in %s\n", dir)
			return
		}
		os.RemoveAll(dir)
	}()
	cfgPath := filepath.Join(dir, "meterd.yaml")
	if err := os.WriteFile(cfgPath, []byte(configYAML), 0o600); err != nil {
		return err
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()

	out.title("meterd demo: the whole pipeline in this process, on embedded defaults")
	out.say("embedded JetStream, collector with the gate, aggregator (embedded store), enforcer; logs in %s", logPath)
	out.say("plans:   free = %d api_calls a month, blocked beyond · pro = 1,000,000 api_calls + 5,000,000 tokens, overage beyond", freeLimit)
	out.say("tenants: acme, globex (free) · initech, umbrella (pro; umbrella pays through Stripe as cus_umbrella)")

	devCtx, stopDev := context.WithCancel(context.WithoutCancel(ctx))
	defer stopDev()
	addrs := make(chan string, 1)
	devDone := make(chan error, 1)
	go func() {
		code := dev(devCtx, []string{"--listen", "127.0.0.1:0", "--data-dir", filepath.Join(dir, "data"),
			"--config", cfgPath, "--log-format", "text", "--shutdown-grace", "5s"}, &addrWriter{ch: addrs}, logFile)
		if code != 0 {
			devDone <- fmt.Errorf("meterd dev exited with %d; see %s", code, logPath)
		}
		close(devDone)
	}()
	var base string
	select {
	case addr := <-addrs:
		base = "http://" + addr
	case err := <-devDone:
		return cmp.Or(err, errors.New("meterd dev stopped before listening"))
	case <-time.After(30 * time.Second):
		return fmt.Errorf("meterd dev not listening after 30 s; see %s", logPath)
	}
	d := &client{base: base, http: &http.Client{Timeout: 10 * time.Second}}
	if err := d.waitReady(ctx, 30*time.Second); err != nil {
		return err
	}
	out.say("meterd dev ready on %s in %s", base, time.Since(start).Round(time.Millisecond))

	tenants := []*tenant{
		{name: "acme", plan: "free", rate: 150},
		{name: "globex", plan: "free", rate: 70},
		{name: "initech", plan: "pro", rate: 100, model: "large"},
		{name: "umbrella", plan: "pro", rate: 50, model: "small"},
	}

	// 1. Traffic through /v1/check until a free tenant crosses its quota.
	out.title(fmt.Sprintf("1. A gateway asks GET /v1/check before every call, for %s", *seconds))
	out.say("free tenants: acme at 150 calls/s crosses its %d-call quota; globex at 70 calls/s gets close", freeLimit)
	// The traffic runs for the given time, and on past it (up to six times
	// as long) until acme is refused: on a slow machine the calls come
	// slower than their rates and acme crosses its quota later.
	trafficCtx, stopTraffic := context.WithTimeout(ctx, 6**seconds)
	defer stopTraffic()
	minimum := time.After(*seconds)
	firstBlock := make(chan *answer, 1)
	var wg sync.WaitGroup
	for _, t := range tenants {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.gateway(trafficCtx, t, firstBlock)
		}()
	}
	progress := time.NewTicker(time.Second)
	shown := false
	for done := false; !done; {
		select {
		case <-trafficCtx.Done():
			done = true
		case <-minimum:
			minimum = nil
			done = shown
		case a := <-firstBlock:
			if !shown {
				shown = true
				out.say("acme's call %d was refused: the gate answered from memory", a.n)
				out.block(a)
			}
			done = minimum == nil
		case <-progress.C:
			var parts []string
			for _, t := range tenants {
				parts = append(parts, fmt.Sprintf("%s %d ok/%d×402", t.name, t.ok.Load(), t.denied.Load()))
			}
			out.say("%s", strings.Join(parts, " · "))
		}
	}
	progress.Stop()
	stopTraffic()
	wg.Wait()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	acme := tenants[0]
	if acme.denied.Load() == 0 {
		return fmt.Errorf("acme was never blocked after %d calls (limit %d); see %s", acme.ok.Load(), freeLimit, logPath)
	}
	out.say("acme: %d calls allowed, %d refused with 402; %d admitted past the %d limit while the block travelled (the overshoot, bounded by rate × freshness)",
		acme.ok.Load(), acme.denied.Load(), acme.ok.Load()-freeLimit, freeLimit)

	// 2. An unpaid invoice blocks umbrella; paying it restores access.
	out.title("2. Stripe says umbrella's invoice failed, then that it was paid")
	now := time.Now()
	if err := d.webhook(ctx, "evt_demo_failed", "invoice.payment_failed", now.Add(-time.Second)); err != nil {
		return err
	}
	sent := time.Now()
	a, passed, err := d.waitCheck(ctx, "umbrella", http.StatusPaymentRequired, 5*time.Second)
	tenants[3].ok.Add(passed) // calls that passed before the block arrived
	if err != nil {
		return err
	}
	out.say("signed invoice.payment_failed accepted; umbrella's next call got 402 %s later:", short(time.Since(sent)))
	out.block(a)
	if err := d.webhook(ctx, "evt_demo_paid", "invoice.paid", now); err != nil {
		return err
	}
	sent = time.Now()
	if _, _, err := d.waitCheck(ctx, "umbrella", http.StatusOK, 5*time.Second); err != nil {
		return err
	}
	out.say("signed invoice.paid accepted; umbrella's calls pass again (200) after %s", short(time.Since(sent)))
	tenants[3].ok.Add(1) // the call that saw 200

	// 3. Reports: every allowed call counted exactly once.
	out.title("3. Usage, as operators and invoices see it")
	calls, tokens := map[string]int64{}, map[string]int64{}
	for _, t := range tenants {
		if n := t.errors.Load(); n > 0 {
			return fmt.Errorf("%d of %s's calls got no answer; see %s", n, t.name, logPath)
		}
		calls[t.name] = t.ok.Load()
		if t.model != "" {
			if t.lostTokens.Load() {
				return fmt.Errorf("some of %s's token events were not accepted; see %s", t.name, logPath)
			}
			tokens[t.name] = t.tokens.Load()
		}
	}
	for _, m := range []struct {
		meter, what string
		want        map[string]int64
	}{{"api_calls", "calls the gate allowed", calls}, {"tokens", "tokens the sidecars reported", tokens}} {
		got, err := d.waitUsage(ctx, m.meter, m.want, 20*time.Second)
		if err != nil {
			return err
		}
		var checks []string
		for _, t := range tenants {
			if want, ok := m.want[t.name]; ok {
				checks = append(checks, fmt.Sprintf("%s %s = %s", t.name, cli.Group(got[t.name]), cli.Group(want)))
			}
		}
		out.say("%s counted = %s, exactly: %s", m.meter, m.what, strings.Join(checks, " · "))
	}

	flags := []string{"--url", base, "--api-key", adminKey}
	out.title("meterd usage summary")
	if err := cli.Summary(ctx, flags, stdout, stderr); err != nil {
		return err
	}
	out.title("meterd usage --window period --meter api_calls")
	if err := cli.Usage(ctx, append(slices.Clone(flags), "--window", "period", "--meter", "api_calls"), stdout, stderr); err != nil {
		return err
	}
	out.title("meterd usage --meter tokens --group-by model")
	if err := cli.Usage(ctx, append(slices.Clone(flags), "--meter", "tokens", "--group-by", "model"), stdout, stderr); err != nil {
		return err
	}

	// A connection the client dialed but never sent a request on counts as
	// active for its first 5 s: closing it lets dev shut down within its
	// grace instead of failing with "context deadline exceeded".
	d.http.CloseIdleConnections()
	stopDev()
	if err := <-devDone; err != nil {
		return err
	}
	failed = false
	out.title(fmt.Sprintf("Done in %s. Next: `go run ./cmd/meterd dev` and the README.", time.Since(start).Round(100*time.Millisecond)))
	return nil
}

// short formats a duration for people: 0.4ms, 12ms, 1.2s.
func short(d time.Duration) string {
	if d < 10*time.Millisecond {
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	}
	return d.Round(time.Millisecond).String()
}

// printer prints the demo's progress.
type printer struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
}

func (o *printer) title(s string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	fmt.Fprintf(o.w, "\n== %s\n", s)
}

func (o *printer) say(format string, args ...any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	fmt.Fprintf(o.w, "[%5.1fs] %s\n", time.Since(o.start).Seconds(), fmt.Sprintf(format, args...))
}

// block prints an answer as HTTP: status, the headers that matter, body.
func (o *printer) block(a *answer) {
	o.mu.Lock()
	defer o.mu.Unlock()
	fmt.Fprintf(o.w, "\n    HTTP/1.1 %d %s\n", a.status, http.StatusText(a.status))
	for _, h := range []string{"Content-Type", "Retry-After", "Link"} {
		if v := a.header.Get(h); v != "" {
			fmt.Fprintf(o.w, "    %s: %s\n", h, v)
		}
	}
	var pretty bytes.Buffer
	if json.Indent(&pretty, a.body, "    ", "  ") == nil {
		fmt.Fprintf(o.w, "\n    %s\n\n", pretty.String())
	} else {
		fmt.Fprintf(o.w, "\n    %s\n\n", a.body)
	}
}

// addrWriter takes dev's stdout and sends the address it listens on.
type addrWriter struct {
	mu   sync.Mutex
	buf  []byte
	ch   chan string
	sent bool
}

func (w *addrWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.sent {
		return len(p), nil
	}
	w.buf = append(w.buf, p...)
	if _, rest, ok := bytes.Cut(w.buf, []byte("listening on http://")); ok {
		if addr, _, ok := bytes.Cut(rest, []byte("\n")); ok {
			w.sent = true
			w.ch <- string(bytes.TrimSpace(addr))
		}
	}
	return len(p), nil
}

// client talks to the demo's meterd dev.
type client struct {
	base string
	http *http.Client
}

type answer struct {
	n      int64
	status int
	header http.Header
	body   []byte
}

func (d *client) do(ctx context.Context, method, path string, header http.Header, body []byte) (*answer, error) {
	req, err := http.NewRequestWithContext(ctx, method, d.base+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := d.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	return &answer{status: resp.StatusCode, header: resp.Header, body: b}, nil
}

func (d *client) waitReady(ctx context.Context, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		a, err := d.do(ctx, http.MethodGet, "/readyz", nil, nil)
		if err == nil && a.status == http.StatusOK {
			return nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("%d %s", a.status, a.body)
			}
			return fmt.Errorf("meterd dev not ready after %s: %v", within, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// check asks /v1/check for a call of tenant, as the gateway's forward auth.
func (d *client) check(ctx context.Context, tenant string) (*answer, error) {
	return d.do(ctx, http.MethodGet, "/v1/check", http.Header{"X-Tenant-Id": {tenant}}, nil)
}

// gateway sends t's calls at t.rate until ctx ends; the first 402 of acme
// goes to firstBlock. A pro tenant's allowed call also reports the tokens it
// used, as an LLM gateway's sidecar would, through /v1/events: batched every
// 100 ms by a second goroutine, so the calls keep their pace.
func (d *client) gateway(ctx context.Context, t *tenant, firstBlock chan<- *answer) {
	tokens := make(chan string, 1024)
	reported := make(chan struct{})
	go func() {
		defer close(reported)
		d.reportTokens(t, tokens)
	}()
	defer func() { close(tokens); <-reported }()
	tick := time.NewTicker(time.Second / time.Duration(t.rate))
	defer tick.Stop()
	var n int64
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		n++
		// Not ctx: a call cancelled mid-way may still have been recorded,
		// and the demo must know every call's answer to check the count.
		a, err := d.check(context.WithoutCancel(ctx), t.name)
		if err != nil {
			t.errors.Add(1)
			continue
		}
		switch a.status {
		case http.StatusOK:
			t.ok.Add(1)
			if t.model != "" {
				used := 100 + (n*7919)%400
				tokens <- fmt.Sprintf(`{"id":"%s-tok-%d","tenant":"%s","meter":"tokens","value":%d,"dimensions":{"model":"%s"}}`, t.name, n, t.name, used, t.model)
				t.tokens.Add(used)
			}
		case http.StatusPaymentRequired:
			if t.denied.Add(1) == 1 && t.name == "acme" {
				a.n = n
				firstBlock <- a
			}
		}
	}
}

// reportTokens posts the token events of events as NDJSON, every 100 ms and
// once more when events is closed.
func (d *client) reportTokens(t *tenant, events <-chan string) {
	var batch []string
	flush := func() {
		if len(batch) == 0 {
			return
		}
		body := []byte(strings.Join(batch, "\n"))
		batch = batch[:0]
		// A fresh context: the last batch is posted after the traffic ended.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if a, err := d.do(ctx, http.MethodPost, "/v1/events", http.Header{"Content-Type": {"application/x-ndjson"}, "Authorization": {"Bearer " + adminKey}}, body); err != nil || a.status != http.StatusAccepted {
			t.lostTokens.Store(true)
		}
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case e, ok := <-events:
			if !ok {
				flush()
				return
			}
			batch = append(batch, e)
		case <-tick.C:
			flush()
		}
	}
}

// webhook posts a signed Stripe invoice event for umbrella.
func (d *client) webhook(ctx context.Context, id, typ string, created time.Time) error {
	body, _ := json.Marshal(map[string]any{
		"id": id, "object": "event", "type": typ, "created": created.Unix(), "livemode": false,
		"data": map[string]any{"object": map[string]any{"id": "in_demo_1", "object": "invoice", "customer": "cus_umbrella"}},
	})
	a, err := d.do(ctx, http.MethodPost, "/v1/billing/webhook", http.Header{
		"Content-Type":                 {"application/json"},
		enforcer.StripeSignatureHeader: {enforcer.Sign(body, webhookSecret, time.Now())},
	}, body)
	if err != nil {
		return fmt.Errorf("webhook %s: %w", typ, err)
	}
	if a.status/100 != 2 {
		return fmt.Errorf("webhook %s: %d %s", typ, a.status, a.body)
	}
	return nil
}

// waitCheck asks /v1/check for tenant until it answers status; passed
// counts the calls answered 200 before (each one recorded as usage).
func (d *client) waitCheck(ctx context.Context, tenant string, status int, within time.Duration) (a *answer, passed int64, err error) {
	deadline := time.Now().Add(within)
	for {
		a, err := d.check(ctx, tenant)
		if err == nil && a.status == status {
			return a, passed, nil
		}
		if err == nil && a.status == http.StatusOK {
			passed++
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("still %d", a.status)
			}
			return nil, passed, fmt.Errorf("%s's check did not turn %d within %s: %v", tenant, status, within, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// waitUsage reads the usage of meter of each tenant in its current period,
// through the CLI's client, until it equals want, and returns the last
// reading.
func (d *client) waitUsage(ctx context.Context, meter string, want map[string]int64, within time.Duration) (map[string]int64, error) {
	c := cli.Client{URL: d.base, APIKey: adminKey, HTTP: d.http}
	deadline := time.Now().Add(within)
	for {
		got := map[string]int64{}
		body, err := c.Get(ctx, "/v1/usage", url.Values{"window": {"period"}, "meter": {meter}})
		if err == nil {
			var rep report.Document
			rep, err = cli.DecodeReport(body)
			body.Close()
			for _, r := range rep.Rows {
				got[r.Tenant] += r.Value
			}
			if err == nil && maps.Equal(got, want) {
				return got, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s usage %v did not reach %v within %s (last error: %v)", meter, got, want, within, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
