"""Batch recompute: whole days of rollups from the lake (or the log), replaced atomically.

``BatchJob.recompute_day(day)`` is the one operation that nightly batch,
backfill, replay and delete-user share:

1. Read the day's events from the source into the staging table
   ``lake_batch_events``: lake files under ``date=D`` (either tier), or log
   records whose event time is in D (deduplicated by event_id, first offset
   wins). Deleted users are masked (strata.masking).
   Only log positions below the *cut* of their partition are taken:
   ``cut = min(archiver committed offset, loader committed offset)``. A lake
   row the loader has not loaded yet must not be counted now, or the rollup's
   materialized view would count it again when the loader gets there.
2. Holding the store's lock (so the loader cannot insert meanwhile), add the
   raw rows of D at or past the cut (loaded, but not archived yet), build the
   day's states per metric and granularity in staging tables of the same
   engine, compare them with the live rollups (the reconciliation report), and
   ``ALTER TABLE ... REPLACE PARTITION`` the day in ``rollup_<m>_5m`` and
   ``rollup_<m>_1d``. Readers see the old day or the new day, never a mix.

The result is exact and idempotent: running it twice, or over a day that is
already right, changes nothing. 5-minute partitions older than
``store.rollup_5m_ttl`` are not rebuilt (compaction already dropped them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from strata.config import Config, parse_duration_ms
from strata.durable import read_json
from strata.events import now_ms
from strata.lake.base import LAKE_SCHEMA, Lake, day_bounds_ms, day_of
from strata.masking import DeletedUsers
from strata.metrics import Metric
from strata.store import Store
from strata.store.ddl import named_statements, render_rollup_sql

log = logging.getLogger("strata.batch")

NO_CUT = 2**63 - 1
READ_ROWS = 1_000_000
_BATCH_LOCK = threading.Lock()  # one batch at a time per process


class BatchError(Exception):
    """A batch could not run; the message says why and what to do."""


SQL = named_statements("lake_batch.sql")


@dataclass
class ReconciliationRow:
    day: date
    metric: str
    aggregation: str
    kind: str
    streaming_value: float
    batch_value: float
    changed_windows: int
    late_events: int
    batch_events: int
    tail_events: int
    source: str

    @property
    def difference(self) -> float:
        """batch - streaming; float sums that differ only by summation order
        (relative 1e-9) count as equal."""
        difference = self.batch_value - self.streaming_value
        scale = max(abs(self.batch_value), abs(self.streaming_value), 1.0)
        return 0.0 if abs(difference) <= 1e-9 * scale else difference

    def as_dict(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "metric": self.metric,
            "aggregation": self.aggregation,
            "kind": self.kind,
            "streaming": self.streaming_value,
            "batch": self.batch_value,
            "difference": self.difference,
            "changed_windows": self.changed_windows,
            "late_events": self.late_events,
            "batch_events": self.batch_events,
            "tail_events": self.tail_events,
            "source": self.source,
        }


def metric_columns(metric: Metric) -> set[str]:
    """Raw columns a metric's rollup reads."""
    columns = set(metric.dimensions)
    columns |= {a.column for a in metric.aggregations if a.column}
    if metric.filter is not None:
        columns |= {c.name for c in metric.filter.find_all(exp.Column)}
    return columns


