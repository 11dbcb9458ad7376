//go:build !linux

package chtest

import "time"

// ServerCPU reports no figure where /proc is missing.
func ServerCPU() (cpu time.Duration, ok bool) { return 0, false }
