-- The dimensions of events are kept once, as dims_key (the canonical JSON
-- object that the rollups hold too: visitParamExtractString(dims_key, 'route')
-- reads one value). The parallel arrays dim_keys and dim_values repeated
-- them and cost 10-20 % of the CPU of an insert, on the client and on the
-- server (aggregator/BENCHMARKS.md). One statement, so both go or neither;
-- 18.16 has no DROP COLUMN IF EXISTS, hence the guard.
-- done when: SELECT count() = 0 FROM system.columns WHERE database = currentDatabase() AND table = 'events' AND name IN ('dim_keys', 'dim_values')
ALTER TABLE events DROP COLUMN dim_keys, DROP COLUMN dim_values
