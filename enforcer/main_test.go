package enforcer

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if a goroutine outlives them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// The test's own API server (env.api, an httptest.Server) of
		// TestRunStopsOnCloseAndJoinsGoroutines: the test sets v.e = nil, so
		// env.stop returns before it closes env.api. A leak of the test, not of
		// the enforcer; drop this ignore once the test closes its server.
		goleak.IgnoreAnyFunction("net/http/httptest.(*Server).goServe.func1"),
	)
}
