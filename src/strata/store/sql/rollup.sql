-- Rollup template, instantiated per configured metric and granularity by
-- strata.store.ddl. States are mergeable (uniqCombined, sum, count, ...), so
-- 5-minute buckets combine into hours and days, and days into months.
-- Kept by a materialized view from `events`; a late event that reaches the
-- raw table therefore corrects the rollup by itself.
CREATE TABLE IF NOT EXISTS {table}
(
    window_start DateTime('UTC'),
    {dimension_columns}
    {state_columns}
)
ENGINE = AggregatingMergeTree
PARTITION BY {partition_by}
ORDER BY (window_start{dimension_keys})
{ttl}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO {table} AS
SELECT
    {bucket} AS window_start,
    {dimension_selects}
    {state_selects}
FROM events
WHERE {filter}
GROUP BY window_start{dimension_keys};
