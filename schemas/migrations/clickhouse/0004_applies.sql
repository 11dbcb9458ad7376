-- The intent log of Apply. A row with sign 1 is written before an Apply
-- writes events or rollups and names what it may touch (tenants and hours);
-- the same row with sign -1 is written when both writes succeeded. An apply
-- whose signs do not sum to zero was interrupted: its rollups are recomputed
-- from events before the store writes again. Merges drop finished pairs, so
-- the table stays small.
CREATE TABLE IF NOT EXISTS applies (
    apply_id   String,
    sign       Int8,
    started_at DateTime('UTC'),
    tenants    Array(String),
    first_hour DateTime('UTC'),
    end_hour   DateTime('UTC')
) ENGINE = CollapsingMergeTree(sign)
ORDER BY apply_id
