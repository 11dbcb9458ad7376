package chtest

import "syscall"

// sysProcAttr makes the kernel kill the server if the test process dies
// without running Main's cleanup (a panic, a timeout, a signal).
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
