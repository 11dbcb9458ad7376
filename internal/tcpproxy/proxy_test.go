package tcpproxy

import (
	"bufio"
	"io"
	"net"
	"testing"
	"time"
)

// echoServer answers every line it reads with the same line and reports the
// lines it got on seen.
func echoServer(t *testing.T) (addr string, seen <-chan string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	lines := make(chan string, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					lines <- line
					if _, err := io.WriteString(c, line); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String(), lines
}

func TestProxyForwardsAndBlackholes(t *testing.T) {
	target, seen := echoServer(t)
	p, err := New(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })

	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	roundTrip := func(line string) (string, error) {
		if _, err := io.WriteString(c, line); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		return r.ReadString('\n')
	}
	wantSeen := func(line string) {
		t.Helper()
		select {
		case got := <-seen:
			if got != line {
				t.Fatalf("server got %q, want %q", got, line)
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("server never got %q", line)
		}
	}

	if got, err := roundTrip("one\n"); err != nil || got != "one\n" {
		t.Fatalf("forwarding: got %q, %v; want the echo", got, err)
	}
	wantSeen("one\n")

	p.SetBlackholeServerToClient(true)
	got, err := roundTrip("two\n")
	wantSeen("two\n") // the request reached the server…
	if ne, ok := err.(net.Error); !ok || !ne.Timeout() || got != "" {
		t.Fatalf("blackholed: got %q, %v; want nothing back (a read timeout)", got, err)
	}

	p.SetBlackholeServerToClient(false)
	if got, err := roundTrip("three\n"); err != nil || got != "three\n" {
		t.Fatalf("after the blackhole: got %q, %v; want only the new echo (the old one is gone)", got, err)
	}
	wantSeen("three\n")

	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := r.ReadString('\n'); err == nil {
		t.Fatal("read after Close succeeded; want the connection closed")
	}
	if _, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		t.Fatal("dial after Close succeeded")
	}
}
