"""The processor runner: log -> engine -> serving store + output topics,
exactly once.

One cycle:

1. read a micro-batch: for each owned partition, in partition order, the
   records available now (up to ``max_batch_events`` in total);
2. feed them to the engine (one call per partition, in that order), then let
   the engine advance its watermarks at the cycle's wall-clock ``now``;
3. if anything happened, append ``{seq, now, ranges}`` to the *journal*
   (fsync) before any output leaves the process;
4. append late events and final window results to the topics ``late`` and
   ``window_results`` (deterministic ids; flush = durable);
5. write final windows, evictions and revised ranges to the serving store
   (idempotent SETs/deletes), and every ``early_firing_interval`` the groups
   that changed (early firings);
6. at least every ``checkpoint_interval``, and in every cycle with final
   firings, write the checkpoint atomically: engine state + offsets + seq;
   then truncate the journal.

After kill -9 at any point, start-up restores the checkpoint and re-executes
the journal's cycles exactly: the same record ranges, the same ``now``. The
engine is deterministic, so it produces the same outputs with the same ids
(the loader drops the duplicates) and the same serving-store states. Even
the wall-clock idle-partition decisions replay identically. The group
offsets in the log are committed after each checkpoint, for lag reporting
and retention only; the checkpoint is the source of truth.

Fenced mode (``fenced=True``, consumer-group processors, decision 090): the
processor claims its shard's owner epoch in the serving store at start-up,
every serving write carries that fence, and its checkpoint, journal and
dedup files carry the epoch in their names. It restores from the
highest-epoch checkpoint (and that epoch's journal), so a stale owner of a
lower epoch can neither overwrite the new owner's serving state (rejected
atomically in the store) nor its checkpoint, journal or dedup files (it
only writes files of its own epoch, which nobody reads any more). Such a
stale owner gets ``FencedError`` from its next write or checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

from strata.config import Config, ConfigError, parse_duration_ms
from strata.durable import atomic_write_bytes
from strata.events import now_ms
from strata.loader.dedup import DedupIndex, hash_ids
from strata.loader.sinks import EVENTS_SINK, Sink
from strata.log.base import Consumer, Log, OffsetOutOfRange, RecordBatch, merge_batches
from strata.masking import DeletedUsers
from strata.metrics import Metric, compile_metrics
from strata.processor.engine import (
    LateEvent,
    Step,
    WindowEngine,
    capped_key,
    decode_snapshot,
    encode_snapshot,
    window_result_id,
)
from strata.serving.base import Fence, FencedError, ServingStore
from strata.serving.state import WindowState, finalize, merge_values
from strata.telemetry import REGISTRY

log = logging.getLogger("strata.processor")

_json = msgspec.json.Encoder()


def shard_name(partitions: Sequence[int], total: int) -> str:
    """``all`` for every partition, else ``p0-1-2``: names state and outputs."""
    if sorted(partitions) == list(range(total)):
        return "all"
    return "p" + "-".join(str(p) for p in sorted(partitions))


def input_decoder(metrics: Sequence[Metric]) -> Sink:
    """The events sink restricted to the columns the metrics read (plus what
    late-event records carry): parsing fewer JSON fields is about twice as
    fast, and JSON decoding bounds the processor's throughput."""
    from sqlglot import exp

    # event_id: retry dedup; user_id/distinct_id/received_at: deleted users.
    needed = {"event_id", "event_type", "user_id", "distinct_id", "ts", "received_at"}
    for metric in metrics:
        needed.update(metric.dimensions)
        needed.update(a.column for a in metric.aggregations if a.column)
        if metric.filter is not None:
            needed.update(c.name for c in metric.filter.find_all(exp.Column))
    schema = pa.schema([f for f in EVENTS_SINK.schema if f.name in needed])
    return Sink(topic="events", table="events", schema=schema)


