-- Raw usage events: the source of truth of every total and the dedup index
-- of the store. The store inserts only events whose (tenant, id) it looked up
-- and did not find, so (tenant, id) is unique (one writer, see
-- aggregator/clickhouse). Times are kept to the second (no DateTime64 on
-- ClickHouse 18.16).
CREATE TABLE IF NOT EXISTS events (
    tenant      String,
    id          String,
    meter       String,
    value       Int64,
    time        DateTime('UTC'),
    -- the dimensions canonically encoded (aggregator/rollup.DimsKey), as in
    -- the rollups, and as parallel arrays sorted by key for ad-hoc queries
    dims_key    String,
    dim_keys    Array(String),
    dim_values  Array(String),
    batch_id    String,
    -- FNV-1a 64 of tenant, NUL, id: the dedup lookup filters on this column
    -- before it compares the strings
    key_hash    UInt64,
    inserted_at DateTime('UTC') DEFAULT now()
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (tenant, id)
