-- The usage partition of an intent's writer, when aggregators share the
-- partitions (meterd aggregator --share-partitions): each partition has its
-- own writer, which repairs only its own partition's open intents (another
-- partition's may belong to a write in progress). -1 is an intent of a
-- writer of every partition (one aggregator, the default). 18.16 has no ADD
-- COLUMN IF NOT EXISTS, hence the guard.
-- done when: SELECT count() > 0 FROM system.columns WHERE database = currentDatabase() AND table = 'applies' AND name = 'usage_partition'
ALTER TABLE applies ADD COLUMN usage_partition Int32 DEFAULT -1
