-- Lake batch bookkeeping (strata.lake.batch, docs/storage.md).

-- Staging for the batch job: one day of raw events read from the lake (plus
-- the not-yet-archived tail from `events`). Truncated before every use; no
-- TTL and no insert deduplication, so re-running a day never drops rows.
-- Same columns as `events` (001_events.sql), none of its TTL or settings.
CREATE TABLE IF NOT EXISTS lake_batch_events AS events
ENGINE = MergeTree
ORDER BY tuple();

-- One row per (run, metric, aggregation): what the streaming path had in the
-- rollups for the day before the batch replaced them, what the batch
-- recomputed from the lake, and the difference it repaired.
CREATE TABLE IF NOT EXISTS reconciliation
(
    run_at          DateTime64(3, 'UTC'),
    day             Date,
    metric          LowCardinality(String),
    aggregation     LowCardinality(String),
    kind            LowCardinality(String),
    streaming_value Float64,
    batch_value     Float64,
    difference      Float64,
    changed_windows UInt64,
    late_events     UInt64,
    batch_events    UInt64,
    tail_events     UInt64,
    source          LowCardinality(String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, metric, aggregation, run_at);
