package schemas

import "strconv"

// NATS names shared by every component (docs/architecture.md#nats-names-and-stores).
const (
	// UsageStream is the JetStream stream that holds sealed batches.
	UsageStream = "METERD_USAGE"
	// UsageSubjects is the subject filter of UsageStream.
	UsageSubjects = "meterd.usage.>"
	// UsageSubjectPrefix prefixes the partition number of a batch subject.
	UsageSubjectPrefix = "meterd.usage."

	// DLQStream holds messages that can never be processed.
	DLQStream = "METERD_DLQ"
	// DLQSubjects is the subject filter of DLQStream.
	DLQSubjects = "meterd.dlq.>"
	// DLQSubjectPrefix prefixes the origin of a dead-lettered message.
	DLQSubjectPrefix = "meterd.dlq."
	// HeaderDLQReason carries why a message was dead-lettered.
	HeaderDLQReason = "Meterd-Dlq-Reason"
	// HeaderDLQStreamSeq carries the sequence of the message in its stream.
	HeaderDLQStreamSeq = "Meterd-Dlq-Stream-Seq"
	// HeaderDLQBatchID carries the message's Nats-Msg-Id (its batch_id),
	// which the DLQ copy does not keep as such: the DLQ keeps every copy.
	HeaderDLQBatchID = "Meterd-Dlq-Batch-Id"

	// CommittedSubjectPrefix prefixes the partition of committed increments.
	CommittedSubjectPrefix = "meterd.committed."
	// BlocklistBucket is the KV bucket of decisions: key = tenant.
	BlocklistBucket = "meterd-blocklist"
	// HeartbeatKey is the key of BlocklistBucket the enforcer rewrites every
	// few seconds with {"at":"<RFC 3339 time>"}, so a gate can tell a quiet
	// system (no decision changed) from a dead enforcer. It is not a valid
	// tenant name, so it never collides with a tenant's decision.
	HeartbeatKey = "=heartbeat"
	// NotifySubjectPrefix prefixes the tenant of a threshold notification.
	NotifySubjectPrefix = "meterd.notify."

	// DefaultPartitions is the default number of usage partitions.
	DefaultPartitions = 16
)

// Partition maps a tenant to its usage partition in [0, partitions).
// The hash is FNV-1a 32 so every component and language can compute it.
func Partition(tenant string, partitions int) int {
	if partitions <= 1 {
		return 0
	}
	h := uint32(2166136261)
	for i := 0; i < len(tenant); i++ {
		h ^= uint32(tenant[i])
		h *= 16777619
	}
	return int(h % uint32(partitions))
}

// UsageSubject is the subject a batch of partition p is published on.
func UsageSubject(p int) string {
	return UsageSubjectPrefix + strconv.Itoa(p)
}

// CommittedSubject is the subject committed increments of partition p go to.
func CommittedSubject(p int) string {
	return CommittedSubjectPrefix + strconv.Itoa(p)
}

// NotifySubject is the subject threshold notifications for tenant go to.
func NotifySubject(tenant string) string {
	return NotifySubjectPrefix + tenant
}
