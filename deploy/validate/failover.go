package validate

import (
	"cmp"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/meterd/meterd/enforcer"
	"github.com/meterd/meterd/gate"
	"github.com/meterd/meterd/internal/config"
)

// failover: when the active enforcer stops, a standby takes over within
// its lease and two polls of a tenth of it, and the heartbeat it wrote last
// may be a heartbeat period older; all of that must stay below every gate's
// --stale-after, or each takeover turns the gates stale (under
// --stale-policy deny every call fails with 503 until it is over).
func (c *checker) failover() {
	var (
		gap     time.Duration
		gapFrom string
	)
	for w, ct := range c.s.meterdContainers("enforcer") {
		env, file := envValues(ct), c.fileOf(ct)
		lease := c.duration(w.id, ct, env, "lease-duration", cmp.Or(file.Enforcer.LeaseDuration, enforcer.DefaultLeaseDuration))
		beat := c.duration(w.id, ct, env, "heartbeat-every", cmp.Or(file.Enforcer.HeartbeatEvery, enforcer.DefaultHeartbeatEvery))
		if g := lease + 2*(lease/10) + beat; g > gap {
			gap, gapFrom = g, w.id
		}
	}
	if gap == 0 {
		return
	}
	for w, ct := range c.s.meterdContainers("collector") {
		env, file := envValues(ct), c.fileOf(ct)
		stale := c.duration(w.id, ct, env, "stale-after", cmp.Or(file.Collector.StaleAfter, gate.DefaultStaleAfter))
		if gap >= stale {
			c.errorf("%s container %s: --stale-after %s, but a takeover of the enforcer (%s: lease, two polls and a heartbeat period) leaves the gates without a heartbeat for up to %s",
				w.id, ct.Name, stale, gapFrom, gap)
		}
	}
}

// duration reads the duration setting name of ct, def when unset.
func (c *checker) duration(id string, ct *corev1.Container, env map[string]string, name string, def time.Duration) time.Duration {
	v := setting(ct, env, name, def.String())
	d, err := time.ParseDuration(v)
	if err != nil {
		c.errorf("%s container %s: --%s %q is not a duration", id, ct.Name, name, v)
		return def
	}
	return d
}

// fileOf returns the config file ct reads, parsed by configFile, or an
// empty one.
func (c *checker) fileOf(ct *corev1.Container) *config.File {
	if f := c.files[ct]; f != nil {
		return f
	}
	return &config.File{}
}
