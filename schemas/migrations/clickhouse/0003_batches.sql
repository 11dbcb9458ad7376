-- The batch ledger: a batch is recorded once all of its events are in events
-- and counted in rollups_hourly, so a redelivered batch found here is skipped
-- without looking up its events.
CREATE TABLE IF NOT EXISTS batches (
    batch_id   String,
    applied_at DateTime('UTC') DEFAULT now()
) ENGINE = MergeTree
PARTITION BY toYYYYMM(applied_at)
ORDER BY batch_id
