"""The loader: log topic -> store table, exactly once.

One ``Loader`` per sink (topic -> table). Each cycle:

1. poll a micro-batch of consecutive records per partition;
2. write the *plan* (the offset range per partition) to the checkpoint;
3. drop records whose id the dedup index has seen (client retries);
4. insert the rest with ``insert_deduplication_token`` derived from the plan,
   so a replay of the same plan is dropped by the store, in the table and in
   every materialized-view rollup;
5. add the new ids to the dedup index (fsync), then checkpoint the new
   offsets with the index's file lengths and clear the plan (atomic rename).

After a crash at any point, start-up cuts the dedup index back to the
checkpoint and re-executes a pending plan exactly: same records, same
filtering, same token. The group's offsets in the log are committed after
the checkpoint, for lag reporting and retention only; the checkpoint is the
source of truth.

The token alone does not make a re-execution exact on a non-replicated
MergeTree (chDB): the store records a block's token in its deduplication
log and commits the block's part in two steps, so a kill -9 between them
leaves a token without its rows (the re-execution is then dropped: rows
lost), and a store that records the token after the part (upstream
ClickHouse since 2026) leaves rows without their token (stored twice). So
a re-executed plan is *verified*: its rows are looked up by their log
position (``_partition``, ``_offset``) and repaired, missing rows attached
and doubled rows removed, through a staging table and ATTACH / REPLACE
PARTITION, which do not fire the materialized views (decision 093).

On chDB, Python decodes only the fields the steps above need; the store
parses each record's JSON inside the insert, and the next micro-batch is
read and decoded while one is being inserted (decision 101).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from strata.durable import atomic_write_json, read_json
from strata.events import now_ms
from strata.loader.dedup import DEFAULT_HOT_WINDOW_MS, DedupIndex, hash_ids
from strata.loader.sinks import Sink
from strata.log.base import Consumer, Log, RecordBatch, merge_batches
from strata.masking import DeletedUsers
from strata.metrics import Metric
from strata.store import Store, StoreError
from strata.store.client import insert_arrow_in_process, reads_arrow_in_place
from strata.store.ddl import GRANULARITIES, named_statements, render_rollup_sql

log = logging.getLogger("strata.loader")


REPAIR_SQL = named_statements("loader_repair.sql")
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()  # 719163


@dataclass
class LoaderStats:
    inserted_rows: int = 0
    duplicate_rows: int = 0
    batches: int = 0
    last_insert_ms: int = 0
    errors: int = 0
    last_error: str = ""
    # Rows of re-executed plans the store had lost or stored twice (repaired).
    repaired_missing_rows: int = 0
    repaired_duplicate_rows: int = 0
    # Rollup partitions rebuilt from the raw table after a re-executed plan.
    repaired_rollup_partitions: int = 0
    # Highest event time seen per partition (for the status endpoint).
    max_event_ts: dict[int, int] = field(default_factory=dict)


class _Decoded(NamedTuple):
    """One partition's records of a micro-batch, decoded (``Loader._decode``)."""

    batch: RecordBatch
    table: pa.Table
    hashes: np.ndarray | None


class _Prefetch(threading.Thread):
    """Polls and decodes the next micro-batch without waiting for records."""

    def __init__(self, loader: Loader) -> None:
        super().__init__(name=f"loader-{loader.sink.topic}-prefetch", daemon=True)
        self.loader = loader
        self.decoded: list[_Decoded] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        loader = self.loader
        try:
            batches = loader.consumer.poll_batches(loader.max_batch_events, timeout_s=0.0)
            if batches:
                self.decoded = loader._decode(list(merge_batches(batches).values()))
        except BaseException as exc:  # surfaced by the cycle that takes it
            self.error = exc


