"""Replay: recompute the rollups of a time range exactly (the "a stream job
had a bug for two hours" repair).

``replay(t1, t2)`` recomputes every UTC day that overlaps [t1, t2) with the
batch job (strata.lake.batch): the day's states are rebuilt in staging tables
and the day's rollup partitions replaced, so nothing is counted twice, and a
replay over a range that was right changes nothing.

Sources:

* ``log`` (Kappa): the log's records for those days, deduplicated by
  event_id. Only possible while log retention still holds every record that
  could belong to the range; otherwise it fails with a message naming
  ``--source lake``.
* ``lake`` (Lambda): the lake files of those days, any age.
* ``auto`` (default): the log when it covers the range, else the lake.

Deleted users are masked on both paths. Whole days are recomputed even when
[t1, t2) covers part of a day: a day is the unit of atomic replacement.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta

from strata.lake.base import day_of_ms
from strata.lake.batch import BatchError, BatchJob, ReconciliationRow


def days_between(t1_ms: int, t2_ms: int) -> list[date]:
    """UTC days overlapping [t1_ms, t2_ms)."""
    if t2_ms <= t1_ms:
        raise BatchError("--to: must be after --from")
    first, last = day_of_ms(t1_ms), day_of_ms(t2_ms - 1)
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def replay(
    job: BatchJob,
    t1_ms: int,
    t2_ms: int,
    *,
    source: str = "auto",
    metrics: Sequence[str] | None = None,
    progress: bool = False,
) -> tuple[str, list[ReconciliationRow]]:
    """Recompute the days overlapping [t1_ms, t2_ms); returns the source used
    and the reconciliation rows (what each day's rollups held before)."""
    if source not in ("auto", "log", "lake"):
        raise BatchError(f"--source: expected log or lake, got {source!r}")
    days = days_between(t1_ms, t2_ms)
    selected = None if not metrics else [job.metric(name) for name in metrics]
    if source in ("auto", "log"):
        try:
            log_tables = job.read_log_days(days)
        except BatchError:
            if source == "log":
                raise
            source = "lake"
        else:
            source = "log"
            from tqdm import tqdm

            rows: list[ReconciliationRow] = []
            for day in tqdm(days, desc="replay (log)", unit="day", disable=not progress):
                rows.extend(
                    job.recompute_day(day, selected, source="log", log_table=log_tables[day])
                )
            return source, rows
    return source, job.recompute_days(
        days, selected, source="lake", progress=progress, description="replay (lake)"
    )
