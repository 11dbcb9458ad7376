package keyindex

import (
	"testing"

	"go.uber.org/goleak"
)

// Every pebble goroutine ends with Close, and a load's workers with Finish.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
