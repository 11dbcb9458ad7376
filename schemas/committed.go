package schemas

import "time"

// Committed is what the aggregator publishes on meterd.committed.<partition>
// (CommittedSubject) after a durable commit: usage newly counted in one hour.
// The enforcer counts it toward the tenant's current period.
type Committed struct {
	Tenant string    `json:"tenant"`
	Meter  string    `json:"meter"`
	Hour   time.Time `json:"hour"`
	Value  int64     `json:"value"`
	Events int64     `json:"events"`
	// SealedAt is when the oldest batch of the commit was sealed, on its
	// collector's clock. No event of the increment was accepted earlier
	// than SealedAt minus the collector's batch wait: freshness measured
	// from it (by the enforcer and the gates) misses at most that wait.
	SealedAt time.Time `json:"sealed_at,omitzero"`
}

// Increment is usage newly counted by a commit: the sum of values and number
// of events of Tenant's Meter in the UTC hour starting at Hour. Store totals
// reuse the type for period sums, with Hour set to the start of the period.
// It lives here, not in the aggregator, because the enforcer reads it too.
type Increment struct {
	Tenant, Meter string
	Hour          time.Time
	Value, Events int64
}