class Processor:
    """Runs the engine over the partitions it owns. ``run(stop_event)`` in a
    thread (``strata serve``) or alone (``strata process``)."""

    GROUP = "processor"

    def __init__(
        self,
        config: Config,
        log_: Log,
        serving: ServingStore,
        *,
        partitions: Sequence[int] | None = None,
        directory: Path | None = None,
        on_revised: Callable[[int, int], None] | None = None,
        fenced: bool = False,
    ) -> None:
        """``on_revised(start_ms, end_ms)`` is called for every window range
        revised by late events (the query layer drops cached results).
        ``fenced``: claim the shard's owner epoch and fence every write with
        it (see the module docstring); raises ``FencedError`` if a newer
        owner exists already."""
        self.config = config
        self.on_revised = on_revised
        self.log = log_
        self.serving = serving
        self.metrics: list[Metric] = compile_metrics(config.metrics)
        self.metrics_by_name = {m.name: m for m in self.metrics}
        self.decoder = input_decoder(self.metrics)
        settings = config.processor
        total = log_.partitions("events")
        chosen = list(partitions or settings.partitions or range(total))
        for partition in chosen:
            if not 0 <= partition < total:
                raise ConfigError(
                    f"processor.partitions: topic 'events' has no partition {partition}"
                )
        self.partitions = sorted(set(chosen))
        self.shard = shard_name(self.partitions, total)
        self.directory = directory or config.data_path / "processor" / self.shard
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fence: Fence | None = serving.claim(self.shard) if fenced else None
        epoch = self.fence.epoch if self.fence is not None else None
        # Client retries (the same event_id at a later offset) count once,
        # as in the raw table: the loader's dedup rule and horizon, with the
        # index's file lengths in this processor's checkpoint.
        self.dedup = DedupIndex(
            self.directory / "dedup",
            parse_duration_ms(config.loader.dedup_horizon),
            hot_window_ms=parse_duration_ms(config.loader.dedup_hot_window),
            epoch=epoch,
        )
        self.deleted_users = DeletedUsers(config.data_path)
        suffix = "" if epoch is None else f"-e{epoch}"
        self.checkpoint_path = self.directory / f"checkpoint{suffix}.msgpack"
        self.journal_path = self.directory / f"journal{suffix}.jsonl"
        self.max_batch_events = settings.max_batch_events
        self.early_interval_ms = parse_duration_ms(settings.early_firing_interval)
        self.checkpoint_interval_ms = parse_duration_ms(settings.checkpoint_interval)
        self.idle_timeout_ms = parse_duration_ms(settings.idle_partition_timeout)
        self.retention_ms = parse_duration_ms(settings.final_retention)
        self.output_partitions = {
            "late": log_.partitions("late"),
            "window_results": log_.partitions("window_results"),
        }
        group = f"{self.GROUP}-{self.shard}"
        self.consumers: dict[int, Consumer] = {}
        for partition in self.partitions:
            consumer = log_.consumer(group, "events")
            consumer.assign([partition])
            self.consumers[partition] = consumer
        self.producer = log_.producer()
        self.offsets: dict[int, int] = {}
        self.seq = 0
        self.engine = self._new_engine(now_ms())
        self.last_early_ms = 0
        self.last_checkpoint_ms = 0
        self.late_total = 0
        self.finals_total = 0
        self.errors = 0
        self.last_error = ""
        self._lock = threading.Lock()  # status() reads while run() works
        try:
            self._recover()
        except BaseException:  # e.g. FencedError: do not leak the consumers
            self.close()
            raise

    def _new_engine(self, now: int) -> WindowEngine:
        return WindowEngine(
            self.metrics,
            partitions=self.partitions,
            idle_timeout_ms=self.idle_timeout_ms,
            retention_ms=self.retention_ms,
            now_ms=now,
            shard=self.shard,
            max_groups=self.config.processor.max_groups,
        )

    # -- checkpoint and journal -----------------------------------------------------------
    def _recover(self) -> None:
        with self._lock:
            self._recover_locked()

    def _recover_locked(self) -> None:
        checkpoint_path, journal_path = self._latest_state()
        beginning = self.log.beginning_offsets("events")
        if checkpoint_path.exists():
            checkpoint = decode_snapshot(checkpoint_path.read_bytes())
            self.engine = self._new_engine(now_ms())
            self.engine.restore(checkpoint["engine"])
            self.seq = int(checkpoint["seq"])
            self.offsets = {int(p): int(o) for p, o in checkpoint["offsets"].items()}
            self.dedup.load({k: int(v) for k, v in checkpoint.get("dedup", {}).items()})
            log.info(
                "processor %s: restored checkpoint seq %d at offsets %s",
                self.shard,
                self.seq,
                self.offsets,
            )
        else:
            # A fresh start is checkpointed at once, so its clock (idle
            # partitions) is fixed before anything else happens.
            self.engine = self._new_engine(now_ms())
            self.seq = 0
            self.offsets = {}
            self.dedup.load({})
        for partition in self.partitions:
            offset = max(self.offsets.get(partition, 0), beginning.get(partition, 0))
            self.offsets[partition] = offset
            self.consumers[partition].seek(partition, offset)
        replayed = 0
        for entry in self._journal(journal_path):
            if entry["seq"] <= self.seq:
                continue
            ranges = {int(p): (int(a), int(b)) for p, (a, b) in entry["ranges"].items()}
            batches = self._read_exactly(ranges)
            step = self._apply(int(entry["now"]), batches)
            self._emit(step, int(entry["now"]))
            self.seq = int(entry["seq"])
            replayed += 1
        if replayed:
            log.info("processor %s: replayed %d journaled cycles", self.shard, replayed)
        self.engine.mark_all_dirty()
        self._early_firing(now_ms())
        self._checkpoint(now_ms())
        if self.fence is not None:
            self._remove_older_epochs()

    # -- fencing (fenced mode only) -------------------------------------------------------
    def _epoch_files(self, stem: str, ext: str) -> dict[int, Path]:
        """epoch -> file for ``<stem>-e<epoch><ext>``; the unfenced name is epoch 0."""
        found = {}
        for path in self.directory.glob(f"{stem}*{ext}"):
            tag = path.name[len(stem) : -len(ext)]
            if tag == "":
                found[0] = path
            elif tag.startswith("-e") and tag[2:].isdigit():
                found[int(tag[2:])] = path
        return found

    def _latest_state(self) -> tuple[Path, Path]:
        """The checkpoint to restore and the journal that belongs to it: this
        processor's own, or in fenced mode the highest epoch's."""
        if self.fence is None:
            return self.checkpoint_path, self.journal_path
        self.serving.check_fence(self.fence)
        checkpoints = self._epoch_files("checkpoint", ".msgpack")
        newest = max(checkpoints, default=0)
        if newest > self.fence.epoch:
            raise FencedError(self.fence, newest)
        if newest == 0 and 0 not in checkpoints:
            return self.checkpoint_path, self.journal_path
        suffix = "" if newest == 0 else f"-e{newest}"
        return checkpoints[newest], self.directory / f"journal{suffix}.jsonl"

    def _remove_older_epochs(self) -> None:
        """Once this epoch's checkpoint exists, older epochs' files are dead
        (a stale owner may still recreate one; the next owner removes it)."""
        assert self.fence is not None
        for stem, ext in (("checkpoint", ".msgpack"), ("journal", ".jsonl")):
            for epoch, path in self._epoch_files(stem, ext).items():
                if epoch < self.fence.epoch:
                    path.unlink(missing_ok=True)

    def _journal(self, path: Path | None = None) -> list[dict[str, Any]]:
        try:
            text = (path or self.journal_path).read_bytes()
        except FileNotFoundError:
            return []
        entries = []
        for line in text.split(b"\n"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # a torn last line: that cycle emitted nothing yet
        return entries

    def _append_journal(self, now: int, ranges: dict[int, tuple[int, int]]) -> None:
        self.seq += 1
        line = _json.encode(
            {"seq": self.seq, "now": now, "ranges": {str(p): r for p, r in ranges.items()}}
        )
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _checkpoint(self, now: int) -> None:
        if self.fence is not None:
            # The file name carries the epoch, so a stale owner cannot replace
            # the new owner's checkpoint; this check only stops it early.
            self.serving.check_fence(self.fence)
        self.dedup.expire(now)
        data = {
            "version": 1,
            "shard": self.shard,
            "owner_epoch": self.fence.epoch if self.fence is not None else None,
            "seq": self.seq,
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "engine": self.engine.snapshot(),
            "dedup": self.dedup.lengths(),
        }
        self.dedup.sync()
        atomic_write_bytes(self.checkpoint_path, encode_snapshot(data))
        # Entries up to seq are in the checkpoint now; a crash before this
        # truncation is harmless (replay skips them by seq).
        with open(self.journal_path, "wb"):
            pass
        self.last_checkpoint_ms = now
        for consumer in self.consumers.values():
            try:
                consumer.commit(dict(self.offsets))
            except Exception:  # lag reporting only; the checkpoint is the truth
                log.warning("processor %s: offset commit failed", self.shard, exc_info=True)
            break

    # -- reading --------------------------------------------------------------------------
    def _poll(self) -> dict[int, RecordBatch]:
        per_partition = max(1, self.max_batch_events // len(self.partitions))
        out: dict[int, RecordBatch] = {}
        for partition in self.partitions:
            consumer = self.consumers[partition]
            try:
                batches = consumer.poll_batches(per_partition, timeout_s=0.0)
            except OffsetOutOfRange:
                start = self.log.beginning_offsets("events")[partition]
                log.warning(
                    "processor %s: partition %d below retention; skipping to %d",
                    self.shard,
                    partition,
                    start,
                )
                consumer.seek(partition, start)
                self.offsets[partition] = start
                continue
            merge_batches(batches, out)
        return out

    def _read_exactly(self, ranges: dict[int, tuple[int, int]]) -> dict[int, RecordBatch]:
        out: dict[int, RecordBatch] = {}
        for partition, span in sorted(ranges.items()):
            out.update(self.consumers[partition].read_ranges({partition: span}, resume_at={}))
        return out

    # -- one cycle ------------------------------------------------------------------------
    def _apply(self, now: int, batches: dict[int, RecordBatch]) -> Step:
        step = Step()
        order = sorted(batches)
        if order:
            values: list[bytes] = []
            for partition in order:
                values.extend(batches[partition].values)
            table = self.decoder.decode(values)  # one JSON parse for the whole cycle
            runs = []
            position = 0
            for partition in order:
                batch = batches[partition]
                run = table.slice(position, len(batch.values))
                runs.append(
                    (partition, self._admit(partition, run, batch.first_offset), batch.first_offset)
                )
                position += len(batch.values)
                self.offsets[partition] = batch.last_offset + 1
            step.extend(self.engine.process_many(runs, now))
        step.extend(self.engine.advance(now))
        return step

    def _admit(self, partition: int, run: pa.Table, first_offset: int) -> pa.Table:
        """Drop client retries seen within the dedup horizon and records of
        deleted users; filtered runs carry their log offsets in ``_offset``.
        Deterministic given the checkpoint, so journal replays admit the same."""
        if run.num_rows == 0:
            return run
        offsets = np.arange(first_offset, first_offset + run.num_rows, dtype=np.int64)
        hashes = hash_ids(run.column("event_id").to_pylist())
        event = run.column("ts").to_numpy()
        keep = self.dedup.first_unseen(partition, hashes, event)
        received = run.column("received_at").to_numpy()
        self.dedup.add(partition, hashes[keep], event[keep], received[keep], sync=False)
        masked = self.deleted_users.keep_mask(run)
        if masked is not None:
            keep &= masked
        if keep.all():
            return run
        return run.filter(pa.array(keep)).append_column("_offset", pa.array(offsets[keep]))

    def run_once(self, wait_s: float = 0.1) -> int:
        """One cycle; returns the number of records consumed."""
        now = now_ms()
        with self._lock:
            batches = self._poll()
            consumed = sum(len(b.values) for b in batches.values())
            watermarks = [rt.watermark for rt in self.engine.metrics]
            step = self._apply(now, batches)
            moved = watermarks != [rt.watermark for rt in self.engine.metrics]
            if batches or step or moved:
                ranges = {p: (b.first_offset, b.last_offset) for p, b in batches.items()}
                self._append_journal(now, ranges)
            self._emit(step, now)
            if now - self.last_early_ms >= self.early_interval_ms:
                self._early_firing(now)
            if step.finals or now - self.last_checkpoint_ms >= self.checkpoint_interval_ms:
                self._early_firing(now)
                self._checkpoint(now)
            labels = {"shard": self.shard}
            REGISTRY.set("strata_processor_groups", self.engine.groups_held, labels)
            REGISTRY.set(
                "strata_processor_over_limit_events_total", self.engine.over_limit_events, labels
            )
        if not consumed and wait_s > 0:
            time.sleep(wait_s)
        return consumed

    def _emit(self, step: Step, now: int) -> None:
        if self.fence is not None and (step.late or step.finals):
            # Log appends cannot be fenced (no Kafka transactions); a stale
            # owner stops here, unless it stalls between this check and the
            # append (then its records carry the ids the loader drops).
            self.serving.check_fence(self.fence)
        if step.late:
            self.late_total += len(step.late)
            REGISTRY.inc("strata_late_events_total", len(step.late))
            for late in step.late:
                self.producer.produce(
                    "late",
                    late.partition % self.output_partitions["late"],
                    None,
                    self._late_record(late, now),
                )
        for final in step.finals:
            self.producer.produce(
                "window_results",
                zlib.crc32(final.metric.encode()) % self.output_partitions["window_results"],
                None,
                self._result_record(final, now),
            )
        if step.late or step.finals:
            self.producer.flush()
            self.finals_total += len(step.finals)
        if step.finals:
            self.serving.put_windows(step.finals, fence=self.fence)
        if step.evicted:
            self.serving.delete_windows(step.evicted, fence=self.fence)
        if step.revised:
            by_metric: dict[str, list[tuple[int, int]]] = {}
            for metric, start, end in step.revised:
                by_metric.setdefault(metric, []).append((start, end))
            for metric, ranges in by_metric.items():
                self.serving.add_revised(metric, sorted(set(ranges)), fence=self.fence)
            if self.on_revised is not None:
                for start, end in sorted({(a, b) for _, a, b in step.revised}):
                    try:
                        self.on_revised(start, end)
                    except Exception:  # a cache hook must not stop processing
                        log.warning("processor: on_revised hook failed", exc_info=True)
        # Windows left retention: forget revised ranges no reader can serve
        # live any more (another shard's lag defers it to a later eviction).
        evicted = {name for name, _, _, _ in step.evicted}
        for metric in sorted(evicted | {name for name, _, _ in step.pruned_revised}):
            self.serving.prune_revised(metric, self._held_from(metric))

    def _held_from(self, name: str) -> int:
        """Start of the oldest window of metric ``name`` that readers may still
        answer from the serving store (``strata.serving.api``): by the slowest
        shard's watermark, so no shard's revised range is forgotten early."""
        metric = self.metrics_by_name[name]
        marks = [
            w[name]
            for shard, w in self.serving.progress().items()
            if name in w and shard != self.shard
        ]
        watermark = min([self.engine.by_name[name].watermark, *marks])
        lateness = metric.allowed_lateness_ms
        return watermark - metric.window_ms - lateness - self.retention_ms + 1

    def _early_firing(self, now: int) -> None:
        dirty = self.engine.take_dirty()
        if dirty:
            self.serving.put_windows(dirty, fence=self.fence)
        watermarks = {
            rt.metric.name: rt.watermark
            for rt in self.engine.metrics
            if self.engine.watermark_ms(rt.metric.name) is not None
        }
        for rt in self.engine.metrics:
            capped = self.engine.capped_until(rt.metric.name)
            if capped is not None:
                watermarks[capped_key(rt.metric.name)] = capped
        self.serving.set_progress(self.shard, watermarks, fence=self.fence)
        self.last_early_ms = now

    def _late_record(self, late: LateEvent, now: int) -> bytes:
        return _json.encode(
            {
                "id": late.id,
                "metric": late.metric,
                "event_id": late.event_id,
                "event_type": late.event_type,
                "distinct_id": late.distinct_id,
                "ts": late.ts,
                "received_at": late.received_at,
                "window_start": late.window_start,
                "window_end": late.window_end,
                "watermark": late.watermark,
                "source_partition": late.partition,
                "source_offset": late.offset,
                "window_held": late.window_held,
                "emitted_at": now,
            }
        )

    def _result_record(self, state: WindowState, now: int) -> bytes:
        metric = self.metrics_by_name[state.metric]
        count, values = merge_values(metric, [state])
        return _json.encode(
            {
                "id": window_result_id(state.metric, state.shard, state.window_start, state.dims),
                "metric": state.metric,
                "shard": state.shard,
                "window_start": state.window_start,
                "window_end": state.window_end,
                "dims": _json.encode(
                    dict(zip(metric.dimensions, state.dims, strict=True))
                ).decode(),
                "aggregates": _json.encode(finalize(metric, count, values)).decode(),
                "event_count": state.count,
                "watermark": self.engine.watermark_ms(state.metric) or 0,
                "emitted_at": now,
            }
        )

    # -- running --------------------------------------------------------------------------
    def run(self, stop_event: threading.Event) -> None:
        """Process until ``stop_event`` is set; then checkpoint and return."""
        while not stop_event.is_set():
            try:
                self.run_once()
            except Exception as exc:  # keep running; surfaced in status()
                self.errors += 1
                self.last_error = str(exc)[:500]
                log.exception("processor %s: cycle failed; recovering from checkpoint", self.shard)
                stop_event.wait(1.0)
                try:
                    self._recover()
                except Exception:
                    log.exception("processor %s: recovery failed", self.shard)
        self.flush()

    def flush(self) -> None:
        """Write every changed window and a checkpoint (graceful stop)."""
        with self._lock:
            now = now_ms()
            self._early_firing(now)
            self._checkpoint(now)

    def lag(self) -> int:
        ends = self.log.end_offsets("events")
        return sum(max(0, ends.get(p, 0) - self.offsets.get(p, 0)) for p in self.partitions)

    def watermark_ms(self) -> int | None:
        return self.engine.watermark_ms()

    def revised_ranges(self, metric: str, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
        return self.serving.revised(metric, start_ms, end_ms)

    def status(self) -> dict[str, Any]:
        with self._lock:
            metrics = self.engine.status()
            offsets = dict(self.offsets)
            groups = self.engine.groups_held
            over_limit = self.engine.over_limit_events
        lag = self.lag()
        REGISTRY.set("strata_log_lag_events", lag, {"consumer": f"processor-{self.shard}"})
        return {
            "shard": self.shard,
            "partitions": self.partitions,
            "committed_offsets": {str(p): o for p, o in sorted(offsets.items())},
            "lag_events": lag,
            "late_events": self.late_total,
            "final_windows": self.finals_total,
            "groups": groups,
            "max_groups": self.engine.max_groups,
            "over_limit_events": over_limit,
            "metrics": metrics,
            "errors": self.errors,
            "last_error": self.last_error or None,
        }

    def close(self) -> None:
        for consumer in self.consumers.values():
            consumer.close()
        self.producer.close()
