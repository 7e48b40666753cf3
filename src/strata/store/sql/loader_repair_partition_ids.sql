-- The table partitions holding the given log positions (decision 093).
SELECT DISTINCT _partition_id
FROM {table}
WHERE (_partition, _offset) IN (
    SELECT tupleElement(key, 1), tupleElement(key, 2)
    FROM (SELECT arrayJoin({{keys:Array(Tuple(UInt16, UInt64))}}) AS key)
)
