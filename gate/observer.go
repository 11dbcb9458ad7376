package gate

import "time"

// Observer receives what a gate measures, so a gateway embedding the gate
// chooses its metrics library (or none) and the gate itself depends on no
// metrics client. gateprom.New returns the Prometheus one meterd exports.
//
// The gate calls WatchStaleness once, from New; the other methods from
// Run's goroutine, one at a time, never from Check. They must not block.
type Observer interface {
	// WatchStaleness hands over a function returning how long the gate
	// has received nothing from the bucket, neither a decision nor a
	// heartbeat (the time since New before the first). It is safe to call
	// from any goroutine at any time.
	WatchStaleness(staleness func() time.Duration)
	// SnapshotPublished reports a snapshot swapped in: changes blocks were
	// added, replaced or removed at once, and blocked tenants are now held.
	SnapshotPublished(changes uint64, blocked int)
	// DecisionIgnored reports a decision ignored because the gate held a
	// newer version for its tenant.
	DecisionIgnored()
	// ValueMalformed reports a blocklist value ignored because it is not a
	// valid decision for its key.
	ValueMalformed()
	// Freshness reports, once per limit crossing, the time from the sealing
	// of the usage that crossed the limit to the snapshot holding its block
	// (docs/architecture.md#freshness-and-the-gate).
	Freshness(d time.Duration)
}

// nopObserver is the Observer of a gate configured without one.
type nopObserver struct{}

func (nopObserver) WatchStaleness(func() time.Duration) {}
func (nopObserver) SnapshotPublished(uint64, int)       {}
func (nopObserver) DecisionIgnored()                    {}
func (nopObserver) ValueMalformed()                     {}
func (nopObserver) Freshness(time.Duration)             {}
