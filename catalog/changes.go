package catalog

import (
	"encoding/json"
	"fmt"
	"maps"

	"github.com/nats-io/nats.go/jetstream"
)

// Changes is the admin API's tenant changes as the Bucket holds them, each
// with the revision it was read or written at: the one reading of the
// bucket's entries, held by every Watcher, which also applies the writes of
// Put and Delete at once. It is not safe for concurrent use: its owner
// locks. The zero Changes holds none.
type Changes struct {
	changes map[string]Change
	revs    map[string]uint64
}

// Apply applies an entry of the Bucket (a put, or a delete or purge of the
// tenant's change) unless a revision as new is held already: the entries of
// the owner's own writes come back through the watch. It reports whether the
// changes changed. A value that is not a Change is an error, and the changes
// stay as they were.
func (c *Changes) Apply(en jetstream.KeyValueEntry) (bool, error) {
	tenant := en.Key()
	if en.Revision() <= c.revs[tenant] {
		return false, nil
	}
	if op := en.Operation(); op == jetstream.KeyValueDelete || op == jetstream.KeyValuePurge {
		c.setRev(tenant, en.Revision())
		delete(c.changes, tenant)
		return true, nil
	}
	var ch Change
	if err := json.Unmarshal(en.Value(), &ch); err != nil {
		// The revision is taken all the same: the bad value is the
		// tenant's latest, and an older one must not come back.
		c.setRev(tenant, en.Revision())
		return false, fmt.Errorf("catalog: the change of tenant %q in %s: %w", tenant, Bucket, err)
	}
	c.Set(tenant, ch, en.Revision())
	return true, nil
}

// Set records ch as tenant's change, written at revision rev, unless a
// revision as new is held already; it reports whether it did.
func (c *Changes) Set(tenant string, ch Change, rev uint64) bool {
	if rev <= c.revs[tenant] {
		return false
	}
	c.setRev(tenant, rev)
	if c.changes == nil {
		c.changes = map[string]Change{}
	}
	c.changes[tenant] = ch
	return true
}

// Forget drops tenant's change at once, before the delete comes back
// through the watch, unless a revision other than rev (the one held when
// the delete was sent) is held by now: a newer put, applied meanwhile, must
// stay. The revision held stays, so an older put read later does not bring
// the change back.
func (c *Changes) Forget(tenant string, rev uint64) {
	if c.revs[tenant] == rev {
		delete(c.changes, tenant)
	}
}

// Has reports whether tenant has a change.
func (c *Changes) Has(tenant string) bool {
	_, ok := c.changes[tenant]
	return ok
}

// Rev returns the revision of tenant's latest entry read or written.
func (c *Changes) Rev(tenant string) uint64 { return c.revs[tenant] }

// Merge is Merge(file, the changes, "").
func (c *Changes) Merge(file *Catalog) (*Catalog, map[string][]*FieldError) {
	return Merge(file, c.changes, "")
}

// Check returns what would be wrong with tenant's change ch merged over file
// with the other changes (nil when it fits); ch is applied last, so of two
// changes in conflict it is the one blamed.
func (c *Changes) Check(file *Catalog, tenant string, ch Change) []*FieldError {
	changes := maps.Clone(c.changes)
	if changes == nil {
		changes = map[string]Change{}
	}
	changes[tenant] = ch
	_, dropped := Merge(file, changes, tenant)
	return dropped[tenant]
}

func (c *Changes) setRev(tenant string, rev uint64) {
	if c.revs == nil {
		c.revs = map[string]uint64{}
	}
	c.revs[tenant] = rev
}
