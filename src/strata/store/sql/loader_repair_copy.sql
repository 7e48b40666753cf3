-- One table partition into the staging table with one row per log position:
-- what REPLACE PARTITION then swaps in (decision 093).
INSERT INTO {staging} SETTINGS insert_deduplicate = 0
SELECT * FROM {table}
WHERE _partition_id = {{partition_id:String}}
LIMIT 1 BY _partition, _offset
