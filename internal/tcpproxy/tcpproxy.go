// Package tcpproxy is a TCP proxy for fault tests: it forwards every
// connection it accepts to a target and can silently drop the bytes flowing
// back from the target, so a client's requests still reach the server while
// the server's answers (a JetStream ack, say) are lost on the way.
package tcpproxy

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"
)

// Proxy forwards connections accepted on Addr to its target. It is safe for
// concurrent use. Stop it with Close.
type Proxy struct {
	target string
	ln     net.Listener

	// blackhole drops the bytes read from the server instead of writing
	// them to the client; the connection itself stays open.
	blackhole atomic.Bool

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// New listens on a free port of 127.0.0.1 and forwards every connection to
// target (host:port), dialled when the client connects.
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("tcpproxy: listen: %w", err)
	}
	p := &Proxy{target: target, ln: ln, conns: make(map[net.Conn]struct{})}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the host:port clients connect to.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// SetBlackholeServerToClient makes the proxy drop (on) or forward (off) the
// bytes the server sends to clients, on open and future connections. Bytes
// from clients to the server are always forwarded. Dropped bytes are gone:
// a client that resumes reading mid-stream may see a protocol error.
func (p *Proxy) SetBlackholeServerToClient(on bool) { p.blackhole.Store(on) }

// Close stops accepting, closes every open connection and waits until the
// proxy's goroutines have returned. It is idempotent.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	err := p.ln.Close()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		if !p.track(client, server) {
			return
		}
		p.wg.Add(2)
		go p.pipe(server, client, nil)
		go p.pipe(client, server, &p.blackhole)
	}
}

// track registers a connection pair for Close, or closes it when the proxy
// is already closed.
func (p *Proxy) track(client, server net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		client.Close()
		server.Close()
		return false
	}
	p.conns[client] = struct{}{}
	p.conns[server] = struct{}{}
	return true
}

// pipe copies from src to dst until either side fails, dropping what it
// reads while drop is set, then closes both so the peer pipe ends too.
func (p *Proxy) pipe(dst, src net.Conn, drop *atomic.Bool) {
	defer p.wg.Done()
	defer func() {
		dst.Close()
		src.Close()
		p.mu.Lock()
		delete(p.conns, dst)
		delete(p.conns, src)
		p.mu.Unlock()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && (drop == nil || !drop.Load()) {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return // EOF or a closed connection
		}
	}
}
