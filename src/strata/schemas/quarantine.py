"""Replay of quarantined events into the log topic ``events``.

A quarantined event is stored with its normalized record (``event``), so a
replay re-validates it against the schema registered since, and appends the
valid ones to ``events`` with their original event_id, in the partition that
a client retry of the same event would reach. Replaying twice is harmless:
events already in the ``events`` table are skipped, and the loader's event_id
deduplication drops any that are still in flight in the log.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from strata.config import Config
from strata.events import partition_for
from strata.log.base import Log
from strata.schemas.registry import SchemaRegistry
from strata.store import Store

REPLAY_SQL = """
SELECT event_id, event_type, event
FROM quarantine
WHERE ({all_types:UInt8} = 1 OR event_type = {event_type:String})
  AND event_id NOT IN (
      SELECT event_id FROM events
      WHERE event_type IN (SELECT DISTINCT event_type FROM quarantine)
  )
ORDER BY received_at, event_id
LIMIT 1 BY event_id
"""


def replay(
    config: Config,
    store: Store,
    log: Log,
    registry: SchemaRegistry,
    *,
    event_type: str | None = None,
) -> dict[str, Any]:
    """Append the quarantined events that now validate to ``events``.
    Returns counts: ``replayed``, ``invalid`` (a schema exists, the event
    fails it; reasons sampled in ``errors``), ``unregistered`` (still no
    schema). Durable when it returns (the producer is flushed)."""
    registry.reload()
    _, rows = store.query_rows(
        REPLAY_SQL, {"all_types": 1 if event_type is None else 0, "event_type": event_type or ""}
    )
    settings = config.ingest
    by_partition: dict[int, list[tuple[bytes | None, bytes]]] = defaultdict(list)
    counts = {"replayed": 0, "invalid": 0, "unregistered": 0}
    errors: list[str] = []
    for event_id, kind, event_text in rows:
        validator = registry.validator(kind)
        if validator is None:
            counts["unregistered"] += 1
            continue
        record = json.loads(event_text)
        problem = validator(json.loads(record.get("properties") or "{}"))
        if problem is not None:
            counts["invalid"] += 1
            if len(errors) < 20:
                errors.append(f"{event_id}: {problem}")
            continue
        partition = partition_for(
            record["distinct_id"], event_id, config.log.partitions,
            frozenset(settings.hot_user_ids), settings.hot_key_salt_buckets,
        )
        by_partition[partition].append((None, event_text.encode()))
        counts["replayed"] += 1
    if by_partition:
        producer = log.producer()
        try:
            for partition, records in by_partition.items():
                producer.produce_many("events", partition, records)
            producer.flush()
        finally:
            producer.close()
    return {**counts, "errors": errors}
