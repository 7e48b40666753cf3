"""One retention policy, applied to every layer (docs/storage.md).

| layer                 | default | setting                | what happens                         |
|-----------------------|---------|------------------------|--------------------------------------|
| log                   | 7 d     | ``log.retention``      | whole segments deleted (committed)   |
| raw table ``events``  | 90 d    | ``store.raw_ttl``      | whole day partitions dropped         |
| 5-minute rollups      | 35 d    | ``store.rollup_5m_ttl``| whole day partitions dropped         |
| daily rollups         | forever | -                      | kept                                 |
| lake hot tier         | 90 d    | ``lake.hot_retention`` | day files moved to ``lake.cold_path``|
| lake cold tier        | forever | -                      | kept                                 |
| deleted-users list    | log     | ``log.retention``      | entry dropped once the log has no    |
|                       |         |                        | record it could match                |

A day is past a retention age when its *end* is: day D is dropped when
``end(D) <= now - age``, so a partition never loses rows younger than the age.
The table TTLs in the DDL enforce the same ages with the server's clock as a
backstop; ``apply`` enforces them at an explicit ``now`` (tests freeze it).
Queries over days dropped from the raw table are still answered from the
daily rollups, which nothing deletes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from strata.config import Config, parse_duration_ms
from strata.events import now_ms
from strata.lake.base import Lake, day_bounds_ms
from strata.lake.batch import SQL
from strata.masking import DeletedUsers
from strata.store import Store
from strata.telemetry import REGISTRY

log = logging.getLogger("strata.retention")

# Ingest may append a record a little after the received_at it carries.
_APPEND_MARGIN_MS = 60_000


@dataclass
class RetentionReport:
    now_ms: int
    log_deleted_records: int = 0
    log_deleted_segments: int = 0
    # Records deleted before every consumer group had committed them (only
    # with log.allow_drop_uncommitted), and why segments were kept otherwise.
    log_dropped_uncommitted_records: int = 0
    log_details: list[str] = field(default_factory=list)
    raw_dropped_days: list[str] = field(default_factory=list)
    rollup_5m_dropped_days: dict[str, list[str]] = field(default_factory=dict)
    lake_moved_files: int = 0
    lake_moved_days: list[str] = field(default_factory=list)
    deleted_users_pruned: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": datetime.fromtimestamp(self.now_ms / 1000, UTC).isoformat(),
            "log": {
                "deleted_records": self.log_deleted_records,
                "deleted_segments": self.log_deleted_segments,
                "dropped_uncommitted_records": self.log_dropped_uncommitted_records,
                "details": self.log_details,
            },
            "raw_dropped_days": self.raw_dropped_days,
            "rollup_5m_dropped_days": self.rollup_5m_dropped_days,
            "lake_moved_files": self.lake_moved_files,
            "lake_moved_days": self.lake_moved_days,
            "deleted_users_pruned": self.deleted_users_pruned,
        }


def _expired(partition_id: str, cutoff_ms: int) -> bool:
    try:
        day = datetime.strptime(partition_id, "%Y%m%d").date()
    except ValueError:
        return False
    return day_bounds_ms(day)[1] <= cutoff_ms


def drop_expired_partitions(store: Store, table: str, cutoff_ms: int) -> list[str]:
    """Drop the day partitions (``toYYYYMMDD``) of ``table`` that ended at or
    before ``cutoff_ms``; returns their ids, sorted."""
    _, rows = store.query_rows(SQL["partition_days"].format(), {"table": table})
    dropped = sorted(pid for (pid,) in rows if _expired(str(pid), cutoff_ms))
    for partition_id in dropped:
        store.command(SQL["drop_partition"].format(table=table, partition_id=partition_id))
    return dropped


def apply(
    config: Config,
    *,
    store: Store | None,
    lake: Lake | None,
    log_: Any = None,
    now: int | None = None,
) -> RetentionReport:
    """Apply the policy to every layer given (None skips a layer)."""
    now = now_ms() if now is None else now
    report = RetentionReport(now_ms=now)
    if log_ is not None:
        log_report = log_.apply_retention(now)
        report.log_deleted_records = log_report.deleted_records
        report.log_deleted_segments = log_report.deleted_segments
        report.log_dropped_uncommitted_records = log_report.dropped_uncommitted_records
        report.log_details = list(log_report.details)
        if log_report.dropped_uncommitted_records:
            REGISTRY.inc("strata_log_dropped_uncommitted_records_total",
                         log_report.dropped_uncommitted_records)
            log.warning("retention: deleted %d log records a consumer group had not committed",
                        log_report.dropped_uncommitted_records)
        _prune_deleted_users(config, log_, report)
    if store is not None:
        report.raw_dropped_days = drop_expired_partitions(
            store, "events", now - parse_duration_ms(config.store.raw_ttl)
        )
        cutoff_5m = now - parse_duration_ms(config.store.rollup_5m_ttl)
        for metric in store.metrics:
            table = metric.rollup_table("5m")
            dropped = drop_expired_partitions(store, table, cutoff_5m)
            if dropped:
                report.rollup_5m_dropped_days[table] = dropped
    if lake is not None:
        cutoff = now - parse_duration_ms(config.lake.hot_retention)
        moved_days: set[date] = set()
        for lake_file in lake.files(tiers=("hot",)):
            if day_bounds_ms(lake_file.day)[1] <= cutoff:
                lake.move_to_cold(lake_file)
                report.lake_moved_files += 1
                moved_days.add(lake_file.day)
        report.lake_moved_days = [d.isoformat() for d in sorted(moved_days)]
    log.info("retention at %d: %s", now, report.as_dict())
    return report


def _prune_deleted_users(config: Config, log_: Any, report: RetentionReport) -> None:
    deleted = DeletedUsers(config.data_path)
    entries = deleted.entries()
    if not entries:
        return
    beginning = log_.beginning_offsets("events")
    partitions = range(log_.partitions("events"))
    gone = []
    for user, deleted_at in entries.items():
        # Gone when no partition still holds a record appended before the deletion.
        threshold = deleted_at + _APPEND_MARGIN_MS
        if all(
            log_.offset_for_time("events", p, threshold) <= beginning.get(p, 0) for p in partitions
        ):
            gone.append(user)
    if gone:
        deleted.remove(gone)
        report.deleted_users_pruned = len(gone)
