//go:build !linux

package proctest

import "syscall"

// SysProcAttr is empty where the kernel cannot kill a server with its
// parent: the test's cleanup stops it.
func SysProcAttr() *syscall.SysProcAttr { return nil }
