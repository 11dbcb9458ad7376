package serve

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// startServer runs Server with t's timeouts on a loopback port until the
// test ends and returns its address.
func startServer(t *testing.T, h http.Handler, to Timeouts) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Server(ctx, ln, h, to, time.Second, slog.New(slog.DiscardHandler)) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Server: %v", err)
		}
	})
	return ln.Addr().String()
}

// A client that sends its headers or its body too slowly loses the
// connection after the timeout (the handler sees the body read fail), while
// a handler that runs past the read timeout after reading its body keeps
// its context and answers.
func TestServerTimeouts(t *testing.T) {
	const read = 300 * time.Millisecond
	readErr := make(chan error, 1)
	mux := http.NewServeMux()
	mux.HandleFunc("POST /read", func(w http.ResponseWriter, r *http.Request) {
		_, err := io.ReadAll(r.Body)
		readErr <- err
		if err != nil {
			w.WriteHeader(http.StatusRequestTimeout)
		}
	})
	mux.HandleFunc("POST /slow-handler", func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		select {
		case <-time.After(3 * read):
			fmt.Fprint(w, "done")
		case <-r.Context().Done():
			w.WriteHeader(http.StatusInternalServerError)
		}
	})
	addr := startServer(t, mux, Timeouts{ReadHeader: 200 * time.Millisecond, Read: read, Idle: time.Second})

	t.Run("slow headers", func(t *testing.T) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprint(conn, "POST /read HTTP/1.1\r\nHost: x\r\n") // and never the blank line
		start := time.Now()
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.ReadAll(conn) // the server closes the connection
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("connection with incomplete headers held %s", d)
		}
	})
	t.Run("slow body", func(t *testing.T) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprint(conn, "POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: 5242880\r\n\r\nxx") // and no more
		start := time.Now()
		select {
		case err := <-readErr:
			if err == nil || time.Since(start) > 2*time.Second {
				t.Fatalf("body read returned %v after %s, want a timeout after %s", err, time.Since(start), read)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the body read did not time out")
		}
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil || resp.StatusCode != http.StatusRequestTimeout {
			t.Fatalf("answer %v, %v; want the handler's 408", resp, err)
		}
	})
	t.Run("long handler after its body", func(t *testing.T) {
		resp, err := http.Post("http://"+addr+"/slow-handler", "text/plain", strings.NewReader("body"))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(body) != "done" {
			t.Fatalf("status %d %q: the body deadline cut a handler that had read its body", resp.StatusCode, body)
		}
	})
}

// A degraded check keeps /readyz at 200 and shows its state; a failing one
// turns it 503.
func TestReadyzDegraded(t *testing.T) {
	for _, tc := range []struct {
		name   string
		check  error
		status int
		state  string
	}{
		{"ok", nil, 200, "ok"},
		{"degraded", Degraded("nats: reconnecting, spooling"), 200, "nats: reconnecting, spooling"},
		{"wrapped degraded", fmt.Errorf("collector: %w", Degraded("spooling")), 200, "spooling"},
		{"failing", errors.New("spool full"), 503, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mux := NewMux(NewRegistry(), map[string]ReadyFunc{
				"collector": func(context.Context) error { return tc.check },
				"gate":      func(context.Context) error { return nil },
			})
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d: %s", rec.Code, tc.status, rec.Body)
			}
			if tc.status != 200 {
				if !strings.Contains(rec.Body.String(), "spool full") {
					t.Errorf("body %s does not name the failing check", rec.Body)
				}
				return
			}
			var status map[string]string
			if err := json.Unmarshal(rec.Body.Bytes(), &status); err != nil {
				t.Fatal(err)
			}
			if status["collector"] != tc.state || status["gate"] != "ok" {
				t.Errorf("states %v, want collector %q, gate ok", status, tc.state)
			}
		})
	}
}
