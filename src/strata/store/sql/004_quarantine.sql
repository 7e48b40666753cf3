-- Quarantine: events whose event_type had no registered schema when they
-- arrived (schemas.policy = "quarantine"). Written only by the loader from
-- log topic "quarantine". `event` is the normalized event (the JSON of an
-- `events` row) so `strata quarantine replay` can append it to the log topic
-- "events" with its original event_id once a schema is registered.
CREATE TABLE IF NOT EXISTS quarantine
(
    event_id     String,
    event_type   LowCardinality(String),
    distinct_id  String,
    ts           DateTime64(3, 'UTC'),
    received_at  DateTime64(3, 'UTC'),
    reason       String,
    event        String,
    _partition   UInt16,
    _offset      UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(received_at)
ORDER BY (event_type, received_at, event_id)
TTL toDateTime(received_at) + INTERVAL {raw_ttl_seconds} SECOND
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

-- Identities: one row per Segment `identify` call (traits as JSON text).
-- The current traits of a user: argMax(traits, ts) ... GROUP BY user_id.
CREATE TABLE IF NOT EXISTS identities
(
    event_id     String,
    user_id      String,
    anonymous_id String,
    distinct_id  String,
    traits       String,
    ts           DateTime64(3, 'UTC'),
    received_at  DateTime64(3, 'UTC'),
    _partition   UInt16,
    _offset      UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (distinct_id, ts)
SETTINGS non_replicated_deduplication_window = 10000;
