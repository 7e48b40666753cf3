"""The windowing engine: event-time windows over Arrow micro-batches.

Pure computation, no I/O: the runner (``strata.processor.runner``) feeds it
batches read from the log and ships what it returns. Semantics
(docs/semantics.md, "Stream processor"):

* Every metric has tumbling (or hopping: size + slide) windows [start, end).
* Watermark. Per partition the engine keeps the maximum event time seen
  (over all events, filtered or not). The processor watermark of a metric is
  ``min over active partitions (max event time) - out_of_orderness``, never
  decreasing. A partition is *active* while it delivered a record within
  ``idle_timeout_ms`` of wall clock (``now_ms`` passed in by the caller); an
  assigned partition that has never delivered one holds the watermark back
  until that timeout has passed since the engine started. When every
  partition is idle, the watermark is ``max over partitions - ooo`` (all
  that was read has been processed).
* A window is *final* once ``watermark >= end + allowed_lateness``; it then
  fires once (``Step.finals``) and its groups are frozen.
* Late data. An event is late for a window when that window was already
  final *before the event arrived*. The engine evaluates this per event,
  with the watermark as it stood just before that event (a running maximum
  inside the batch), so results do not depend on how the stream was cut
  into batches: only on the order of arrival. A late event goes to
  ``Step.late``; if the window is still held (``retention_ms`` of event time
  past its final firing) the group is updated, its ``revision`` incremented
  and the range reported in ``Step.revised``.
* Early firings: every group changed since the last ``take_dirty`` call.

All work per batch is numpy / pyarrow.compute over whole columns; Python
loops run per group (window x dimension values), never per event.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from strata.config import ConfigError
from strata.metrics import Metric
from strata.processor.filters import Mask, compile_filter
from strata.serving.state import (
    UniqSketch,
    WindowState,
    hash_strings,
    hll_positions,
)

log = logging.getLogger("strata.processor")

NO_TIME = -(2**62)  # "no event yet"; far from int64 limits so subtraction is safe
FAR_FUTURE = 2**62
_DENSE_LIMIT = 1 << 22


class GroupState:
    """The aggregation state of one (window, dims) group."""

    __slots__ = ("count", "values", "final", "revision")

    def __init__(self, count: int, values: list[Any], final: bool, revision: int) -> None:
        self.count = count
        self.values = values
        self.final = final
        self.revision = revision


@dataclass
class _Slot:
    """One window of one metric and its groups by dimension values."""

    final: bool = False
    groups: dict[tuple[str, ...], GroupState] = field(default_factory=dict)


@dataclass
class LateEvent:
    """One event that arrived after its window was final (topic ``late``)."""

    id: str
    metric: str
    event_id: str
    event_type: str
    distinct_id: str
    ts: int
    received_at: int
    window_start: int
    window_end: int
    watermark: int
    partition: int
    offset: int
    window_held: bool


@dataclass
class Step:
    """What one call changed; the runner ships it."""

    finals: list[WindowState] = field(default_factory=list)
    late: list[LateEvent] = field(default_factory=list)
    revised: list[tuple[str, int, int]] = field(default_factory=list)
    evicted: list[tuple[str, str, int, tuple[str, ...]]] = field(default_factory=list)
    # Revised ranges whose windows were evicted: nothing live is left to mark.
    pruned_revised: list[tuple[str, int, int]] = field(default_factory=list)

    def extend(self, other: Step) -> None:
        self.finals.extend(other.finals)
        self.late.extend(other.late)
        self.revised.extend(other.revised)
        self.evicted.extend(other.evicted)
        self.pruned_revised.extend(other.pruned_revised)

    def __bool__(self) -> bool:
        return bool(self.finals or self.late or self.revised or self.evicted)


class _MetricRuntime:
    def __init__(self, metric: Metric) -> None:
        self.metric = metric
        try:
            self.mask: Mask | None = compile_filter(metric.filter)
        except ValueError as exc:
            raise ConfigError(f"metric {metric.name!r}: field 'filter': {exc}") from exc
        # Metrics with the same filter share its mask and the dictionary
        # codes of the rows it selects, within one batch.
        self.scope = metric.filter_sql if self.mask is not None else ""
        self.watermark = NO_TIME
        self.slots: dict[int, _Slot] = {}
        # Window starts that hit the group limit (bounded by held windows).
        self.capped: set[int] = set()
        # Revised window ranges still held (pruned when the window is evicted).
        self.revised: set[tuple[int, int]] = set()
        self.dirty: set[tuple[int, tuple[str, ...]]] = set()


def capped_key(metric: str) -> str:
    """The serving store's progress entry of a processor shard holding
    ``capped_until(metric)``, next to the metric's watermark."""
    return f"{metric}#capped_until"


