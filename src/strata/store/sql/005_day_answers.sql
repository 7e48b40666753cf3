-- Finalized per-day answers (decision 096): for every uniq aggregation of
-- every metric, the distinct count of each complete day, merged once from
-- the daily rollup's states (uniqCombinedMerge, the value the router's
-- rollup route gives for that day). Written only by the query layer's day
-- finalizer (strata.query.day_answers), read by the metrics API's DAU path.
--
-- A row with stale = 1 is a tombstone: late data (or a batch rewrite)
-- revised the day after it was answered, so it is read from the rollups
-- until it is recomputed. The row with the highest version wins. The row
-- with metric = '' holds the frontier: every day before it that has rollup
-- data has a row here. A day with no data has value 0 or no row.
CREATE TABLE IF NOT EXISTS day_answers
(
    metric       LowCardinality(String),
    aggregation  LowCardinality(String),
    day          Date,
    value        UInt64,
    stale        UInt8,
    version      UInt64,
    computed_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (metric, aggregation, day);
