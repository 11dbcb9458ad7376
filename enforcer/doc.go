// Package enforcer owns plans, quotas and billing status, decides which
// tenants are blocked, and broadcasts the decisions to every gateway through
// the JetStream KV bucket meterd-blocklist (docs/architecture.md: NATS names, Decision, Freshness).
//
// # Usage
//
// The enforcer keeps, per tenant and meter, the usage of the tenant's current
// billing period in memory. It learns usage from the increments the
// aggregator publishes on meterd.committed.<partition> after each durable
// commit, seeds from the store's totals at start, and reconciles with the
// store every Config.ReconcileEvery; it never scans raw events per decision.
//
// Seeding and reconciling race with increments in flight: a total read from
// the store at instant S already holds the increments committed before S, and
// some of those may reach the enforcer only after it asked. The enforcer
// subscribes before it seeds, and while a totals query runs it journals the
// increments arriving for the tenants queried. When the query returns, a
// tenant's usage becomes the store's total plus the journaled increments:
// every increment that arrived before the query started is replaced by the
// store's count, every one committed after the store's snapshot is added
// once. The only increments counted twice are those committed before the
// snapshot but delivered after the query started: the publish latency of a
// core NATS message, well under a millisecond on a healthy link. The next
// reconcile replaces the total again, so an error never outlives one
// ReconcileEvery. Increments are published at most once (core NATS); a lost
// one is likewise restored by the next reconcile.
//
// One tenant's data never holds the others back: when the totals query of a
// period fails while the store answers a ping, the tenants are read one by
// one (UsageSource.TenantTotals); a tenant whose own query fails keeps its
// decision and is retried every second, the others are seeded and decided.
// Usage sums saturate at math.MaxInt64 (internal/saturating), which is above
// every limit.
//
// An increment counts toward a tenant's current period when its hour lies in
// it; billing periods are whole UTC days, so an hour never straddles two.
// Increments for hours after the period (event times may lie up to five
// minutes ahead) are kept as the start of the next period's usage. When the
// clock passes a period's end, the tenant rolls over: its usage restarts from
// those, and a quota block of the old period is lifted.
//
// # Decisions
//
// A tenant is blocked for billing when its billing status is one of
// Config.BlockOn (reason payment_overdue for past_due and unpaid,
// payment_method_required for incomplete, suspended for canceled and
// suspended), else for quota when its plan's on_exceed is block and its
// usage of a limited meter reached the limit (quota_exceeded). A decision is
// written only when it changes (reason, meter, limit, period or billing URL);
// Used is the usage when the block was decided. Versions only grow per
// tenant: max(previous + 1, the clock in Unix nanoseconds). An unblock
// deletes the tenant's key. Every Config.HeartbeatEvery the enforcer writes
// schemas.HeartbeatKey so gates can tell a quiet enforcer from a dead one.
//
// # Billing
//
// Billing status comes from the catalog (status), and from Stripe-compatible
// webhooks, kept per tenant in the KV bucket meterd-billing and derived from
// event content and timestamps, never from arrival order (see billingRecord).
// The admin API's tenant changes are kept in the KV bucket meterd-tenants and
// merged over the catalog file by catalog.Watcher, the same follower every
// component reads the catalog with; the enforcer writes its admin API's
// changes through it. Both buckets are watched, so restarts and replicas see
// the same state.
//
// # Replicas
//
// With Config.Lease set (meterd enforcer always sets it), enforcers started
// with the same flags are replicas, and the one holding the lease (key
// LeaseKey in the internal/lease bucket) is active: only it writes
// decisions and the heartbeat and sends notifications. The others stand by
// from warm state: they seed, follow the committed increments and the
// catalog and reconcile like the active one, follow the blocklist bucket
// (so GET /v1/blocklist and the tenant views answer alike), and store the
// admin API's tenant changes and billing webhooks they receive in their
// buckets, which the active replica follows and decides. They are ready
// (active.go).
//
// Taking over, a replica starts its heartbeat, reads the blocklist and the
// usage totals of the store again (within 10 s; it may have missed a
// committed increment the previous replica counted, since increments are
// published at most once), then decides every tenant again; a decision
// that did not change is not written (see Decisions), so the gates see no
// flap. It forgets which thresholds it had queued and queues every
// threshold reached again.
//
// A stood-down replica must not write. Two fences hold its writes back:
//
//   - Time: each blocklist write ends before the lease this replica last
//     renewed can be taken over (internal/lease explains why no other
//     process holds it before then), and none starts after. A replica
//     frozen past its lease (SIGSTOP, a long pause) finds that time gone
//     when it wakes, and its next renewal refused.
//   - The bucket: only the active replica writes the blocklist bucket, so
//     each write expects the bucket's stream to end at this replica's own
//     last write (Nats-Expected-Last-Sequence). A zombie whose write
//     escaped the clock check (frozen between the check and the write) is
//     refused once the new active replica wrote, which it does at once (its
//     heartbeat); a zombie write that lands before that fails the new
//     replica's first write instead, and it gives the lease up and takes
//     over again, reading the bucket again and correcting the write.
//
// Notifications are claimed before they are sent: a Create of the
// notification's marker in NotifyBucket, which succeeds for one process
// only; a replica that is not active claims none. So none is sent twice
// across a takeover, and a threshold the old replica queued but never
// claimed is sent by the new one. A notification claimed by a replica that
// dies before sending it is not sent (at most once, as a lost core NATS
// publish).
//
// The lease lasts DefaultLeaseDuration (6 s): a standby takes over within
// that plus two polls of a tenth of it (7.2 s), and the heartbeat lapses
// for at most a heartbeat period more (12.2 s), within the gates' default
// StaleAfter of 15 s.
//
// # Parts
//
// The Enforcer wires parts that each own their state and do one job; a
// decision travels usage.go → decide.go → publish.go → notify.go:
//
//   - enforcer.go: Config, New (the wiring), Run (the start-up order), the
//     KV buckets, Ready and Close.
//   - active.go: the lease, standing by and taking over, and blockWriter,
//     the only writer of the blocklist bucket, fenced by the lease.
//   - usage.go: tracker, the usage per tenant and period in memory:
//     committed increments, rollover, the journals of the totals queries.
//     catalog.go: its switch to a new catalog of the catalog.Watcher (which
//     follows the catalog file and the admin API's changes).
//   - reconcile.go: reconciler, which seeds and reconciles the tracker
//     from the UsageSource.
//   - decide.go: billing statuses, the quota check, a tenant's decision
//     (tracker.decide) and dirtySet, the tenants to decide again.
//   - publish.go: publisher, the writer of the blocklist bucket (one
//     decision per dirty tenant, versions, the blocked gauge) and the
//     heartbeat.
//   - webhook.go: billing, the billing records (meterd-billing), and the
//     Stripe-compatible webhook that changes them.
//   - notify.go: thresholds, the 80 % and 100 % checks, and notifier, which
//     delivers the notifications.
//   - api.go, summary.go: api, the admin HTTP API and GET
//     /v1/usage/summary; it has no state of its own.
//
// # Locks
//
// Each part's lock guards its own state: tracker.mu the usage, journals,
// reseeds, thresholds and the catalog tracked; billing.mu the billing
// records; publisher.mu the decisions written and their versions;
// dirtySet.mu the tenants to decide again; notifier.mu the notification
// queue. publisher.syncMu serialises the writes of decisions, so the
// blocklist bucket sees them in decision order; it is held across the KV
// write. blockWriter.writeMu is held across each blocklist write too
// (decisions and heartbeats), since each write expects the stream to end at
// the one before; blockWriter.mu guards the term's fencing state and is
// held only to read or change it, never across a write. The catalog.Watcher's locks
// are held while it calls onCatalog. No other NATS, store or HTTP call is
// made under a part's lock (only logging), so a slow bucket or store never
// holds up the increments, the webhooks or the admin API.
//
// The order, outermost first:
//
//	publisher.syncMu or the watcher's locks (never both)
//	  → tracker.mu → billing.mu → dirtySet.mu, notifier.mu
//	the watcher's locks → publisher.mu
//	publisher.syncMu → publisher.mu
//	publisher.syncMu → blockWriter.writeMu → blockWriter.mu
//
// publisher.mu and tracker.mu are never held together; dirtySet.mu,
// notifier.mu and blockWriter.mu take nothing. The atomics (the buckets, running, seeded,
// lastHeartbeat, writeFailingSince) and the watcher's catalog are read
// without a lock.
package enforcer
