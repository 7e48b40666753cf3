-- Raw events: one row per accepted event, exactly once (docs/semantics.md).
-- Written only by the loader. Partitioned by day so retention drops whole
-- partitions; sorted for time-range scans per event type.
CREATE TABLE IF NOT EXISTS events
(
    event_id     String,
    event_type   LowCardinality(String),
    user_id      String,
    anonymous_id String,
    distinct_id  String,
    session_id   String,
    ts           DateTime64(3, 'UTC'),
    received_at  DateTime64(3, 'UTC'),
    country      LowCardinality(String),
    platform     LowCardinality(String),
    os           LowCardinality(String),
    app_version  LowCardinality(String),
    path         String,
    referrer     String,
    revenue      Float64,
    currency     LowCardinality(String),
    properties   String,
    _partition   UInt16,
    _offset      UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(ts)
ORDER BY (event_type, toDate(ts), distinct_id, ts)
TTL toDateTime(ts) + INTERVAL {raw_ttl_seconds} SECOND
-- The primary index lives in the engine's bounded primary index cache
-- (store.chdb_cache_bytes), not in memory per part for the life of the part:
-- about 80 bytes per 8,192 rows, so 4 GiB for 90 days at 50k events/s.
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1,
    use_primary_key_cache = 1;
