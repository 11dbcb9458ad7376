// Package bucket creates meterd's JetStream key-value buckets. They are all
// alike: file storage, the latest value of each key only, and as many
// replicas as the operator asks for (NATS replicas, default 1). Creating a
// bucket that exists updates it to the spec, so a changed description, TTL
// or replica count takes effect at the next start.
package bucket

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Spec describes one bucket.
type Spec struct {
	Name string
	// Description says what the bucket holds: its keys and values.
	Description string
	// TTL expires a key not written for that long; 0 keeps keys.
	TTL time.Duration
	// Replicas is the bucket's replica count; below 1 means 1.
	Replicas int
}

// Ensure creates the bucket of s, or updates it to s, and returns it.
func Ensure(ctx context.Context, js jetstream.JetStream, s Spec) (jetstream.KeyValue, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      s.Name,
		Description: s.Description,
		History:     1,
		TTL:         s.TTL,
		Storage:     jetstream.FileStorage,
		Replicas:    max(s.Replicas, 1),
	})
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", s.Name, err)
	}
	return kv, nil
}
