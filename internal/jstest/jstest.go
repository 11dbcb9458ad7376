// Package jstest gives tests a real embedded JetStream server (the one
// `meterd dev` runs, from internal/broker) that a test can stop and start
// again on the same port and store directory: clients that reconnect find
// it where it was, with the data it held; and a Cluster of separate
// nats-server processes, for what only a real cluster shows (replicas, a
// server killed under load). It is the one test harness of JetStream; a
// test needing a server uses it rather than its own.
package jstest

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/meterd/meterd/internal/broker"
)

// Config says how to run a Server. The zero value fsyncs every write, as
// production does.
type Config struct {
	// NoSync skips the fsync per write, for tests that are not about
	// durability.
	NoSync bool
	// Streams creates METERD_USAGE and METERD_DLQ (1 replica) at start, as
	// an operator does before running the collector.
	Streams bool
}

// Server is a running (or stopped) embedded JetStream server and the test's
// own connection to it.
type Server struct {
	t      testing.TB
	dir    string
	port   int
	noSync bool

	mu  sync.Mutex
	srv *server.Server

	// nc and js are the test's own connection (the oracle's), never the
	// component's under test.
	nc *nats.Conn
	js jetstream.JetStream
}

// Start starts a server on a free port and a store directory of its own,
// connects the test to it and, if cfg says so, creates the streams. The
// server stops at the end of the test.
func Start(t testing.TB, cfg Config) *Server {
	t.Helper()
	s := &Server{t: t, dir: t.TempDir(), port: FreePort(t), noSync: cfg.NoSync}
	s.Start()
	t.Cleanup(s.Stop)
	s.nc = s.Connect("jstest")
	js, err := jetstream.New(s.nc)
	if err != nil {
		t.Fatal(err)
	}
	s.js = js
	if cfg.Streams {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := broker.EnsureStreams(ctx, js, broker.StreamsConfig{Replicas: 1}); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// Start starts the server again on its port and store directory and waits
// until the test's own connection is back: it does not buffer requests while
// reconnecting. The server must be stopped.
func (s *Server) Start() {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		s.t.Fatal("jstest: server already running")
	}
	srv, err := broker.StartEmbedded(broker.EmbeddedConfig{Dir: s.dir, Port: s.port, NoSync: s.noSync})
	if err != nil {
		s.t.Fatal(err)
	}
	s.srv = srv
	for deadline := time.Now().Add(10 * time.Second); s.nc != nil && !s.nc.IsConnected(); {
		if time.Now().After(deadline) {
			s.t.Fatal("jstest: the test's connection did not come back after 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Stop shuts the server down and waits until it is gone. It is a no-op when
// the server is not running.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv == nil {
		return
	}
	s.srv.Shutdown()
	s.srv.WaitForShutdown()
	s.srv = nil
}

// Addr is host:port of the server; it stays the same across restarts.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// URL is the nats:// URL of the server.
func (s *Server) URL() string { return "nats://" + s.Addr() }

// Port is the TCP port of the server.
func (s *Server) Port() int { return s.port }

// Embedded is the running nats-server, for in-process connections
// (nats.InProcessServer, as `meterd dev` connects). It is nil while the
// server is stopped, and a new one after each Start.
func (s *Server) Embedded() *server.Server {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.srv
}

// Conn is the test's own connection, which reconnects forever.
func (s *Server) Conn() *nats.Conn { return s.nc }

// JetStream is the JetStream context of the test's own connection.
func (s *Server) JetStream() jetstream.JetStream { return s.js }

// Connect opens another connection with broker.Connect (reconnecting
// forever, as the components do), closed at the end of the test. Its
// handlers may log after the test ended, so their lines are discarded.
func (s *Server) Connect(name string, opts ...nats.Option) *nats.Conn {
	s.t.Helper()
	return connect(s.t, s.URL(), name, opts)
}

func connect(t testing.TB, url, name string, opts []nats.Option) *nats.Conn {
	t.Helper()
	nc, err := broker.Connect(broker.ConnConfig{URL: url, Name: name, Logger: slog.New(slog.DiscardHandler), Options: opts})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// Messages calls fn with every message stream holds when it is called, in
// stream order, read with an ordered consumer of js. It fails the test when
// it cannot read them all within a minute.
func Messages(t testing.TB, js jetstream.JetStream, stream string, fn func(jetstream.Msg)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatalf("jstest: stream %s: %v", stream, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatalf("jstest: stream %s info: %v", stream, err)
	}
	want := int(info.State.Msgs)
	if want == 0 {
		return
	}
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatalf("jstest: ordered consumer of %s: %v", stream, err)
	}
	for read := 0; read < want; {
		if ctx.Err() != nil {
			t.Fatalf("jstest: read %d of the %d messages of %s within a minute", read, want, stream)
		}
		// Bounded by bytes, as messages may be of megabytes: a fetch
		// of 500 of them would not fit the client's pending buffer.
		msgs, err := cons.FetchBytes(8<<20, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatalf("jstest: fetch from %s: %v", stream, err)
		}
		n := 0
		for m := range msgs.Messages() {
			if read+n < want { // not those published since it was called
				fn(m)
			}
			n++
		}
		if err := msgs.Error(); err != nil {
			t.Fatalf("jstest: fetch from %s: %v", stream, err)
		}
		if n == 0 {
			t.Fatalf("jstest: read %d of the %d messages of %s; the stream gave no more", read, want, stream)
		}
		read += n
	}
}

// FreePort returns a loopback TCP port that was free a moment ago. It is
// below Linux's ephemeral range (32768-60999): a port taken from that range
// and closed again may become the source port of an outgoing connection
// before the server (or a child process) binds it again, as a restarted
// server does.
func FreePort(t testing.TB) int {
	t.Helper()
	for range 100 {
		port := 20000 + rand.IntN(12000)
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			continue
		}
		ln.Close()
		return port
	}
	t.Fatal("jstest: no free port below the ephemeral range")
	return 0
}
