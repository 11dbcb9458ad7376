package chtest

import (
	"os"
	"testing"
)

// The private server's CPU time is read from /proc and grows with its work.
func TestServerCPU(t *testing.T) {
	DSN(t)
	if os.Getenv(EnvAddr) != "" {
		if _, ok := ServerCPU(); ok {
			t.Fatal("ServerCPU reports a figure for a server this process did not start")
		}
		return
	}
	before, ok := ServerCPU()
	if !ok || before <= 0 {
		t.Fatalf("ServerCPU = %s, %v; want a positive figure", before, ok)
	}
	for range 20 {
		DSN(t) // creates and, at cleanup, drops a database
	}
	if after, _ := ServerCPU(); after < before {
		t.Errorf("ServerCPU went from %s to %s", before, after)
	}
}
