-- How often each log position of a re-executed plan is stored in a sink's
-- table (strata.loader.loader, decision 093). {where} is an optional time
-- bound that prunes the raw table's day partitions.
SELECT _partition, _offset, count() AS n
FROM {table}
WHERE _partition IN {{partitions:Array(UInt16)}}
  AND _offset BETWEEN {{first:UInt64}} AND {{last:UInt64}}
  {where}
GROUP BY _partition, _offset
