-- Statement templates of the lake batch job (strata.lake.batch), rendered per
-- metric and granularity like rollup.sql: identifiers and state expressions
-- come from compiled metric definitions only; values are bound.

-- name: create_stage
CREATE TABLE IF NOT EXISTS {stage} AS {table};

-- name: truncate
TRUNCATE TABLE {table};

-- name: stage_states
-- The same SELECT as the rollup's materialized view, over the staged day.
INSERT INTO {stage}
SELECT
    {bucket} AS window_start,
    {dimension_selects}
    {state_selects}
FROM lake_batch_events AS events
WHERE ({filter}) AND toDate(events.ts) = {{day:Date}}
GROUP BY window_start{dimension_keys};

-- name: totals
SELECT {merges} FROM {table} WHERE toDate(window_start) = {{day:Date}};

-- name: changed_windows
-- Windows (window_start, dimensions) whose finalized values differ.
SELECT count()
FROM
(
    SELECT window_start{dimension_keys}, {merges_aliased}
    FROM {table} WHERE toDate(window_start) = {{day:Date}}
    GROUP BY window_start{dimension_keys}
) AS streaming
FULL OUTER JOIN
(
    SELECT window_start{dimension_keys}, {merges_aliased}
    FROM {stage} WHERE toDate(window_start) = {{day:Date}}
    GROUP BY window_start{dimension_keys}
) AS batch USING (window_start{dimension_keys})
WHERE {differs};

-- name: late_events
-- Events that reached the server after their window was final (window end +
-- out-of-orderness + allowed lateness): the streaming path counted them late.
SELECT
    countIf(toUnixTimestamp64Milli(received_at)
            > intDiv(toUnixTimestamp64Milli(ts), {window_ms}) * {window_ms} + {window_ms}
              + {lateness_ms}),
    count()
FROM lake_batch_events AS events
WHERE ({filter}) AND toDate(events.ts) = {{day:Date}};

-- name: stage_month_rest
-- Month-partitioned rollups (the daily ones, decision 080): the other days of
-- the day's month, copied beside the recomputed day, so replacing the month
-- partition changes only the day.
INSERT INTO {stage}
SELECT * FROM {table}
WHERE toYYYYMM(window_start) = {{month_id:UInt32}} AND toDate(window_start) != {{day:Date}};

-- name: partition_key
SELECT partition_key FROM system.tables WHERE database = currentDatabase() AND name = {{table:String}};

-- name: replace_partition
ALTER TABLE {table} REPLACE PARTITION ID '{partition_id}' FROM {stage};

-- name: drop_partition
ALTER TABLE {table} DROP PARTITION ID '{partition_id}';

-- name: raw_tail
-- Raw rows of the day that the lake read did not cover (log positions at or
-- past the cut of their partition): archived later than the loader loaded them.
INSERT INTO lake_batch_events
    (event_id, event_type, user_id, anonymous_id, distinct_id, session_id, ts, received_at,
     country, platform, os, app_version, path, referrer, revenue, currency, properties,
     _partition, _offset)
SELECT
    event_id, event_type, user_id, anonymous_id, distinct_id, session_id, ts, received_at,
    country, platform, os, app_version, path, referrer, revenue, currency, properties,
    _partition, _offset
FROM events
WHERE toYYYYMMDD(ts) = {{day_id:UInt32}}
  AND _offset >= arrayElement({{cuts:Array(UInt64)}}, _partition + 1);

-- name: partition_days
SELECT DISTINCT partition_id FROM system.parts
WHERE database = currentDatabase() AND table = {{table:String}} AND active;
