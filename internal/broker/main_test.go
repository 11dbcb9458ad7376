package broker

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if a goroutine outlives them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// nats-server's: the file store of a stream of the 3-server cluster
		// (TestEnsureStreamsReplicas) is stopped by the stream's raft monitor,
		// which may still be at it when WaitForShutdown returned; on a loaded
		// machine its state flusher, and the access-time ticker every file
		// store shares, outlive goleak's wait. The servers themselves (accept
		// loops, routes, clients) are still checked.
		goleak.IgnoreTopFunction("github.com/nats-io/nats-server/v2/server.(*fileStore).flushStreamStateLoop"),
		goleak.IgnoreTopFunction("github.com/nats-io/nats-server/v2/server/ats.Register.func1"),
	)
}