class Loader:
    GROUP = "loader"

    def __init__(
        self,
        log: Log,
        store: Store,
        sink: Sink,
        directory: Path,
        *,
        dedup_horizon_ms: int,
        dedup_hot_window_ms: int = DEFAULT_HOT_WINDOW_MS,
        max_batch_events: int = 200_000,
        max_wait_ms: int = 250,
        partitions: list[int] | None = None,
        prefetch: bool = True,
    ) -> None:
        """``prefetch``: read and decode the next micro-batch while one is
        being inserted (a second thread; off: one thread, strictly in turn)."""
        self.log = log
        self.store = store
        self.sink = sink
        self.directory = directory
        self.max_batch_events = max_batch_events
        self.max_wait_ms = max_wait_ms
        self.stats = LoaderStats()
        # Users deleted with `strata delete-user` whose records the log still
        # holds: masked on this read path (docs/storage.md).
        self.deleted_users = DeletedUsers(directory.parent.parent) if sink.topic == "events" else None
        self.checkpoint_path = directory / "checkpoint.json"
        self.dedup = (
            DedupIndex(directory / "dedup", dedup_horizon_ms, hot_window_ms=dedup_hot_window_ms)
            if sink.id_field
            else None
        )
        self.consumer: Consumer = log.consumer(f"{self.GROUP}-{sink.topic}", sink.topic)
        all_partitions = list(range(log.partitions(sink.topic)))
        self.consumer.assign(all_partitions if partitions is None else partitions)
        self.offsets: dict[int, int] = {}
        # On chDB the store parses the records (decision 101): Python decodes
        # only the key fields, the engine reads the JSON text in place.
        self._parse_in_store = reads_arrow_in_place(store.client)
        self._extract_select = sink.extract_select("{source}")
        self.prefetch = prefetch
        self._prefetch: _Prefetch | None = None
        # The event times (epoch ms, an int64 Arrow array) of the rows about
        # to be stored, called before the insert and again after it
        # (decision 102): the pipeline reports rows that land in already
        # finalized days through on_revised, so nothing that holds a final
        # day serves it stale.
        self.on_event_times: Callable[[pa.Array], None] | None = None
        self._recover()

    # -- checkpoint ----------------------------------------------------------
    def _recover(self) -> None:
        self._drop_prefetch()
        state = read_json(self.checkpoint_path, {}) or {}
        self.offsets = {int(p): int(o) for p, o in state.get("offsets", {}).items()}
        if self.dedup is not None:
            self.dedup.load({k: int(v) for k, v in state.get("dedup", {}).items()})
        beginning = self.log.beginning_offsets(self.sink.topic)
        for partition in self.consumer.assignment():
            start = max(self.offsets.get(partition, 0), beginning.get(partition, 0))
            self.offsets[partition] = start
            self.consumer.seek(partition, start)
        plan = state.get("plan")
        if plan:
            ranges = {int(p): (int(a), int(b)) for p, (a, b) in plan.items()}
            log.info("loader %s: re-executing pending plan %s", self.sink.topic, ranges)
            batches = self.consumer.read_ranges(
                ranges, resume_at=self.offsets, max_records=self.max_batch_events
            )
            self._execute(list(batches.values()), ranges, verify=True)

    def _write_checkpoint(self, plan: dict[int, tuple[int, int]] | None) -> None:
        atomic_write_json(
            self.checkpoint_path,
            {
                "offsets": {str(p): o for p, o in self.offsets.items()},
                "plan": None if plan is None else {str(p): list(r) for p, r in plan.items()},
                "dedup": self.dedup.lengths() if self.dedup is not None else {},
            },
        )

    # -- one cycle -----------------------------------------------------------
    def run_once(self, timeout_s: float | None = None) -> int:
        """Load one micro-batch; returns the number of records consumed."""
        wait = self.max_wait_ms / 1000 if timeout_s is None else timeout_s
        decoded = self._take_prefetched()
        if decoded is None:
            batches = self.consumer.poll_batches(self.max_batch_events, timeout_s=wait)
            if not batches:
                return 0
            decoded = self._decode(list(merge_batches(batches).values()))
        ranges = {d.batch.partition: (d.batch.first_offset, d.batch.last_offset) for d in decoded}
        self._write_checkpoint(ranges)
        self._execute_decoded(decoded, ranges)
        return sum(len(d.batch.values) for d in decoded)

    def _decode(self, batches: list[RecordBatch]) -> list[_Decoded]:
        """Decode and hash the records of ``batches``: no side effects and
        no state of the loader read, so it can run ahead in another thread
        (``_start_prefetch``)."""
        decoded = []
        for batch in sorted(batches, key=lambda b: b.partition):
            table = (
                self.sink.decode_keys(batch.values)
                if self._parse_in_store
                else self.sink.decode(batch.values)
            )
            hashes = None
            if self.dedup is not None and self.sink.id_field:
                hashes = hash_ids(table.column(self.sink.id_field).to_pylist())
            decoded.append(_Decoded(batch, table, hashes))
        return decoded

    # -- prefetch: the next micro-batch is read and decoded while this one
    # is in the store (chDB releases the GIL). It has no durable effect; the
    # plan of a prefetched batch is checkpointed when it executes, and a
    # failed cycle drops the prefetch with the consumer's positions.
    def _start_prefetch(self) -> None:
        if not self.prefetch or self._prefetch is not None:
            return
        self._prefetch = _Prefetch(self)
        self._prefetch.start()

    def _finish_prefetch(self) -> None:
        """Wait until the prefetch stopped using the consumer."""
        if self._prefetch is not None:
            self._prefetch.join()

    def _take_prefetched(self) -> list[_Decoded] | None:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is None:
            return None
        prefetch.join()
        if prefetch.error is not None:
            raise prefetch.error
        return prefetch.decoded or None

    def _drop_prefetch(self) -> None:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:
            prefetch.join()

    def _execute(
        self,
        batches: list[RecordBatch],
        ranges: dict[int, tuple[int, int]],
        *,
        verify: bool = False,
    ) -> None:
        self._execute_decoded(self._decode(batches), ranges, verify=verify)

    def _execute_decoded(
        self,
        decoded: list[_Decoded],
        ranges: dict[int, tuple[int, int]],
        *,
        verify: bool = False,
    ) -> None:
        tables: list[pa.Table] = []
        new_ids: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        duplicates = 0
        for batch, table, hashes in decoded:
            offsets = np.arange(batch.first_offset, batch.first_offset + len(batch.values))
            if self.dedup is not None and hashes is not None:
                received = table.column(self.sink.received_field).to_numpy()
                event_field = self.sink.event_time_field
                event = table.column(event_field).to_numpy() if event_field else received
                keep = self.dedup.first_unseen(batch.partition, hashes, event)
                new_ids.append((batch.partition, hashes[keep], event[keep], received[keep]))
                kept = int(keep.sum())
                duplicates += len(keep) - kept
                if kept < len(keep):
                    table = table.filter(pa.array(keep))
                    offsets = offsets[keep]
            keep_mask = self.deleted_users.keep_mask(table) if self.deleted_users else None
            if keep_mask is not None:
                table = table.filter(pa.array(keep_mask))
                offsets = offsets[keep_mask]
            if table.num_rows:
                if "ts" in table.column_names:
                    top = int(pc.max(table.column("ts")).as_py())
                    seen = self.stats.max_event_ts.get(batch.partition, 0)
                    self.stats.max_event_ts[batch.partition] = max(seen, top)
                partition_column = np.full(table.num_rows, batch.partition)
                tables.append(self.sink.finish(table, partition_column, offsets))
        if not verify:
            self._start_prefetch()
        if tables:
            token = self.dedup_token(ranges)
            # One chunk per column: chDB turns each Arrow chunk into a block
            # that every rollup view processes on its own (measured: an
            # 8-partition batch inserts in half the time as one chunk).
            data = pa.concat_tables(tables).combine_chunks()
            times = self._event_times(data)
            if times is not None:
                self.on_event_times(times)  # type: ignore[misc]
            self._insert(data, token)
            if times is not None:
                self.on_event_times(times)  # type: ignore[misc]
            if verify and self.sink.with_position:
                self._repair(data)
                if self.sink.table == "events":
                    self._rebuild_rollups(data)
        if self.dedup is not None:
            for partition, hashes, event, received in new_ids:
                self.dedup.add(partition, hashes, event, received)
            self.dedup.expire(now_ms())
        for partition, (_, last) in ranges.items():
            self.offsets[partition] = last + 1
        self._write_checkpoint(None)
        self._finish_prefetch()
        self.consumer.commit(dict(self.offsets))
        self.stats.inserted_rows += sum(t.num_rows for t in tables)
        self.stats.duplicate_rows += duplicates
        self.stats.batches += 1
        self.stats.last_insert_ms = now_ms()

    def _event_times(self, data: pa.Table) -> pa.Array | None:
        field = self.sink.event_time_field
        if self.on_event_times is None or not field or field not in data.column_names:
            return None
        return data.column(field).combine_chunks().cast(pa.int64())

    def _insert(self, data: pa.Table, token: str) -> None:
        """``Store.insert_arrow(table, data, token)``: the same settings, the
        same deduplication of a repeated token in the table and every rollup.
        On chDB the engine reads ``data`` in place and parses its records'
        JSON itself (decision 101)."""
        self._insert_into(self.sink.table, data, {
            "insert_deduplication_token": token,
            "deduplicate_blocks_in_dependent_materialized_views": 1,
        })

    def _insert_into(self, table: str, data: pa.Table, settings: dict[str, object]) -> None:
        """Insert ``data`` (a ``finish``ed table of ``decode`` or, on chDB,
        of ``decode_keys``) into ``table``, one of the sink table's shape."""
        select = self._extract_select if self._parse_in_store else None
        with self.store._lock:
            try:
                insert_arrow_in_process(self.store.client, table, data, settings, select=select)
            except Exception as exc:
                raise StoreError(f"insert into {table} failed: {exc}") from exc

    # -- repair of a re-executed plan (decision 093) --------------------------
    def _repair(self, data: pa.Table) -> None:
        """Make the table hold every row of ``data`` (a re-executed plan, just
        inserted with its token) exactly once, by log position.

        Missing rows are staged and attached; a table partition holding a
        row twice is rebuilt in staging with one row per position and
        swapped in. Neither fires the materialized views: the token insert
        already fed them, and they deduplicate it on their own. Runs under
        the store's lock (as the batch job's replaces, decision 032), so no
        other write to the table lands between a copy and its replace."""
        with self.store._lock:
            self._repair_locked(data)

    def _repair_locked(self, data: pa.Table) -> None:
        table = self.sink.table
        expected = set(zip(data.column("_partition").to_pylist(),
                           data.column("_offset").to_pylist(), strict=True))
        stored = self._stored_positions(data)
        missing = expected - stored.keys()
        doubled = {key: n for key, n in stored.items() if key in expected and n > 1}
        if not missing and not doubled:
            return
        staging = f"{table}_loader_repair"
        if doubled:
            partition_ids = self._partition_ids_of(doubled.keys())
            log.warning("loader %s: re-executed plan stored %d rows twice (partitions %s); "
                        "removing the copies", self.sink.topic, sum(n - 1 for n in doubled.values()),
                        sorted(partition_ids))
            for partition_id in sorted(partition_ids):
                self._prepare_staging(staging)
                self.store.command(
                    REPAIR_SQL["stage_partition_once"].format(staging=staging, table=table),
                    {"partition_id": partition_id},
                )
                self.store.command(REPAIR_SQL["replace_partition"].format(
                    table=table, staging=staging, partition_id=partition_id))
            self.stats.repaired_duplicate_rows += sum(n - 1 for n in doubled.values())
        if missing:
            log.warning("loader %s: re-executed plan found %d rows missing from %s "
                        "(the store dropped them as already inserted); attaching them",
                        self.sink.topic, len(missing), table)
            keep = np.array([key in missing for key in zip(
                data.column("_partition").to_pylist(), data.column("_offset").to_pylist(),
                strict=True)])
            self._prepare_staging(staging)
            self._insert_into(staging, data.filter(pa.array(keep)), {"insert_deduplicate": 0})
            for partition_id in self._staged_partition_ids(staging):
                self.store.command(REPAIR_SQL["attach_partition"].format(
                    table=table, staging=staging, partition_id=partition_id))
            self.stats.repaired_missing_rows += len(missing)
        self._prepare_staging(staging)

    def _rebuild_rollups(self, data: pa.Table) -> None:
        """Rebuild every rollup partition the re-executed plan ``data`` touches
        from the raw table, which ``_repair`` just made exact.

        A kill -9 between a rollup's token and its part loses that part, and
        the re-execution is dropped there as a duplicate; the rollups have no
        row identity to look the loss up by, so each partition is recomputed
        with the materialized view's SELECT into a staging table and swapped
        in with REPLACE PARTITION, under the store's lock (no view insert
        lands between the copy and the replace). Days the raw table may no
        longer hold whole (raw TTL) and 5-minute days past their TTL are left
        as they are (decision 093)."""
        if not self.store.metrics or "ts" not in data.column_names or not data.num_rows:
            return
        ts = data.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
        days = sorted({date.fromordinal(_EPOCH_ORDINAL + int(d)) for d in np.unique(ts // 86_400_000)})
        tables = {
            granularity: [metric.rollup_table(granularity) for metric in self.store.metrics]
            for granularity in GRANULARITIES
        }
        _, rows = self.store.query_rows(
            REPAIR_SQL["rollup_tables"].format(),
            {"tables": ["events", *(t for names in tables.values() for t in names)]},
        )
        described = {str(name): (str(key), _ttl_ms(str(engine))) for name, key, engine in rows}
        raw_ttl_ms = described["events"][1]
        now = now_ms()
        started = time.monotonic()
        rebuilt: list[str] = []
        with self.store._lock:
            for metric in self.store.metrics:
                for granularity in GRANULARITIES:
                    table = metric.rollup_table(granularity)
                    key, ttl_ms = described[table]
                    monthly = key.replace(" ", "").startswith("toYYYYMM(")
                    by_partition: dict[str, list[date]] = {}
                    for day in days:
                        day_end = (day.toordinal() - _EPOCH_ORDINAL + 1) * 86_400_000
                        if raw_ttl_ms is not None and day_end + raw_ttl_ms <= now:
                            log.warning("loader %s: %s of %s is past the raw table's TTL; "
                                        "not rebuilt from it", self.sink.topic, day, table)
                            continue
                        if ttl_ms is not None and day_end <= now - ttl_ms:
                            continue  # compaction's TTL already dropped it
                        partition_id = day.strftime("%Y%m" if monthly else "%Y%m%d")
                        by_partition.setdefault(partition_id, []).append(day)
                    for partition_id, partition_days in sorted(by_partition.items()):
                        self._rebuild_rollup_partition(
                            metric, granularity, partition_id, partition_days, monthly)
                        rebuilt.append(f"{table}/{partition_id}")
        if rebuilt:
            self.stats.repaired_rollup_partitions += len(rebuilt)
            log.warning("loader %s: re-executed plan: rebuilt %d rollup partition(s) from the "
                        "raw table in %.2fs: %s", self.sink.topic, len(rebuilt),
                        time.monotonic() - started, ", ".join(rebuilt))

    def _rebuild_rollup_partition(
        self, metric: Metric, granularity: str, partition_id: str, days: list[date],
        monthly: bool,
    ) -> None:
        table = metric.rollup_table(granularity)
        staging = f"{table}_loader_repair"
        partition_id = _partition_id(partition_id)
        for name in ("create_staging", "truncate_staging"):
            self.store.command(REPAIR_SQL[name].format(staging=staging, table=table))
        # Staging inherits non_replicated_deduplication_window: a rebuild of
        # the same day must not be dropped as a repeated block.
        no_dedup = {"insert_deduplicate": 0}
        for day in days:
            self.store.client.command(
                render_rollup_sql(REPAIR_SQL["stage_rollup_day"], metric, granularity,
                                  staging=staging),
                parameters={"day": day}, settings=no_dedup,
            )
        if monthly:
            self.store.client.command(
                REPAIR_SQL["stage_month_rest"].format(staging=staging, table=table),
                parameters={"month_id": int(partition_id), "days": days}, settings=no_dedup,
            )
        has_rows = int(self.store.scalar(f"SELECT count() FROM {staging}"))
        name = "replace_partition" if has_rows else "drop_partition"
        self.store.command(REPAIR_SQL[name].format(table=table, staging=staging,
                                                   partition_id=partition_id))
        self.store.command(REPAIR_SQL["truncate_staging"].format(staging=staging))

    def _stored_positions(self, data: pa.Table) -> dict[tuple[int, int], int]:
        offsets = data.column("_offset")
        parameters: dict[str, object] = {
            "partitions": sorted(set(data.column("_partition").to_pylist())),
            "first": int(pc.min(offsets).as_py()),
            "last": int(pc.max(offsets).as_py()),
        }
        where = ""
        if "ts" in data.column_names:  # prunes day partitions of the raw table
            ts = data.column("ts").cast(pa.int64())
            parameters.update(lo=int(pc.min(ts).as_py()), hi=int(pc.max(ts).as_py()))
            where = ("AND ts >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC') "
                     "AND ts <= fromUnixTimestamp64Milli({hi:Int64}, 'UTC')")
        _, rows = self.store.query_rows(
            REPAIR_SQL["stored_positions"].format(table=self.sink.table, where=where),
            parameters,
        )
        return {(int(p), int(o)): int(n) for p, o, n in rows}

    def _partition_ids_of(self, keys: Iterable[tuple[int, int]]) -> set[str]:
        _, rows = self.store.query_rows(
            REPAIR_SQL["partitions_of_positions"].format(table=self.sink.table),
            {"keys": [tuple(key) for key in keys]},
        )
        return {_partition_id(row[0]) for row in rows}

    def _staged_partition_ids(self, staging: str) -> list[str]:
        _, rows = self.store.query_rows(REPAIR_SQL["staged_partitions"].format(staging=staging))
        return sorted(_partition_id(row[0]) for row in rows)

    def _prepare_staging(self, staging: str) -> None:
        for name in ("create_staging", "truncate_staging"):
            self.store.command(REPAIR_SQL[name].format(staging=staging, table=self.sink.table))

    def dedup_token(self, ranges: dict[int, tuple[int, int]]) -> str:
        plan = ",".join(f"{p}:{a}-{b}" for p, (a, b) in sorted(ranges.items()))
        return f"{self.sink.topic}/" + hashlib.sha256(plan.encode()).hexdigest()[:32]

    # -- running -------------------------------------------------------------
    def lag(self) -> int:
        ends = self.log.end_offsets(self.sink.topic)
        return sum(max(0, end - self.offsets.get(p, 0)) for p, end in ends.items())

    def run(self, stop: threading.Event) -> None:
        """Load until ``stop`` is set, then drain what is already in the log."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # keep loading; surface through status/health
                self.stats.errors += 1
                self.stats.last_error = str(exc)[:500]
                log.exception("loader %s: cycle failed; retrying", self.sink.topic)
                stop.wait(1.0)
                self._reset_positions()
        while self.run_once(timeout_s=0.0):
            pass

    def _reset_positions(self) -> None:
        """After a failed cycle: re-read from the checkpoint (a pending plan
        is re-executed with its token, so nothing is stored twice)."""
        self._recover()

    def close(self) -> None:
        self._drop_prefetch()
        self.consumer.close()


def _ttl_ms(engine_full: str) -> int | None:
    """The row TTL of a table from its ``engine_full`` (strata's TTLs are
    ``<column> + INTERVAL n SECOND``), or None without one."""
    found = re.search(r"\bTTL\b.*?toIntervalSecond\((\d+)\)", engine_full)
    return int(found.group(1)) * 1000 if found else None


def _partition_id(value: object) -> str:
    """A table partition id from the store, checked before it is put into an
    ALTER statement (partition ids are not bindable there)."""
    text = str(value)
    if not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", text):
        raise ValueError(f"unexpected partition id {text!r}")
    return text
