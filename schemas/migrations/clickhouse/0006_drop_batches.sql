-- The batch ledger is gone: a redelivered batch is found event by event by
-- the dedup lookup against events, which every Apply runs anyway, and the
-- ledger cost each Apply a query and an insert (a part) of its own
-- (aggregator/BENCHMARKS.md).
DROP TABLE IF EXISTS batches
