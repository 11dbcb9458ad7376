-- Raw usage events, the source of truth; the primary key is the dedup index.
-- time is Unix seconds (UTC); dims_key the canonical dimensions
-- (aggregator/rollup.DimsKey).
CREATE TABLE events (
    tenant      TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    meter       TEXT    NOT NULL,
    value       INTEGER NOT NULL,
    time        INTEGER NOT NULL,
    dims_key    TEXT    NOT NULL,
    batch_id    TEXT    NOT NULL,
    inserted_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, id)
);
-- Reconcile and the partial hours of a total read events by time.
CREATE INDEX events_by_time ON events (time);

-- The batch ledger: a batch found here was applied and is skipped.
CREATE TABLE batches (
    batch_id   TEXT    NOT NULL PRIMARY KEY,
    applied_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Hourly rollups, updated in the transaction that inserts the events.
CREATE TABLE rollups_hourly (
    tenant   TEXT    NOT NULL,
    meter    TEXT    NOT NULL,
    hour     INTEGER NOT NULL,
    dims_key TEXT    NOT NULL,
    value    INTEGER NOT NULL,
    events   INTEGER NOT NULL,
    PRIMARY KEY (tenant, meter, hour, dims_key)
) WITHOUT ROWID;
CREATE INDEX rollups_by_hour ON rollups_hourly (hour);
