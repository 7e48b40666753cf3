-- The loader's repair of a re-executed plan (strata.loader.loader, decision
-- 093). Not run at migration: rendered with a sink's table name when a
-- re-executed plan's rows are found missing or doubled in its table.
-- Rows are staged here and reach the table by ATTACH / REPLACE PARTITION,
-- which does not fire the table's materialized views, so the rollups are
-- not fed a second time. Inserts into the staging table are sent with
-- insert_deduplicate = 0.
CREATE TABLE IF NOT EXISTS {staging} AS {table};
TRUNCATE TABLE {staging};
