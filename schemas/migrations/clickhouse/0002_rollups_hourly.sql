-- Hourly rollups derived from events: one or more rows per (tenant, meter,
-- hour, dims_key) whose sums are the usage of that hour. Rows are only ever
-- added (usage of a commit, or a correcting delta of the reconciler); merges
-- sum them, and readers always use sum() ... GROUP BY, so a result never
-- depends on whether merges happened. value and events are signed because
-- corrections may be negative.
CREATE TABLE IF NOT EXISTS rollups_hourly (
    tenant   String,
    meter    String,
    hour     DateTime('UTC'),
    dims_key String,
    value    Int64,
    events   Int64
) ENGINE = SummingMergeTree((value, events))
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant, meter, hour, dims_key)
