-- The identity of the store: a random id written once, by the first
-- aggregator that finds the table empty (two that race both keep the
-- smallest). A writer's local key index (aggregator/keyindex) records the id
-- of the store it indexes, so an index kept beside another database, or
-- beside this one dropped and created again, is rebuilt rather than trusted.
CREATE TABLE IF NOT EXISTS store_identity (
    id         String,
    created_at DateTime('UTC') DEFAULT now()
) ENGINE = MergeTree
ORDER BY id
