-- Statement templates of the loader's repair of a re-executed plan
-- (strata.loader.loader, decision 093). Not run at migration. {table} is a
-- sink's table, {staging} its staging table `<table>_loader_repair`;
-- {partition_id} is a partition id read from the store and checked; values
-- are bound. Rows reach the table from staging by ATTACH / REPLACE
-- PARTITION, which do not fire the table's materialized views, so the
-- rollups are not fed a second time.

-- name: create_staging
CREATE TABLE IF NOT EXISTS {staging} AS {table};

-- name: truncate_staging
TRUNCATE TABLE {staging};

-- name: stored_positions
-- How often each log position of the plan is stored. {where} is an optional
-- time bound that prunes the raw table's day partitions.
SELECT _partition, _offset, count() AS n
FROM {table}
WHERE _partition IN {{partitions:Array(UInt16)}}
  AND _offset BETWEEN {{first:UInt64}} AND {{last:UInt64}}
  {where}
GROUP BY _partition, _offset;

-- name: partitions_of_positions
SELECT DISTINCT _partition_id
FROM {table}
WHERE (_partition, _offset) IN (
    SELECT tupleElement(key, 1), tupleElement(key, 2)
    FROM (SELECT arrayJoin({{keys:Array(Tuple(UInt16, UInt64))}}) AS key)
);

-- name: staged_partitions
SELECT DISTINCT _partition_id FROM {staging};

-- name: stage_partition_once
-- One table partition with one row per log position.
INSERT INTO {staging} SETTINGS insert_deduplicate = 0
SELECT * FROM {table}
WHERE _partition_id = {{partition_id:String}}
LIMIT 1 BY _partition, _offset;

-- name: replace_partition
ALTER TABLE {table} REPLACE PARTITION ID '{partition_id}' FROM {staging};

-- name: attach_partition
ALTER TABLE {table} ATTACH PARTITION ID '{partition_id}' FROM {staging};

-- name: drop_partition
ALTER TABLE {table} DROP PARTITION ID '{partition_id}';

-- Rollup partitions a re-executed plan touches, rebuilt from the raw table
-- (the rollups have no row identity to verify). Rendered per metric and
-- granularity by strata.lake.batch.render_rollup_sql, like lake_batch.sql.

-- name: rollup_tables
SELECT name, partition_key, engine_full FROM system.tables
WHERE database = currentDatabase() AND name IN {{tables:Array(String)}};

-- name: stage_rollup_day
-- The rollup's materialized-view SELECT (rollup.sql) over one day of `events`.
INSERT INTO {staging}
SELECT
    {bucket} AS window_start,
    {dimension_selects}
    {state_selects}
FROM events
WHERE ({filter}) AND toDate(events.ts) = {{day:Date}}
GROUP BY window_start{dimension_keys};

-- name: stage_month_rest
-- Month-partitioned rollups (decision 080): the month's days the plan did not
-- touch, copied as they are, so replacing the month changes only those days.
INSERT INTO {staging}
SELECT * FROM {table}
WHERE toYYYYMM(window_start) = {{month_id:UInt32}}
  AND toDate(window_start) NOT IN {{days:Array(Date)}};
