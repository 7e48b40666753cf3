-- The stream processor's outputs, written only by the loader from the log
-- topics `window_results` and `late` (docs/semantics.md, "Stream processor").
-- Replays are dropped by the loader's id dedup and insert tokens; the
-- deduplication window also covers the tables below.

-- One row per (metric, shard, window, dimension values): the result the live
-- path showed at the window's final firing (the audit trail that
-- reconciliation compares with the rollups). Queried by metric and time range.
CREATE TABLE IF NOT EXISTS window_results
(
    id           String,
    metric       LowCardinality(String),
    shard        LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    window_end   DateTime64(3, 'UTC'),
    dims         String,
    aggregates   String,
    event_count  UInt64,
    watermark    DateTime64(3, 'UTC'),
    emitted_at   DateTime64(3, 'UTC'),
    _partition   UInt16,
    _offset      UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(window_start)
ORDER BY (metric, window_start, dims, shard)
TTL toDateTime(window_start) + INTERVAL {raw_ttl_seconds} SECOND
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

-- One row per (event, metric[, window for hopping windows]) that arrived
-- after its window was final. The raw event is still in `events` and the
-- rollups; this is the side output that says which ranges were revised.
CREATE TABLE IF NOT EXISTS late_events
(
    id               String,
    metric           LowCardinality(String),
    event_id         String,
    event_type       LowCardinality(String),
    distinct_id      String,
    ts               DateTime64(3, 'UTC'),
    received_at      DateTime64(3, 'UTC'),
    window_start     DateTime64(3, 'UTC'),
    window_end       DateTime64(3, 'UTC'),
    watermark        DateTime64(3, 'UTC'),
    source_partition UInt16,
    source_offset    UInt64,
    window_held      Bool,
    emitted_at       DateTime64(3, 'UTC'),
    _partition       UInt16,
    _offset          UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(window_start)
ORDER BY (metric, window_start, ts)
TTL toDateTime(window_start) + INTERVAL {raw_ttl_seconds} SECOND
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;
