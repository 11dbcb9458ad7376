package chtest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTick is USER_HZ, the unit of utime and stime in /proc/PID/stat:
// 100 on every Linux architecture Go supports.
const clockTick = 10 * time.Millisecond

// ServerCPU returns the CPU time (user + system) the private server has used
// so far, for benchmarks that report the server's share of the work; ok is
// false when the tests use a server at METERD_TEST_CLICKHOUSE or none was
// started yet.
func ServerCPU() (cpu time.Duration, ok bool) {
	if shared.srv == nil {
		return 0, false
	}
	d, err := processCPU(shared.srv.Pid())
	return d, err == nil
}

// processCPU reads utime + stime of pid, all its threads.
func processCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: count from its ")".
	s := string(data)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	var ticks int64
	for _, f := range fields[11:13] { // utime and stime, fields 14 and 15
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, err
		}
		ticks += n
	}
	return time.Duration(ticks) * clockTick, nil
}