class BatchJob:
    """Recomputes days of rollups. Thread-safe (one day at a time per process)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        lake: Lake,
        *,
        deleted_users: DeletedUsers | None = None,
        log_: Any = None,
    ) -> None:
        self.config = config
        self.store = store
        self.lake = lake
        self.log = log_
        self.deleted_users = deleted_users or DeletedUsers(config.data_path)
        self.rollup_5m_ttl_ms = parse_duration_ms(config.store.rollup_5m_ttl)
        # Called with [start_ms, end_ms) of every replaced day, so cached
        # query results over it are dropped (Pipeline.on_revised in serve).
        self.on_revised: Callable[[int, int], None] | None = None
        self.max_future_skew_ms = parse_duration_ms(config.ingest.max_future_skew)

    # -- cuts ------------------------------------------------------------------
    def _committed(self, relative: str) -> dict[int, int] | None:
        state = read_json(self.config.data_path / relative / "checkpoint.json", None)
        if not state:
            return None
        return {int(p): int(o) for p, o in state.get("offsets", {}).items()}

    def cuts(self, source: str) -> list[int]:
        """Per log partition, the first offset the source read does not take:
        min(loader, archiver) committed offsets ("log": the loader's alone).

        A consumer without a checkpoint has committed nothing (0), except
        when neither has one: then the lake was written elsewhere (an
        imported archive, the benchmark) and is taken whole."""
        loader = self._committed("loader/events")
        archiver = self._committed("archiver") if source == "lake" else None
        if loader is None and archiver is None:
            return [NO_CUT] * self.config.log.partitions
        out = []
        for partition in range(self.config.log.partitions):
            cut = (loader or {}).get(partition, 0)
            if source == "lake":
                cut = min(cut, (archiver or {}).get(partition, 0))
            out.append(cut)
        return out

    # -- reading the source ------------------------------------------------------
    def _prepare(self, table: pa.Table, cuts: list[int], columns: list[str]) -> pa.Table:
        keep = self.deleted_users.keep_mask(table)
        partition = table.column("_partition").to_numpy(zero_copy_only=False).astype(np.int64)
        offset = table.column("_offset").to_numpy(zero_copy_only=False)
        cut = np.asarray(cuts, dtype=np.uint64)[np.minimum(partition, len(cuts) - 1)]
        inside = offset < cut
        keep = inside if keep is None else keep & inside
        if not keep.all():
            table = table.filter(pa.array(keep))
        return table.select(columns)

    def _stage_lake(self, day: date, cuts: list[int], columns: list[str]) -> int:
        files = self.lake.files([day])
        if not files:
            return 0
        read_columns = sorted(set(columns) | {"user_id", "distinct_id", "received_at"})
        staged = 0
        pending: list[pa.RecordBatch] = []
        pending_rows = 0

        def flush() -> int:
            if not pending:
                return 0
            table = self._prepare(pa.Table.from_batches(pending), cuts, columns)
            pending.clear()
            if table.num_rows:
                self.store.insert_arrow("lake_batch_events", table)
            return table.num_rows

        for batch in self.lake.dataset(files).to_batches(columns=read_columns, batch_size=READ_ROWS):
            pending.append(batch)
            pending_rows += batch.num_rows
            if pending_rows >= READ_ROWS:
                staged += flush()
                pending_rows = 0
        staged += flush()
        return staged

    def read_log_days(self, days: Sequence[date]) -> dict[date, pa.Table]:
        """Events of ``days`` from the log, deduplicated by event_id (first
        offset wins, as the loader does). Raises BatchError when log retention
        already dropped records that could belong to those days."""
        from strata.loader.sinks import EVENTS_SINK

        if self.log is None:
            raise BatchError("replay from the log needs the log")
        start_ms = day_bounds_ms(min(days))[0] - self.max_future_skew_ms - 60_000
        wanted = {d: day_bounds_ms(d) for d in days}
        consumer = self.log.consumer("replay", "events")
        partitions = list(range(self.log.partitions("events")))
        consumer.assign(partitions)
        beginning = self.log.beginning_offsets("events")
        ends = self.log.end_offsets("events")
        for partition in partitions:
            first = self.log.offset_for_time("events", partition, start_ms)
            if beginning.get(partition, 0) > 0 and first <= beginning[partition]:
                consumer.close()
                raise BatchError(
                    f"log retention already dropped part of partition {partition} for "
                    f"{min(days).isoformat()}; replay this range with --source lake"
                )
            consumer.seek(partition, first)
        tables: list[pa.Table] = []
        try:
            positions = {p: consumer.position(p) for p in partitions}
            while any(positions[p] < ends.get(p, 0) for p in partitions):
                batches = consumer.poll_batches(200_000, timeout_s=0.1)
                for batch in batches:
                    end = ends.get(batch.partition, 0)
                    values = batch.values[: max(0, end - batch.first_offset)]
                    positions[batch.partition] = batch.first_offset + len(batch.values)
                    if not values:
                        continue
                    table = EVENTS_SINK.decode(values)
                    offsets = np.arange(batch.first_offset, batch.first_offset + len(values))
                    table = EVENTS_SINK.finish(
                        table, np.full(len(values), batch.partition), offsets
                    )
                    tables.append(table.select(LAKE_SCHEMA.names).cast(LAKE_SCHEMA))
                if not batches:
                    positions = {
                        p: max(positions[p], consumer.position(p)) for p in partitions
                    }
        finally:
            consumer.close()
        if not tables:
            return {d: LAKE_SCHEMA.empty_table() for d in days}
        everything = pa.concat_tables(tables)
        # Client retries: the same event_id later in the log (same partition).
        order = pc.sort_indices(everything, [("_partition", "ascending"), ("_offset", "ascending")])
        everything = everything.take(order)
        ids = everything.column("event_id").to_numpy(zero_copy_only=False)
        _, first_index = np.unique(ids, return_index=True)
        everything = everything.take(pa.array(np.sort(first_index)))
        ts = everything.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
        return {
            d: everything.filter(pa.array((ts >= lo) & (ts < hi))) for d, (lo, hi) in wanted.items()
        }

    # -- one day -----------------------------------------------------------------
    def recompute_day(
        self,
        day: date | str,
        metrics: Sequence[Metric] | None = None,
        *,
        source: str = "lake",
        log_table: pa.Table | None = None,
        now: int | None = None,
    ) -> list[ReconciliationRow]:
        """Recompute ``day`` for ``metrics`` (all by default) from ``source``
        ("lake"; "log" with ``log_table`` from ``read_log_days``; or "raw", the
        raw table alone, for days still inside its retention) and replace
        the day's rollup partitions. Returns the reconciliation rows (also
        written to the ``reconciliation`` table)."""
        day = day_of(day)
        metrics = list(self.store.metrics if metrics is None else metrics)
        if not metrics:
            return []
        now = now_ms() if now is None else now
        columns = sorted(
            set().union(*(metric_columns(m) for m in metrics))
            | {"event_id", "ts", "received_at", "user_id", "distinct_id", "_partition", "_offset"}
        )
        with _BATCH_LOCK:
            started = time.monotonic()
            self.store.command(SQL["truncate"].format(table="lake_batch_events"))
            cuts = self.cuts(source)
            if source == "raw":
                # Everything comes from the raw table (the "tail" of an empty read).
                cuts = [0] * len(cuts)
                staged = 0
            elif source == "lake":
                staged = self._stage_lake(day, cuts, columns)
            elif source == "log":
                table = log_table if log_table is not None else self.read_log_days([day])[day]
                table = self._prepare(table, cuts, columns)
                staged = table.num_rows
                if staged:
                    self.store.insert_arrow("lake_batch_events", table)
            else:
                raise BatchError(f"source: expected 'lake', 'log' or 'raw', got {source!r}")
            # The store's lock keeps the loader (and so every materialized view)
            # from inserting between reading the raw tail and the replace.
            with self.store._lock:
                before = self.store.scalar("SELECT count() FROM lake_batch_events")
                self.store.command(
                    SQL["raw_tail"].format(),
                    {"day_id": int(day.strftime("%Y%m%d")), "cuts": cuts},
                )
                tail = int(self.store.scalar("SELECT count() FROM lake_batch_events")) - int(before)
                rows: list[ReconciliationRow] = []
                for metric in metrics:
                    rows.extend(self._replace_metric(metric, day, now, staged, tail, source))
            self._write_report(rows, now)
            if self.on_revised is not None:
                self.on_revised(*day_bounds_ms(day))
            log.info(
                "batch %s from %s: %d events (+%d raw tail), %d metric(s) in %.1fs",
                day, source, staged, tail, len(metrics), time.monotonic() - started,
            )
            return rows

    def _render(self, name: str, metric: Metric, granularity: str, **extra: Any) -> str:
        return render_rollup_sql(SQL[name], metric, granularity, **extra)

    def _replace_metric(
        self, metric: Metric, day: date, now: int, staged: int, tail: int, source: str
    ) -> list[ReconciliationRow]:
        params = {"day": day}
        partition_id = day.strftime("%Y%m%d")
        day_end = day_bounds_ms(day)[1]
        granularities = ["1d"]
        if day_end > now - self.rollup_5m_ttl_ms:
            granularities.insert(0, "5m")
        streaming = self.store.query_rows(self._render("totals", metric, "1d"), params)[1][0]
        changed = 0
        for granularity in granularities:
            stage = f"lake_stage_{metric.name}_{granularity}"
            self.store.command(self._render("create_stage", metric, granularity))
            self.store.command(SQL["truncate"].format(table=stage))
            self._insert_select(self._render("stage_states", metric, granularity), params)
            if granularity == granularities[0]:
                changed = int(
                    self.store.scalar(self._render("changed_windows", metric, granularity), params)
                )
        batch = self.store.query_rows(
            self._render("totals", metric, "1d").replace(
                metric.rollup_table("1d"), f"lake_stage_{metric.name}_1d"
            ),
            params,
        )[1][0]
        late, _ = self.store.query_rows(self._render("late_events", metric, "1d"), params)[1][0]
        for granularity in granularities:
            stage = f"lake_stage_{metric.name}_{granularity}"
            table = metric.rollup_table(granularity)
            target = partition_id
            if self._monthly(table):
                # The caller holds the store lock: no view inserts into the
                # month between this copy and the replace.
                target = day.strftime("%Y%m")
                self._insert_select(
                    SQL["stage_month_rest"].format(table=table, stage=stage),
                    {"day": day, "month_id": int(target)},
                )
            has_rows = int(self.store.scalar(f"SELECT count() FROM {stage}"))
            name = "replace_partition" if has_rows else "drop_partition"
            self.store.command(SQL[name].format(table=table, stage=stage, partition_id=target))
            self.store.command(SQL["truncate"].format(table=stage))
        return [
            ReconciliationRow(
                day=day,
                metric=metric.name,
                aggregation=a.alias,
                kind=a.function,
                streaming_value=float(streaming[i] or 0),
                batch_value=float(batch[i] or 0),
                changed_windows=changed,
                late_events=int(late),
                batch_events=int(staged + tail),
                tail_events=int(tail),
                source=source,
            )
            for i, a in enumerate(metric.aggregations)
        ]

    def _monthly(self, table: str) -> bool:
        """Whether ``table`` is partitioned by month (daily rollups since
        decision 080; data directories created before keep day partitions)."""
        key = str(self.store.scalar(SQL["partition_key"].format(), {"table": table}) or "")
        return key.replace(" ", "").startswith("toYYYYMM(")

    def _insert_select(self, sql: str, params: dict[str, Any]) -> None:
        # The staging tables inherit non_replicated_deduplication_window from
        # the rollups; a re-run of the same day must not be dropped as a
        # duplicate block, so deduplication is off for these inserts.
        with self.store._lock:
            self.store.client.command(sql, parameters=params, settings={"insert_deduplicate": 0})

    def _write_report(self, rows: list[ReconciliationRow], now: int) -> None:
        if not rows:
            return
        run_at = datetime.fromtimestamp(now / 1000, UTC)
        table = pa.table(
            {
                "run_at": pa.array([run_at] * len(rows), pa.timestamp("ms", tz="UTC")),
                "day": pa.array([r.day for r in rows], pa.date32()),
                "metric": [r.metric for r in rows],
                "aggregation": [r.aggregation for r in rows],
                "kind": [r.kind for r in rows],
                "streaming_value": [r.streaming_value for r in rows],
                "batch_value": [r.batch_value for r in rows],
                "difference": [r.difference for r in rows],
                "changed_windows": pa.array([r.changed_windows for r in rows], pa.uint64()),
                "late_events": pa.array([r.late_events for r in rows], pa.uint64()),
                "batch_events": pa.array([r.batch_events for r in rows], pa.uint64()),
                "tail_events": pa.array([r.tail_events for r in rows], pa.uint64()),
                "source": [r.source for r in rows],
            }
        )
        self.store.insert_arrow("reconciliation", table)

    # -- many days -----------------------------------------------------------------
    def recompute_days(
        self,
        days: Iterable[date],
        metrics: Sequence[Metric] | None = None,
        *,
        source: str = "lake",
        progress: bool = False,
        description: str = "batch",
    ) -> list[ReconciliationRow]:
        from tqdm import tqdm

        days = sorted(set(days))
        log_tables = self.read_log_days(days) if source == "log" and days else {}
        rows: list[ReconciliationRow] = []
        for day in tqdm(days, desc=description, unit="day", disable=not progress):
            rows.extend(
                self.recompute_day(day, metrics, source=source, log_table=log_tables.get(day))
            )
        return rows

    def backfill(self, metric_name: str, *, progress: bool = False) -> list[ReconciliationRow]:
        """Compute ``metric_name`` over every day the lake holds."""
        metric = self.metric(metric_name)
        return self.recompute_days(self.lake.days(), [metric], progress=progress, description=f"backfill {metric_name}")

    def metric(self, name: str) -> Metric:
        if name not in self.store.metrics_by_name:
            known = ", ".join(sorted(self.store.metrics_by_name))
            raise BatchError(f"metric: unknown metric {name!r} (configured: {known})")
        return self.store.metrics_by_name[name]

    def nightly_due(self, now: int, last_done: date | None) -> list[date]:
        """Days whose nightly batch is due at ``now``: closed for longer than
        the largest out-of-orderness + allowed lateness + ``lake.batch_delay``."""
        slack = max(
            (m.out_of_orderness_ms + m.allowed_lateness_ms for m in self.store.metrics), default=0
        ) + parse_duration_ms(self.config.lake.batch_delay)
        newest = datetime.fromtimestamp((now - slack) / 1000, UTC).date() - timedelta(days=1)
        if last_done is None:
            return [newest]
        out = []
        day = last_done + timedelta(days=1)
        while day <= newest:
            out.append(day)
            day += timedelta(days=1)
        return out
