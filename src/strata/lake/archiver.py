"""The archiver: log topic ``events`` -> Parquet lake, exactly once by event_id.

Consumer group ``archiver``. Records are buffered per log partition; a
partition *rolls* when its buffer holds ``lake.roll_bytes`` of records or its
oldest record waited ``lake.roll_interval`` (memory is bounded by
partitions x roll_bytes). A roll is executed like the loader's micro-batch:

1. write the *plan* (offset range per rolled partition) and the dedup index
   lengths to ``<data_dir>/archiver/checkpoint.json`` (atomic rename);
2. decode, drop ids the dedup index has seen (client retries, same rule and
   horizon as the loader), drop records of deleted users (strata.masking);
3. write one file per (partition, date, event_type) named from the plan's
   range (``p{partition}-{first}-{last}.parquet``), each an atomic commit;
4. add the new ids to the dedup index (fsync), checkpoint the new offsets
   with no plan, then commit the group's offsets in the log (for lag and
   log retention; the checkpoint is the source of truth).

After kill -9 at any moment, start-up cuts the dedup index back to the
checkpoint and re-executes a pending plan: same records, same filtering,
so the same files are overwritten with the same bytes. Files are therefore
never duplicated, and an event is in the lake exactly once by event_id.

Run standalone with ``python -m strata.lake.archiver [--config F] [--drain]``
(distributed shape); in ``strata serve`` it is the pipeline component
``archiver``. SIGTERM / ``stop`` drains what is already in the log first.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from strata.config import Config, load_config, parse_duration_ms
from strata.durable import atomic_write_json, read_json
from strata.events import now_ms
from strata.lake.base import LAKE_SCHEMA, Lake, file_relpath
from strata.loader.dedup import DEFAULT_HOT_WINDOW_MS, DedupIndex, hash_ids
from strata.loader.sinks import EVENTS_SINK
from strata.log import Log, RecordBatch, open_log
from strata.masking import DeletedUsers

log = logging.getLogger("strata.archiver")

DAY_MS = 86_400_000


@dataclass
class _Buffer:
    first_offset: int
    values: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    opened_at: float = field(default_factory=time.monotonic)

    @property
    def last_offset(self) -> int:
        return self.first_offset + len(self.values) - 1


@dataclass
class ArchiverStats:
    archived_rows: int = 0
    duplicate_rows: int = 0
    masked_rows: int = 0
    files_written: int = 0
    rolls: int = 0
    errors: int = 0
    last_error: str = ""
    last_roll_ms: int = 0


class Archiver:
    GROUP = "archiver"
    TOPIC = "events"

    def __init__(
        self,
        log_: Log,
        lake: Lake,
        directory: Path,
        *,
        deleted_users: DeletedUsers,
        dedup_horizon_ms: int,
        dedup_hot_window_ms: int = DEFAULT_HOT_WINDOW_MS,
        roll_bytes: int = 64 * 2**20,
        roll_interval_ms: int = 60_000,
        max_poll_events: int = 50_000,
        partitions: list[int] | None = None,
    ) -> None:
        self.log = log_
        self.lake = lake
        self.directory = directory
        self.deleted_users = deleted_users
        self.roll_bytes = roll_bytes
        self.roll_interval_s = roll_interval_ms / 1000
        self.max_poll_events = max_poll_events
        self.stats = ArchiverStats()
        self.checkpoint_path = directory / "checkpoint.json"
        self.dedup = DedupIndex(
            directory / "dedup", dedup_horizon_ms, hot_window_ms=dedup_hot_window_ms
        )
        self.consumer = log_.consumer(self.GROUP, self.TOPIC)
        all_partitions = list(range(log_.partitions(self.TOPIC)))
        self.consumer.assign(all_partitions if partitions is None else partitions)
        self.offsets: dict[int, int] = {}
        self.buffers: dict[int, _Buffer] = {}
        self._lock = threading.Lock()  # one roll at a time (run thread vs. drain callers)
        self.lake.clean_tmp()
        self._recover()

    @classmethod
    def from_config(cls, config: Config, log_: Log, lake: Lake | None = None) -> Archiver:
        return cls(
            log_,
            lake or Lake.open(config),
            config.data_path / "archiver",
            deleted_users=DeletedUsers(config.data_path),
            dedup_horizon_ms=parse_duration_ms(config.loader.dedup_horizon),
            dedup_hot_window_ms=parse_duration_ms(config.loader.dedup_hot_window),
            roll_bytes=config.lake.roll_bytes,
            roll_interval_ms=parse_duration_ms(config.lake.roll_interval),
            max_poll_events=config.lake.poll_events,
        )

    # -- checkpoint ----------------------------------------------------------
    def _recover(self) -> None:
        state = read_json(self.checkpoint_path, {}) or {}
        self.offsets = {int(p): int(o) for p, o in state.get("offsets", {}).items()}
        self.dedup.load({k: int(v) for k, v in state.get("dedup", {}).items()})
        self.buffers = {}
        beginning = self.log.beginning_offsets(self.TOPIC)
        for partition in self.consumer.assignment():
            start = max(self.offsets.get(partition, 0), beginning.get(partition, 0))
            self.offsets[partition] = start
            self.consumer.seek(partition, start)
        plan = state.get("plan")
        if plan:
            ranges = {int(p): (int(a), int(b)) for p, (a, b) in plan.items()}
            log.info("archiver: re-executing pending plan %s", ranges)
            batches = self.consumer.read_ranges(
                ranges, resume_at=self.offsets, max_records=self.max_poll_events
            )
            self._execute({p: b.values for p, b in batches.items()}, ranges)

    def _write_checkpoint(self, plan: dict[int, tuple[int, int]] | None) -> None:
        atomic_write_json(
            self.checkpoint_path,
            {
                "offsets": {str(p): o for p, o in self.offsets.items()},
                "plan": None if plan is None else {str(p): list(r) for p, r in plan.items()},
                "dedup": self.dedup.lengths(),
            },
        )

    # -- one roll ------------------------------------------------------------
    def _execute(self, records: dict[int, list[bytes]], ranges: dict[int, tuple[int, int]]) -> None:
        new_ids: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        for partition in sorted(ranges):
            first, last = ranges[partition]
            values = records.get(partition, [])
            if len(values) != last - first + 1:
                raise RuntimeError(f"archiver: partition {partition} plan {first}-{last} incomplete")
            table = EVENTS_SINK.decode(values)
            offsets = np.arange(first, last + 1, dtype=np.uint64)
            hashes = hash_ids(table.column("event_id").to_pylist())
            event = table.column("ts").to_numpy(zero_copy_only=False)
            keep = self.dedup.first_unseen(partition, hashes, event)
            received = table.column("received_at").to_numpy(zero_copy_only=False)
            # Masked (deleted-user) ids still enter the index, so a later
            # client retry of them is not archived either.
            new_ids.append((partition, hashes[keep], event[keep], received[keep]))
            self.stats.duplicate_rows += int(len(keep) - keep.sum())
            mask = self.deleted_users.keep_mask(table)
            if mask is not None:
                self.stats.masked_rows += int((keep & ~mask).sum())
                keep = keep & mask
            if not keep.all():
                table = table.filter(pa.array(keep))
                offsets = offsets[keep]
            self._write_partition(partition, first, last, table, offsets)
        for partition, hashes, event, received in new_ids:
            self.dedup.add(partition, hashes, event, received)
        self.dedup.expire(now_ms())
        for partition, (_, last) in ranges.items():
            self.offsets[partition] = last + 1
        self._write_checkpoint(None)
        self.consumer.commit(dict(self.offsets))
        self.stats.rolls += 1
        self.stats.last_roll_ms = now_ms()

    def _write_partition(
        self, partition: int, first: int, last: int, table: pa.Table, offsets: np.ndarray
    ) -> None:
        if table.num_rows == 0:
            return
        table = EVENTS_SINK.finish(table, np.full(table.num_rows, partition), offsets)
        table = table.select(LAKE_SCHEMA.names).cast(LAKE_SCHEMA)
        day_index = table.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False) // DAY_MS
        encoded = pc.dictionary_encode(table.column("event_type")).combine_chunks()
        type_names = encoded.dictionary.to_pylist()
        type_index = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        keys = day_index.astype(np.int64) * len(type_names) + type_index
        for key in np.unique(keys):
            day = datetime.fromtimestamp(int(key // len(type_names)) * 86_400, UTC).date()
            event_type = type_names[int(key % len(type_names))]
            part = table.filter(pa.array(keys == key))
            relpath = file_relpath(day, event_type, partition, first, last)
            self.lake.write(relpath, part)
            self.stats.files_written += 1
            self.stats.archived_rows += part.num_rows

    def _roll(self, partitions: list[int]) -> None:
        ranges = {p: (self.buffers[p].first_offset, self.buffers[p].last_offset) for p in partitions}
        records = {p: self.buffers.pop(p).values for p in partitions}
        self._write_checkpoint(ranges)
        self._execute(records, ranges)

    # -- consuming -----------------------------------------------------------
    def _buffer(self, batch: RecordBatch) -> None:
        buffer = self.buffers.get(batch.partition)
        if buffer is None:
            buffer = self.buffers[batch.partition] = _Buffer(batch.first_offset)
        if batch.first_offset != buffer.last_offset + 1:
            raise RuntimeError(
                f"archiver: partition {batch.partition} skipped from "
                f"{buffer.last_offset + 1} to {batch.first_offset}"
            )
        buffer.values.extend(batch.values)
        buffer.nbytes += sum(len(v) for v in batch.values)

    def run_once(self, timeout_s: float = 0.2, *, force: bool = False) -> int:
        """Poll once and roll the partitions that are due (all buffered ones
        when ``force``). Returns the number of records polled."""
        with self._lock:
            batches = self.consumer.poll_batches(self.max_poll_events, timeout_s=timeout_s)
            for batch in batches:
                self._buffer(batch)
            now = time.monotonic()
            due = [
                p
                for p, b in self.buffers.items()
                if force or b.nbytes >= self.roll_bytes or now - b.opened_at >= self.roll_interval_s
            ]
            if due:
                self._roll(sorted(due))
            return sum(len(b.values) for b in batches)

    def drain(self) -> int:
        """Archive everything the log holds now; returns records archived."""
        total = 0
        ends = self.log.end_offsets(self.TOPIC)
        while True:
            got = self.run_once(timeout_s=0.0, force=False)
            total += got
            behind = any(
                self.offsets.get(p, 0) + len(self.buffers[p].values if p in self.buffers else [])
                < ends.get(p, 0)
                for p in self.consumer.assignment()
            )
            if got == 0 and not behind:
                break
            if got == 0:
                time.sleep(0.05)  # a concurrent append not yet visible to this reader
        self.run_once(timeout_s=0.0, force=True)
        return total

    def run(self, stop: threading.Event) -> None:
        """Archive until ``stop`` is set, then drain what is in the log."""
        while not stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # keep going; surfaced through status()
                self.stats.errors += 1
                self.stats.last_error = str(exc)[:500]
                log.exception("archiver: roll failed; retrying from the checkpoint")
                stop.wait(1.0)
                with self._lock:
                    self._recover()
        try:
            self.drain()
        except Exception:
            log.exception("archiver: drain on stop failed; the checkpoint resumes it")

    # -- reporting -----------------------------------------------------------
    def lag(self) -> int:
        ends = self.log.end_offsets(self.TOPIC)
        return sum(max(0, end - self.offsets.get(p, 0)) for p, end in ends.items())

    def status(self) -> dict[str, Any]:
        return {
            "committed_offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "lag_events": self.lag(),
            "buffered_events": sum(len(b.values) for b in self.buffers.values()),
            "archived_rows": self.stats.archived_rows,
            "duplicates_dropped": self.stats.duplicate_rows,
            "masked_rows": self.stats.masked_rows,
            "files_written": self.stats.files_written,
            "errors": self.stats.errors,
            "last_error": self.stats.last_error or None,
        }

    def close(self) -> None:
        self.consumer.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m strata.lake.archiver``: run the archiver on its own."""
    parser = argparse.ArgumentParser(prog="strata-archiver")
    parser.add_argument("--config")
    parser.add_argument("--data-dir")
    parser.add_argument("--drain", action="store_true", help="archive what the log holds, then exit")
    args = parser.parse_args(argv)
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    config = load_config(args.config, overrides=overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log_ = open_log(config)
    archiver = Archiver.from_config(config, log_)
    try:
        if args.drain:
            archiver.drain()
            return 0
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        log.info("archiver: running (pid %d)", os.getpid())
        archiver.run(stop)
        return 0
    finally:
        archiver.close()
        log_.close()


if __name__ == "__main__":
    sys.exit(main())
