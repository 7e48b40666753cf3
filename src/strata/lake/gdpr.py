"""Deleting one user from every layer (GDPR "right to erasure").

``delete_user`` runs in the process that owns the store (``strata serve``
through ``POST /v1/admin/delete-user``, or ``strata delete-user`` when no
server runs), in this order:

1. **Log: masked.** The user goes on the deleted-users list first
   (strata.masking), so every reader of the log (loader, archiver,
   processor, replay, batch) drops the user's records from now on, also a
   replay racing with this deletion. The records themselves stay in the
   append-only log until log retention deletes their segments; then the
   entry is pruned.
2. **Raw table and side tables:** ``ALTER TABLE ... DELETE`` with
   ``mutations_sync = 2`` on ``events`` and on every other table that has a
   ``user_id`` or ``distinct_id`` column (``late_events``, ``quarantine``, ...).
3. **Lake:** only files holding the user's rows are rewritten (atomic
   replace of the same name; a file left empty is deleted), in both tiers.
4. **Rollups:** every day the user had events is recomputed and replaced
   (strata.lake.batch): from the raw table while the day is inside raw
   retention, from the lake after. Counts and distinct counts lose exactly
   the user's contribution; nothing else changes.
5. **Serving store:** windows are invalidated through the serving store's
   ``delete_user`` if it offers one (see docs/storage.md for the gap).

A user is matched by ``user_id = ID OR distinct_id = ID``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from strata.events import now_ms
from strata.lake.base import Lake
from strata.lake.batch import BatchJob
from strata.masking import DeletedUsers
from strata.store import Store

log = logging.getLogger("strata.gdpr")

_MATCH = "user_id = {user:String} OR distinct_id = {user:String}"


@dataclass
class DeleteReport:
    user_id: str
    deleted_at_ms: int
    raw_rows: int = 0
    other_tables: dict[str, int] = field(default_factory=dict)
    lake_files_rewritten: int = 0
    lake_files_deleted: int = 0
    lake_rows: int = 0
    days_recomputed: list[str] = field(default_factory=list)
    serving: str = "no serving store"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _user_tables(store: Store) -> list[str]:
    _, rows = store.query_rows(
        "SELECT DISTINCT table FROM system.columns "
        "WHERE database = currentDatabase() AND name IN ('user_id', 'distinct_id') "
        "AND table NOT LIKE '.inner%'"
    )
    _, engines = store.query_rows(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        "AND engine LIKE '%MergeTree'"
    )
    merge_tree = {name for (name,) in engines}
    return sorted(t for (t,) in rows if t in merge_tree and t != "lake_batch_events")


def _columns(store: Store, table: str) -> set[str]:
    _, rows = store.query_rows(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String}",
        {"t": table},
    )
    return {name for (name,) in rows}


def delete_user(
    user_id: str,
    *,
    store: Store,
    lake: Lake,
    batch: BatchJob,
    deleted_users: DeletedUsers,
    serving: Any = None,
    now: int | None = None,
) -> DeleteReport:
    """Remove ``user_id`` from every layer; see the module docstring."""
    if not user_id or len(user_id) > 256:
        raise ValueError("user_id: required, at most 256 characters")
    deleted_at = now_ms() if now is None else now
    report = DeleteReport(user_id, deleted_at)
    deleted_users.add(user_id, deleted_at)

    params = {"user": user_id}
    raw_days = {
        d
        for (d,) in store.query_rows(f"SELECT DISTINCT toDate(ts) FROM events WHERE {_MATCH}", params)[1]
    }
    for table in _user_tables(store):
        columns = _columns(store, table)
        match = " OR ".join(
            f"{c} = {{user:String}}" for c in ("user_id", "distinct_id") if c in columns
        )
        count = int(store.scalar(f"SELECT count() FROM {table} WHERE {match}", params) or 0)
        if count:
            store.command(
                f"ALTER TABLE {table} DELETE WHERE {match} SETTINGS mutations_sync = 2", params
            )
        if table == "events":
            report.raw_rows = count
        elif count:
            report.other_tables[table] = count

    lake_days = _delete_from_lake(lake, deleted_users, user_id, deleted_at, report)

    # Inside raw retention the raw table is the complete, exact source.
    _, parts = store.query_rows(
        "SELECT DISTINCT partition_id FROM system.parts "
        "WHERE database = currentDatabase() AND table = 'events' AND active"
    )
    raw_partitions = {str(p) for (p,) in parts}
    days = sorted(raw_days | lake_days)
    for day in days:
        in_raw = day.strftime("%Y%m%d") in raw_partitions or day in raw_days
        batch.recompute_day(day, source="raw" if in_raw else "lake")
    report.days_recomputed = [d.isoformat() for d in days]

    if serving is not None and hasattr(serving, "delete_user"):
        serving.delete_user(user_id)
        report.serving = "invalidated"
    log.info("deleted user %r: %s", user_id, report.as_dict())
    return report


def _delete_from_lake(
    lake: Lake, deleted_users: DeletedUsers, user_id: str, deleted_at: int, report: DeleteReport
) -> set[date]:
    days: set[date] = set()
    users = pa.array([user_id])
    # Per tier: a file caught mid-move exists in both, and both copies go.
    for lake_file in lake.files(tiers=("hot",)) + lake.files(tiers=("cold",)):
        probe = lake.read(
            [lake_file], columns=["user_id", "distinct_id", "received_at"]
        )
        hit = np.zeros(probe.num_rows, dtype=bool)
        for column in ("user_id", "distinct_id"):
            hit |= pc.is_in(probe.column(column), value_set=users).to_numpy(zero_copy_only=False)
        if not hit.any():
            continue
        received = probe.column("received_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
        hit &= received <= deleted_at
        if not hit.any():
            continue
        table = lake.read_file(lake_file)
        kept = table.filter(pa.array(~hit))
        days.add(lake_file.day)
        report.lake_rows += int(hit.sum())
        if kept.num_rows:
            lake.write(lake_file.relpath, kept, lake_file.tier)
            report.lake_files_rewritten += 1
        else:
            lake.delete(lake_file.relpath, lake_file.tier)
            report.lake_files_deleted += 1
    return days
