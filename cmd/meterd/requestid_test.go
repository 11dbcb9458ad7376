package main

import (
	"net/http"
	"strings"
	"testing"
)

// A gateway that retries a call sends the same X-Request-ID: the call counts
// once, also when the header is longer than an event id may be (it is
// hashed, not replaced by a random id), and two different long headers stay
// two calls. Counted by the enforcer from the store of `meterd dev`.
func TestCheckRetriedRequestIDCountsOnce(t *testing.T) {
	s := startE2EDev(t, e2eConfig)
	long := strings.Repeat("gateway-request-", 10) // 160 bytes
	for _, id := range []string{long + "a", long + "a", long + "b", "short-1", "short-1"} {
		a, err := s.check("globex", id)
		if err != nil {
			t.Fatal(err)
		}
		if a.status != http.StatusOK {
			t.Fatalf("check with X-Request-ID %q: status %d: %s", id, a.status, a.body)
		}
	}
	e2eUsage(t, s, "globex", 3)
	s.stop()
}
