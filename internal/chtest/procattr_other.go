//go:build !linux

package chtest

import "syscall"

// sysProcAttr is empty where the kernel cannot kill the server with its
// parent: Main stops it.
func sysProcAttr() *syscall.SysProcAttr { return nil }
