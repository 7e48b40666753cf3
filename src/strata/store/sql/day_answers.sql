-- Statement templates of the per-day answers (strata.query.day_answers,
-- decision 096). Not run at migration. {table} is a metric's daily rollup
-- table and {merges} its uniq aggregations' merge expressions, both from
-- the compiled metric definitions; values are bound (doubled braces in the
-- templates that are formatted: compute, first_day).

-- name: compute
-- The day's answer exactly as the router's rollup route computes it.
SELECT toDate(window_start) AS day, {merges}
FROM {table}
WHERE window_start >= toDateTime({{first:Date}}, 'UTC')
  AND window_start < toDateTime({{until:Date}}, 'UTC')
GROUP BY day
ORDER BY day;

-- name: first_day
SELECT toDate(min(window_start)) AS first, count() AS n FROM {table};

-- name: read
-- The answers of one aggregation over [first, until) and the frontier row,
-- in one round trip. Latest version wins (ReplacingMergeTree merges late).
SELECT metric, day, argMax(value, version) AS value, argMax(stale, version) AS stale
FROM day_answers
WHERE (metric = {metric:String} AND aggregation = {aggregation:String}
       AND day >= {first:Date} AND day < {until:Date})
   OR metric = ''
GROUP BY metric, day
ORDER BY metric, day;

-- name: stale_days
SELECT DISTINCT day FROM (
    SELECT day, argMax(stale, version) AS stale
    FROM day_answers
    WHERE metric != ''
    GROUP BY metric, aggregation, day
)
WHERE stale = 1
ORDER BY day;

-- name: late_since
-- Days of late events stored since the last pass: the processor's side
-- output also covers late events outside the windows it still holds, which
-- never reach on_revised. {floors} per late-topic partition.
SELECT toDate(ts) AS day, _partition, max(_offset) + 1 AS next
FROM late_events
WHERE _offset >= if(has({partitions:Array(UInt16)}, _partition),
                    {floors:Array(UInt64)}[indexOf({partitions:Array(UInt16)}, _partition)], 0)
GROUP BY day, _partition;

-- name: late_after_answers
-- At start-up: answered days with late events emitted after (or shortly
-- before) their answer was computed, which a previous process may have
-- stored without recomputing the day.
SELECT l.day
FROM (SELECT toDate(ts) AS day, max(emitted_at) AS last FROM late_events GROUP BY day) AS l
INNER JOIN (
    SELECT day, max(computed_at) AS computed FROM day_answers WHERE metric != '' GROUP BY day
) AS a ON l.day = a.day
WHERE l.last >= a.computed - INTERVAL {margin_s:UInt32} SECOND;

-- name: routed
-- A routed SQL query's answer from the finalized days (QueryService,
-- decision 096): {metric} and {aggregation} are configured names,
-- {first}/{until} dates from the query's resolved range, {columns} and
-- {order} the query's output names (quoted identifiers). Days without data
-- have no row, as on the rollup.
SELECT {columns}
FROM (
    SELECT day, argMax(value, version) AS value
    FROM day_answers
    WHERE metric = '{metric}' AND aggregation = '{aggregation}'
      AND day >= toDate('{first}') AND day < toDate('{until}')
    GROUP BY day
)
WHERE value > 0
ORDER BY {order};
