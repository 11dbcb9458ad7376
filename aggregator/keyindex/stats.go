package keyindex

// Stats is what an index holds and what it is doing, for an operator's
// metrics (aggregator/clickhouse exports them).
type Stats struct {
	// Keys is the keys on disk, in Generations generations; a key added
	// again within the horizon counts once per generation that holds it
	// until a merge or an expiry rewrites them. Recent is the keys in
	// memory that no spill has written yet.
	Keys, Recent int64
	Generations  int
	// FilterKeys is how many keys the in-memory filter in use holds and
	// FilterCapacity how many it was sized for (about 1 % false positives
	// at capacity); both are 0 without one, when lookups go to the LSM's
	// own filters on disk. Building is true while a scan builds a filter,
	// and Scanned counts the keys the finished builds scanned since Open.
	FilterKeys, FilterCapacity int64
	Building                   bool
	Scanned                    int64
	// Merges counts the merges of generations finished since Open.
	Merges int64
	// DiskBytes is the space the LSM takes on disk.
	DiskBytes uint64
}

// Stats returns the index's Stats; a closed index's are all zero.
func (ix *Index) Stats() Stats {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.db == nil {
		return Stats{}
	}
	s := Stats{
		Keys:        ix.keysHeld(),
		Recent:      int64(len(ix.recent) + len(ix.frozen)),
		Generations: len(ix.gens),
		Building:    ix.building != nil,
		Scanned:     ix.scanned.Load(),
		Merges:      ix.merges,
	}
	if f := ix.filter; f != nil {
		s.FilterKeys, s.FilterCapacity = f.added.Load(), f.capacity
	}
	s.DiskBytes = ix.db.Metrics().DiskSpaceUsage()
	return s
}
