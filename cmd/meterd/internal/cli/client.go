package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/meterd/meterd/schemas"
)

// clientFlags are the flags every command that talks to meterd over HTTP
// shares: where meterd is and how to authenticate, and how to print.
type clientFlags struct {
	Client
	format  string
	timeout time.Duration
}

// flags defines them on fs; server says which process --url names.
func (c *clientFlags) flags(fs *flag.FlagSet, server string) {
	fs.StringVar(&c.URL, "url", "http://"+DevAddr, "base URL of meterd ("+server+")")
	fs.StringVar(&c.APIKey, "api-key", "", "API key: a tenant key reads its own tenant, an admin key every tenant")
	formatFlag(fs, &c.format)
	fs.DurationVar(&c.timeout, "timeout", time.Minute, "give up after this long")
}

func (c *clientFlags) check() error {
	if err := checkFormat(c.format); err != nil {
		return err
	}
	u, err := url.Parse(c.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return Mistakef("--url must be an http(s) URL such as http://%s, not %q", DevAddr, c.URL)
	}
	c.URL = strings.TrimRight(c.URL, "/")
	c.HTTP = &http.Client{Timeout: c.timeout}
	return nil
}

// Client talks to a running meterd.
type Client struct {
	// URL is the base URL of meterd, without a trailing slash.
	URL string
	// APIKey is sent as a bearer token; empty sends none.
	APIKey string
	// HTTP sends the requests; its Timeout bounds each.
	HTTP *http.Client
}

// Get fetches path with query v and returns the body of a 2xx answer,
// which the caller must close; any other answer becomes an error that says
// what the server said.
func (c *Client) Get(ctx context.Context, path string, v url.Values) (io.ReadCloser, error) {
	body, _, err := c.Do(ctx, http.MethodGet, path, v, nil)
	return body, err
}

// Do sends method to path with query v and body (JSON; nil sends none) and
// returns the body and status of a 2xx answer; the caller must close the
// body. Any other answer becomes an error that says what the server said:
// a problem's title and detail.
func (c *Client) Do(ctx context.Context, method, path string, v url.Values, body []byte) (io.ReadCloser, int, error) {
	u := c.URL + path
	if len(v) > 0 {
		u += "?" + v.Encode()
	}
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, r)
	if err != nil {
		return nil, 0, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+c.APIKey)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return nil, 0, fmt.Errorf("cannot reach meterd at %s (%v); is it running? (start one with: meterd dev)", c.URL, op.Err)
		}
		return nil, 0, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode/100 == 2 {
		return resp.Body, resp.StatusCode, nil
	}
	defer resp.Body.Close()
	return nil, resp.StatusCode, problemError(path, resp)
}

// problemError turns a non-2xx answer into an error: the problem's title,
// detail and each wrong field or parameter the detail does not name
// already, or the status and the start of the body.
func problemError(path string, resp *http.Response) error {
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	media, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	var p schemas.Problem
	if media == schemas.MediaProblem && json.Unmarshal(raw, &p) == nil && p.Status != 0 {
		msg := fmt.Sprintf("%s: %d %s", path, p.Status, p.Title)
		if p.Detail != "" {
			msg += ": " + p.Detail
		}
		more := func(name, why string) {
			if s := name + ": " + why; !strings.Contains(msg, s) {
				msg += "; " + s
			}
		}
		for _, e := range p.Errors {
			more(e.Field, e.Message)
		}
		for _, ip := range p.InvalidParams {
			more(ip.Name, ip.Reason)
		}
		if resp.StatusCode == http.StatusUnauthorized {
			msg += " (pass --api-key or set METERD_API_KEY)"
		}
		return errors.New(msg)
	}
	body := strings.TrimSpace(string(raw))
	if len(body) > 200 {
		body = body[:200] + "…"
	}
	return fmt.Errorf("%s: %s: %s", path, resp.Status, body)
}

// maxAnswerBytes bounds an answer the CLI decodes into memory: the summary
// of a million tenants fits, a runaway server does not exhaust the shell's
// machine.
const maxAnswerBytes = 512 << 20

// decodeAnswer decodes the JSON answer r into v, reading at most
// maxAnswerBytes; what says what the answer is, for the error.
func decodeAnswer(r io.Reader, what string, v any) error {
	lr := &io.LimitedReader{R: r, N: maxAnswerBytes + 1}
	if err := json.NewDecoder(lr).Decode(v); err != nil {
		if lr.N <= 0 {
			return fmt.Errorf("reading %s: the answer exceeds %d MiB", what, maxAnswerBytes>>20)
		}
		return fmt.Errorf("reading %s: %w", what, err)
	}
	return nil
}
