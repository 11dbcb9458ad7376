package proctest

import "syscall"

// SysProcAttr makes the kernel kill a server if the test process dies
// without running its cleanup (a panic, a timeout, a signal).
func SysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