def window_result_id(metric: str, shard: str, window_start: int, dims: Sequence[str]) -> str:
    """Deterministic id of a final window result (the loader drops replays)."""
    text = f"{metric}|{shard}|{window_start}|{json.dumps(list(dims))}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class WindowEngine:
    """Windows for a set of metrics over the partitions one processor owns.

    Contract: ``process`` and ``advance`` are deterministic functions of the
    engine state and their arguments (including ``now_ms``), so replaying the
    same calls after ``restore`` reproduces the same ``Step`` outputs. Not
    thread-safe; the runner serializes calls.
    """

    def __init__(
        self,
        metrics: Sequence[Metric],
        *,
        partitions: Sequence[int],
        idle_timeout_ms: int,
        retention_ms: int,
        now_ms: int,
        shard: str = "all",
        max_groups: int = 0,
    ) -> None:
        """``max_groups``: most (window, dimension values) groups held over
        all metrics (0: no limit); see ``_aggregate`` and docs/semantics.md,
        "State size"."""
        self.metrics = [_MetricRuntime(m) for m in metrics]
        self.max_groups = max_groups
        self.groups_held = 0
        # Events of groups not created because of max_groups (monotonic;
        # restored from the checkpoint, so the counter replays exactly).
        self.over_limit_events = 0
        self.by_name = {rt.metric.name: rt for rt in self.metrics}
        self.partitions = sorted(partitions)
        self.idle_timeout_ms = idle_timeout_ms
        self.retention_ms = retention_ms
        self.shard = shard
        self.max_ts: dict[int, int] = {p: NO_TIME for p in self.partitions}
        self.last_active: dict[int, int] = {p: now_ms for p in self.partitions}

    # -- watermarks ------------------------------------------------------------------------
    def _active(self, now_ms: int) -> list[int]:
        return [p for p in self.partitions if now_ms - self.last_active[p] < self.idle_timeout_ms]

    def _combined(self, now_ms: int) -> int:
        active = self._active(now_ms)
        if active:
            return min(self.max_ts[p] for p in active)
        return max(self.max_ts.values(), default=NO_TIME)

    def watermark_ms(self, metric: str | None = None) -> int | None:
        """The watermark of ``metric``, or the minimum over metrics."""
        runtimes = [self.by_name[metric]] if metric else self.metrics
        value = min((rt.watermark for rt in runtimes), default=NO_TIME)
        return None if value <= NO_TIME // 2 else value

    # -- input ----------------------------------------------------------------------------
    def process(self, partition: int, table: pa.Table, now_ms: int, first_offset: int = 0) -> Step:
        """Add one run of records of ``partition``, in arrival order (see
        ``process_many``)."""
        return self.process_many([(partition, table, first_offset)], now_ms)

    def process_many(self, runs: Sequence[tuple[int, pa.Table, int]], now_ms: int) -> Step:
        """Add runs of records ``(partition, table, first_offset)``, in
        arrival order: the records of ``runs[0]``, then ``runs[1]``, ...

        Tables have the event columns of ``strata.loader.sinks.EVENTS_SINK``.
        Every partition with records here counts as active at ``now_ms`` for
        the whole call. Each event is judged against the watermark as it
        stood just before it (running maxima per partition over the
        concatenated runs), so the outcome equals feeding the events one at
        a time. Returns final firings, late events, revisions and evictions,
        including those of the watermark advance at the end."""
        runs = [run for run in runs if run[1].num_rows]
        step = Step()
        if not runs:
            return step
        sizes = [r[1].num_rows for r in runs]
        partition_of = np.repeat(np.array([r[0] for r in runs], dtype=np.int64), sizes)
        # A run whose records were filtered (retries, deleted users) carries
        # its log offsets in an ``_offset`` column; else they are consecutive.
        offset_of = np.concatenate(
            [
                r[1].column("_offset").to_numpy().astype(np.int64)
                if "_offset" in r[1].column_names
                else np.arange(r[2], r[2] + r[1].num_rows, dtype=np.int64)
                for r in runs
            ]
        )
        tables = [
            r[1].drop_columns(["_offset"]) if "_offset" in r[1].column_names else r[1] for r in runs
        ]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        n = table.num_rows
        for partition, _, _ in runs:
            self.last_active[partition] = now_ms
        ts = table.column("ts").to_numpy()
        if ts.dtype != np.int64:
            ts = ts.astype(np.int64)
        present = {r[0] for r in runs}
        combined_before = np.full(
            n,
            min(
                (self.max_ts[p] for p in self._active(now_ms) if p not in present),
                default=FAR_FUTURE,
            ),
            dtype=np.int64,
        )
        # Max event time of each partition *before* each event: constant
        # outside the partition's runs, a running maximum inside them.
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for partition in sorted(present):
            current = self.max_ts[partition]
            done = 0
            for index, run in enumerate(runs):
                if run[0] != partition:
                    continue
                a, b = int(bounds[index]), int(bounds[index + 1])
                if a > done:
                    np.minimum(combined_before[done:a], current, out=combined_before[done:a])
                before = np.empty(b - a, dtype=np.int64)
                before[0] = current
                if b - a > 1:
                    np.maximum.accumulate(ts[a : b - 1], out=before[1:])
                    np.maximum(before[1:], current, out=before[1:])
                np.minimum(combined_before[a:b], before, out=combined_before[a:b])
                current = max(current, int(ts[a:b].max()))
                done = b
            if done < n:
                np.minimum(combined_before[done:], current, out=combined_before[done:])
            self.max_ts[partition] = current
        cache: dict[str, Any] = {}
        pending_late = []
        for rt in self.metrics:
            late = self._process_metric(rt, table, ts, combined_before, cache)
            if late is not None:
                pending_late.append((rt, late))
        # Same order as one event at a time: on-time events are in, windows
        # fire, then late events revise the (frozen) final windows.
        self._update_watermarks(now_ms)
        for rt in self.metrics:
            self._fire(rt, step)
        for rt, (rows, starts, watermarks) in pending_late:
            metric = rt.metric
            done = metric.window_ms + metric.allowed_lateness_ms
            held = starts + done + self.retention_ms > watermarks
            self._late(rt, table, partition_of, offset_of, rows, starts, watermarks, held, step)
            if held.any():
                self._aggregate(rt, table, rows[held], starts[held], cache, late=True)
                for start in np.unique(starts[held]).tolist():
                    step.revised.append((metric.name, start, start + metric.window_ms))
                    rt.revised.add((start, start + metric.window_ms))
        for rt in self.metrics:
            self._evict(rt, step)
        return step

    def _process_metric(
        self,
        rt: _MetricRuntime,
        table: pa.Table,
        ts: np.ndarray,
        combined_before: np.ndarray,
        cache: dict[str, Any],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Aggregate the on-time events; return the late (rows, window
        starts, watermark at arrival), or None."""
        metric = rt.metric
        if rt.mask is None:
            rows = np.arange(table.num_rows)
        else:
            key = f"mask:{rt.scope}"
            if key not in cache:
                selected = rt.mask(table)
                cache[key] = (selected, np.flatnonzero(selected))
            rows = cache[key][1]
            if rows.size == 0:
                return None
        size, slide = metric.window_ms, metric.slide_ms
        lateness = metric.allowed_lateness_ms
        watermark_before = np.maximum(
            combined_before[rows] - metric.out_of_orderness_ms, rt.watermark
        )
        last_start = ts[rows] // slide * slide
        per_event = size // slide
        if per_event > 1:
            starts = np.repeat(last_start, per_event) - np.tile(
                np.arange(per_event) * slide, len(rows)
            )
            rows = np.repeat(rows, per_event)
            watermark_before = np.repeat(watermark_before, per_event)
        else:
            starts = last_start
        late = starts + size + lateness <= watermark_before
        result = None
        if late.any():
            result = (rows[late], starts[late], watermark_before[late])
            on_time = ~late
            rows, starts = rows[on_time], starts[on_time]
        if rows.size:
            self._aggregate(rt, table, rows, starts, cache, late=False)
        return result

    def _late(
        self,
        rt: _MetricRuntime,
        table: pa.Table,
        partition_of: np.ndarray,
        offset_of: np.ndarray,
        rows: np.ndarray,
        starts: np.ndarray,
        watermarks: np.ndarray,
        held: np.ndarray,
        step: Step,
    ) -> None:
        """Side-output records; a Python loop over late events only (rare)."""
        metric = rt.metric
        columns = {
            name: _take_pylist(table.column(name), rows)
            for name in ("event_id", "event_type", "distinct_id", "ts", "received_at")
        }
        for i in range(len(rows)):
            start = int(starts[i])
            event_id = columns["event_id"][i] or ""
            suffix = "" if metric.slide_ms == metric.window_ms else f"|{start}"
            step.late.append(
                LateEvent(
                    id=f"{event_id}|{metric.name}{suffix}",
                    metric=metric.name,
                    event_id=event_id,
                    event_type=columns["event_type"][i] or "",
                    distinct_id=columns["distinct_id"][i] or "",
                    ts=int(columns["ts"][i]),
                    received_at=int(columns["received_at"][i] or 0),
                    window_start=start,
                    window_end=start + metric.window_ms,
                    watermark=int(watermarks[i]),
                    partition=int(partition_of[rows[i]]),
                    offset=int(offset_of[rows[i]]),
                    window_held=bool(held[i]),
                )
            )

    def _ranked(
        self, rt: _MetricRuntime, table: pa.Table, column: str, cache: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the rank of its value's hash among the distinct values of
        the rows ``rt``'s filter selects; and those hashes in ascending
        order. Each distinct value is hashed once (dictionary-encode, hash
        the dictionary)."""
        key = f"rank:{rt.scope}:{column}"
        if key not in cache:
            codes, dictionary = self._codes(rt, table, column, cache)
            hashes = hash_strings(dictionary)
            order = np.argsort(hashes)
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order), dtype=np.int64)
            cache[key] = (rank[codes], hashes[order])
        ranked: tuple[np.ndarray, np.ndarray] = cache[key]
        return ranked

    def _codes(
        self, rt: _MetricRuntime, table: pa.Table, column: str, cache: dict[str, Any]
    ) -> tuple[np.ndarray, pa.Array]:
        """Dictionary codes of ``column`` per row of ``table`` (meaningful
        only for the rows ``rt``'s filter selects: a filtered metric encodes
        just those) and the dictionary."""
        key = f"dict:{rt.scope}:{column}"
        if key not in cache:
            values = table.column(column)
            selected = cache.get(f"mask:{rt.scope}")
            if selected is not None:
                values = values.filter(pa.array(selected[0]))
            values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
            if values.null_count:
                values = pc.fill_null(values, "")
            encoded = pc.dictionary_encode(values)
            codes = encoded.indices.to_numpy().astype(np.int64)
            if selected is not None:
                scattered = np.zeros(table.num_rows, dtype=np.int64)
                scattered[selected[1]] = codes
                codes = scattered
            cache[key] = (codes, encoded.dictionary)
        codes, dictionary = cache[key]
        return codes, dictionary

    def _aggregate(
        self,
        rt: _MetricRuntime,
        table: pa.Table,
        rows: np.ndarray,
        starts: np.ndarray,
        cache: dict[str, Any],
        *,
        late: bool,
    ) -> None:
        metric = rt.metric
        n = len(rows)
        base = int(starts.min())
        code = (starts - base) // metric.slide_ms
        space = int(code.max()) + 1
        dim_codes: list[tuple[np.ndarray, pa.Array]] = []
        for dimension in metric.dimensions:
            codes, dictionary = self._codes(rt, table, dimension, cache)
            picked = codes[rows]
            dim_codes.append((picked, dictionary))
            width = max(len(dictionary), 1)
            if space * width > _DENSE_LIMIT:
                _, code = np.unique(code, return_inverse=True)
                space = int(code.max()) + 1
            code = code * width + picked
            space *= width
        if space <= _DENSE_LIMIT:
            counts_all = np.bincount(code, minlength=space)
            present = np.flatnonzero(counts_all)
            lookup = np.empty(space, dtype=np.int64)
            lookup[present] = np.arange(len(present))
            group_ids = lookup[code]
            counts = counts_all[present]
        else:
            _, group_ids, counts = np.unique(code, return_inverse=True, return_counts=True)
        groups = len(counts)
        first = np.full(groups, n, dtype=np.int64)
        np.minimum.at(first, group_ids, np.arange(n))
        group_starts = starts[first].tolist()
        group_dims = [
            dictionary.take(pa.array(picked[first])).to_pylist() for picked, dictionary in dim_codes
        ]
        keys = [(group_starts[g], tuple(str(d[g]) for d in group_dims)) for g in range(groups)]
        partials: list[Any] = []
        for aggregation in metric.aggregations:
            function = aggregation.function
            if function == "count":
                partials.append(None)
                continue
            if function == "uniq":
                assert aggregation.column is not None
                ranks, sorted_hashes = self._ranked(rt, table, aggregation.column, cache)
                partials.append((ranks[rows], sorted_hashes))
                continue
            assert aggregation.column is not None
            values = table.column(aggregation.column).to_numpy().astype(np.float64)[rows]
            if function in ("sum", "avg"):
                partials.append(np.bincount(group_ids, weights=values, minlength=groups))
            elif function == "min":
                out = np.full(groups, np.inf)
                np.minimum.at(out, group_ids, values)
                partials.append(out)
            else:
                out = np.full(groups, -np.inf)
                np.maximum.at(out, group_ids, values)
                partials.append(out)
        # Merge the partial aggregates into the held groups.
        # At the state limit a new group is not created: its window is
        # marked capped, and no new group of a capped window is created
        # until it is evicted, so every held group has all its events.
        states: list[GroupState | None] = []
        for g, (start, dims) in enumerate(keys):
            slot = rt.slots.get(start)
            if slot is None:
                slot = rt.slots[start] = _Slot(final=late)
            state = slot.groups.get(dims)
            if state is None and (start in rt.capped or 0 < self.max_groups <= self.groups_held):
                if start not in rt.capped:
                    rt.capped.add(start)
                    log.warning(
                        "processor: metric %s window %d reached processor.max_groups (%d); "
                        "its new groups are not kept live",
                        metric.name,
                        start,
                        self.max_groups,
                    )
                self.over_limit_events += int(counts[g])
                states.append(None)
                continue
            if state is None:
                self.groups_held += 1
                values_init: list[Any] = []
                for aggregation in metric.aggregations:
                    function = aggregation.function
                    values_init.append(
                        UniqSketch()
                        if function == "uniq"
                        else None
                        if function == "count"
                        else (0.0 if function in ("sum", "avg") else None)
                    )
                state = slot.groups[dims] = GroupState(0, values_init, final=late, revision=0)
            state.count += int(counts[g])
            if late:
                state.revision += int(counts[g])
            rt.dirty.add((start, dims))
            states.append(state)
        for i, aggregation in enumerate(metric.aggregations):
            function = aggregation.function
            partial = partials[i]
            if function == "count":
                continue
            if function == "uniq":
                self._merge_uniq(states, i, group_ids, *partial)
                continue
            for g, state in enumerate(states):
                if state is None:
                    continue
                value = float(partial[g])
                have = state.values[i]
                if function in ("sum", "avg"):
                    state.values[i] = have + value
                elif have is None:
                    state.values[i] = value
                elif function == "min":
                    state.values[i] = min(have, value)
                else:
                    state.values[i] = max(have, value)

    @staticmethod
    def _merge_uniq(
        states: list[GroupState | None],
        index: int,
        group_ids: np.ndarray,
        ranks: np.ndarray,
        sorted_hashes: np.ndarray,
    ) -> None:
        """Exact groups get their batch's distinct hashes (so a sketch is a
        function of its set of values, whatever the batching); groups already
        in HLL mode get register maxima.

        One sort of small integers: ``group * distinct + rank`` orders the
        distinct (group, value) pairs by group, then by hash."""
        width = max(len(sorted_hashes), 1)
        keys = np.sort(group_ids * width + ranks)
        fresh = np.ones(len(keys), dtype=bool)
        fresh[1:] = keys[1:] != keys[:-1]
        keys = keys[fresh]
        g_sorted = keys // width
        h_sorted = sorted_hashes[keys - g_sorted * width]
        # Distinct values whose 64-bit hashes collide count once, as a set
        # of hashes would.
        keep = np.ones(len(keys), dtype=bool)
        keep[1:] = (g_sorted[1:] != g_sorted[:-1]) | (h_sorted[1:] != h_sorted[:-1])
        if not keep.all():
            g_sorted, h_sorted = g_sorted[keep], h_sorted[keep]
        bounds = np.flatnonzero(g_sorted[1:] != g_sorted[:-1]) + 1
        starts = np.concatenate([[0], bounds]).tolist()
        ends = np.concatenate([bounds, [len(g_sorted)]]).tolist()
        for a, b in zip(starts, ends, strict=True):
            state = states[int(g_sorted[a])]
            if state is None:
                continue
            sketch = state.values[index]
            if sketch.registers is None:
                sketch.add_hashes(h_sorted[a:b])
            else:
                register, rank = hll_positions(h_sorted[a:b])
                np.maximum.at(sketch.registers, register, rank)

    # -- time -----------------------------------------------------------------------------
    def advance(self, now_ms: int) -> Step:
        """Recompute watermarks at wall-clock ``now_ms`` (idle partitions),
        fire windows that became final, evict windows past retention."""
        step = Step()
        self._update_watermarks(now_ms)
        for rt in self.metrics:
            self._fire(rt, step)
            self._evict(rt, step)
        return step

    def _update_watermarks(self, now_ms: int) -> None:
        combined = self._combined(now_ms)
        if combined <= NO_TIME:
            return
        for rt in self.metrics:
            rt.watermark = max(rt.watermark, combined - rt.metric.out_of_orderness_ms)

    def _fire(self, rt: _MetricRuntime, step: Step) -> None:
        done = rt.metric.window_ms + rt.metric.allowed_lateness_ms
        for start in sorted(rt.slots):
            if start + done > rt.watermark:
                break
            slot = rt.slots[start]
            if not slot.final:
                slot.final = True
                for dims, state in sorted(slot.groups.items()):
                    state.final = True
                    step.finals.append(self._window_state(rt, start, dims, state))

    def _evict(self, rt: _MetricRuntime, step: Step) -> None:
        done = rt.metric.window_ms + rt.metric.allowed_lateness_ms + self.retention_ms
        for start in sorted(rt.slots):
            if start + done > rt.watermark:
                break
            for dims in sorted(rt.slots[start].groups):
                step.evicted.append((rt.metric.name, self.shard, start, dims))
                rt.dirty.discard((start, dims))
            self.groups_held -= len(rt.slots[start].groups)
            rt.capped.discard(start)
            del rt.slots[start]
        for start, end in sorted(rt.revised):
            if end + rt.metric.allowed_lateness_ms + self.retention_ms <= rt.watermark:
                rt.revised.discard((start, end))
                step.pruned_revised.append((rt.metric.name, start, end))

    # -- outputs --------------------------------------------------------------------------
    def _window_state(
        self, rt: _MetricRuntime, start: int, dims: tuple[str, ...], state: GroupState
    ) -> WindowState:
        values = [v.to_bytes() if isinstance(v, UniqSketch) else v for v in state.values]
        return WindowState(
            metric=rt.metric.name,
            shard=self.shard,
            window_start=start,
            window_end=start + rt.metric.window_ms,
            dims=list(dims),
            count=state.count,
            values=values,
            final=state.final,
            revision=state.revision,
        )

    def take_dirty(self) -> list[WindowState]:
        """Full states of every group changed since the last call (early
        firings and late revisions), in a deterministic order."""
        out: list[WindowState] = []
        for rt in self.metrics:
            for start, dims in sorted(rt.dirty):
                slot = rt.slots.get(start)
                state = slot.groups.get(dims) if slot else None
                if state is not None:
                    out.append(self._window_state(rt, start, dims, state))
            rt.dirty.clear()
        return out

    def all_states(self) -> list[WindowState]:
        out: list[WindowState] = []
        for rt in self.metrics:
            for start in sorted(rt.slots):
                for dims, state in sorted(rt.slots[start].groups.items()):
                    out.append(self._window_state(rt, start, dims, state))
        return out

    def mark_all_dirty(self) -> None:
        for rt in self.metrics:
            rt.dirty = {(s, d) for s, slot in rt.slots.items() for d in slot.groups}

    def capped_until(self, metric: str) -> int | None:
        """End of the latest held window of ``metric`` that reached
        ``max_groups`` (None if none): readers answer buckets up to it from
        the rollups, which count every event (docs/semantics.md, "State size")."""
        rt = self.by_name[metric]
        return max(rt.capped) + rt.metric.window_ms if rt.capped else None

    def status(self) -> dict[str, Any]:
        return {
            rt.metric.name: {
                "watermark_ms": self.watermark_ms(rt.metric.name),
                "open_windows": sum(1 for slot in rt.slots.values() if not slot.final),
                "held_windows": len(rt.slots),
                "groups": sum(len(slot.groups) for slot in rt.slots.values()),
                "capped_windows": len(rt.capped),
                "revised_ranges": len(rt.revised),
            }
            for rt in self.metrics
        }

    # -- checkpoint -----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The full state as plain msgpack-able data (bytes for sketches)."""
        metrics: dict[str, Any] = {}
        for rt in self.metrics:
            windows = []
            for start, slot in sorted(rt.slots.items()):
                groups = [
                    [
                        list(dims),
                        state.count,
                        [v.to_bytes() if isinstance(v, UniqSketch) else v for v in state.values],
                        state.final,
                        state.revision,
                    ]
                    for dims, state in sorted(slot.groups.items())
                ]
                windows.append([start, slot.final, groups])
            metrics[rt.metric.name] = {
                "definition": _definition(rt.metric),
                "watermark": rt.watermark,
                "windows": windows,
                "capped": sorted(rt.capped),
                "revised": [list(r) for r in sorted(rt.revised)],
            }
        return {
            "partitions": {str(p): [self.max_ts[p], self.last_active[p]] for p in self.partitions},
            "metrics": metrics,
            "over_limit_events": self.over_limit_events,
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Load a ``snapshot``. Metrics absent from it start empty; metrics no
        longer configured are dropped."""
        for key, (max_ts, last_active) in snapshot.get("partitions", {}).items():
            partition = int(key)
            if partition in self.max_ts:
                self.max_ts[partition] = int(max_ts)
                self.last_active[partition] = int(last_active)
        for name, data in snapshot.get("metrics", {}).items():
            rt = self.by_name.get(name)
            if rt is None:
                continue
            if data.get("definition") != _definition(rt.metric):
                # The metric was redefined: its old windows mean something
                # else. It starts empty; the rollups still cover history.
                log.warning("metric %s changed since the checkpoint; its live state restarts", name)
                continue
            rt.watermark = int(data["watermark"])
            rt.capped = {int(start) for start in data.get("capped", [])}
            rt.revised = {(int(a), int(b)) for a, b in data.get("revised", [])}
            rt.slots = {}
            for start, final, groups in data["windows"]:
                slot = rt.slots[int(start)] = _Slot(final=bool(final))
                for dims, count, values, group_final, revision in groups:
                    restored = [
                        UniqSketch.from_bytes(v) if a.function == "uniq" else v
                        for a, v in zip(rt.metric.aggregations, values, strict=True)
                    ]
                    slot.groups[tuple(dims)] = GroupState(
                        int(count), restored, bool(group_final), int(revision)
                    )
        self.over_limit_events = int(snapshot.get("over_limit_events", 0))
        self.groups_held = sum(
            len(slot.groups) for rt in self.metrics for slot in rt.slots.values()
        )
        self.mark_all_dirty()


def _take_pylist(column: pa.ChunkedArray, rows: np.ndarray) -> list[Any]:
    """``column.take(rows).to_pylist()`` chunk by chunk: a take across
    chunks would first concatenate the whole column."""
    if column.num_chunks == 1:
        return column.chunk(0).take(pa.array(rows)).to_pylist()
    ends = np.cumsum([len(chunk) for chunk in column.chunks])
    chunk_of = np.searchsorted(ends, rows, side="right")
    out: list[Any] = [None] * len(rows)
    for index in np.unique(chunk_of).tolist():
        where = np.flatnonzero(chunk_of == index)
        local = rows[where] - (ends[index - 1] if index else 0)
        values = column.chunk(index).take(pa.array(local)).to_pylist()
        for position, value in zip(where.tolist(), values, strict=True):
            out[position] = value
    return out


def _definition(metric: Metric) -> str:
    """What a metric's state depends on; a change invalidates the state."""
    return json.dumps(
        [
            metric.filter_sql,
            list(metric.dimensions),
            [[a.alias, a.function, a.column] for a in metric.aggregations],
            metric.window_ms,
            metric.slide_ms,
        ]
    )


def encode_snapshot(data: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(data)


def decode_snapshot(data: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.msgpack.decode(data)
    return decoded
