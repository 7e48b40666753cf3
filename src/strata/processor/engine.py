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
    fixed_width_values,
    hash_strings_at,
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
        # A run whose records were filtered (retries, deleted users) carries
        # its log offsets in an ``_offset`` column; else they are consecutive.
        tables = [
            r[1].drop_columns(["_offset"]) if "_offset" in r[1].column_names else r[1] for r in runs
        ]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        for partition, _, _ in runs:
            self.last_active[partition] = now_ms
        # One copy of the per-run buffers (Arrow's chunked conversion copies
        # value by value).
        ts = np.concatenate(
            [chunk.to_numpy(zero_copy_only=False) for chunk in table.column("ts").chunks]
        )
        if ts.dtype != np.int64:
            ts = ts.astype(np.int64)
        batch = _Batch(runs, table, ts)
        combined_before = self._combined_before(runs, batch.bounds, ts, now_ms)
        selections: dict[str, _Selection] = {}
        pending_late = []
        for rt in self.metrics:
            late = self._process_metric(rt, batch, combined_before, selections)
            if late is not None:
                pending_late.append((rt, late))
        # Same order as one event at a time: on-time events are in, windows
        # fire, then late events revise the (frozen) final windows.
        self._update_watermarks(now_ms)
        for rt in self.metrics:
            self._fire(rt, step)
        for rt, (selection, positions, starts, watermarks) in pending_late:
            metric = rt.metric
            done = metric.window_ms + metric.allowed_lateness_ms
            held = starts + done + self.retention_ms > watermarks
            self._late(rt, batch, selection.table_rows(positions), starts, watermarks, held, step)
            if held.any():
                windows = starts[held] // metric.slide_ms
                self._aggregate(rt, selection, positions[held], windows, late=True)
                for start in np.unique(starts[held]).tolist():
                    step.revised.append((metric.name, start, start + metric.window_ms))
                    rt.revised.add((start, start + metric.window_ms))
        for rt in self.metrics:
            self._evict(rt, step)
        return step

    def _combined_before(
        self,
        runs: Sequence[tuple[int, pa.Table, int]],
        bounds: np.ndarray,
        ts: np.ndarray,
        now_ms: int,
    ) -> np.ndarray:
        """Per event: the minimum over active partitions of their maximum
        event time just *before* that event; updates ``max_ts``.

        Inside a run only its own partition's maximum moves (a running
        maximum), so every other partition contributes one constant per
        run."""
        present = {r[0] for r in runs}
        absent = min(
            (self.max_ts[p] for p in self._active(now_ms) if p not in present),
            default=FAR_FUTURE,
        )
        current = {p: self.max_ts[p] for p in present}
        out = np.empty(len(ts), dtype=np.int64)
        for index, (partition, _, _) in enumerate(runs):
            a, b = int(bounds[index]), int(bounds[index + 1])
            others = min((v for p, v in current.items() if p != partition), default=FAR_FUTURE)
            others = min(others, absent)
            before = current[partition]
            out[a] = min(before, others)
            if b - a > 1:
                inside = out[a + 1 : b]
                np.maximum.accumulate(ts[a : b - 1], out=inside)
                np.maximum(inside, before, out=inside)
                np.minimum(inside, others, out=inside)
            current[partition] = max(before, int(ts[a:b].max()))
        self.max_ts.update(current)
        return out

    def _process_metric(
        self,
        rt: _MetricRuntime,
        batch: _Batch,
        combined_before: np.ndarray,
        selections: dict[str, _Selection],
    ) -> tuple[_Selection, np.ndarray, np.ndarray, np.ndarray] | None:
        """Aggregate the on-time events; return the late (selection,
        positions in it, window starts, watermark at arrival), or None."""
        metric = rt.metric
        selection = selections.get(rt.scope)
        if selection is None:
            rows = None if rt.mask is None else np.flatnonzero(rt.mask(batch.table))
            selection = selections[rt.scope] = _Selection(batch.table, rows)
        if selection.size == 0:
            return None
        rows = selection.rows
        size, slide = metric.window_ms, metric.slide_ms
        done = size + metric.allowed_lateness_ms
        ts = batch.ts if rows is None else batch.ts[rows]
        last_window = ts // slide
        # Late for a window: start + done <= the watermark just before the
        # event; i.e. start <= threshold, one number per event.
        threshold = (combined_before if rows is None else combined_before[rows]) - (
            metric.out_of_orderness_ms + done
        )
        np.maximum(threshold, rt.watermark - done, out=threshold)
        per_event = size // slide
        positions: np.ndarray | None = None
        if per_event > 1:
            windows = (last_window[:, None] - np.arange(per_event)).ravel()
            positions = np.repeat(np.arange(selection.size), per_event)
            threshold = np.repeat(threshold, per_event)
        else:
            windows = last_window
        starts = windows * slide
        late_at = np.flatnonzero(starts <= threshold)
        result = None
        if len(late_at):
            on_time = np.flatnonzero(starts > threshold)
            late_positions = late_at if positions is None else positions[late_at]
            result = (selection, late_positions, starts[late_at], threshold[late_at] + done)
            positions = on_time if positions is None else positions[on_time]
            windows = windows[on_time]
        if len(windows):
            self._aggregate(rt, selection, positions, windows, late=False)
        return result

    def _late(
        self,
        rt: _MetricRuntime,
        batch: _Batch,
        rows: np.ndarray,
        starts: np.ndarray,
        watermarks: np.ndarray,
        held: np.ndarray,
        step: Step,
    ) -> None:
        """Side-output records; a Python loop over late events only (rare)."""
        metric = rt.metric
        columns = batch.take_pylist(rows, ("event_id", "event_type", "distinct_id", "received_at"))
        partitions, offsets = batch.locate(rows)
        name, size = metric.name, metric.window_ms
        suffix_needed = metric.slide_ms != metric.window_ms
        for (
            start,
            event_id,
            event_type,
            distinct_id,
            ts,
            received_at,
            watermark,
            is_held,
            p,
            o,
        ) in zip(
            starts.tolist(),
            columns["event_id"],
            columns["event_type"],
            columns["distinct_id"],
            batch.ts[rows].tolist(),
            columns["received_at"],
            watermarks.tolist(),
            held.tolist(),
            partitions,
            offsets,
            strict=True,
        ):
            event_id = event_id or ""
            suffix = f"|{start}" if suffix_needed else ""
            step.late.append(
                LateEvent(
                    id=f"{event_id}|{name}{suffix}",
                    metric=name,
                    event_id=event_id,
                    event_type=event_type or "",
                    distinct_id=distinct_id or "",
                    ts=ts,
                    received_at=int(received_at or 0),
                    window_start=start,
                    window_end=start + size,
                    watermark=watermark,
                    partition=p,
                    offset=o,
                    window_held=is_held,
                )
            )

    def _aggregate(
        self,
        rt: _MetricRuntime,
        selection: _Selection,
        positions: np.ndarray | None,
        windows: np.ndarray,
        *,
        late: bool,
    ) -> None:
        """Fold the events at ``positions`` of ``selection`` (None: all of
        them, in order), each into the window starting at ``windows[i]``
        times the slide, into the held groups."""
        metric = rt.metric
        n = len(windows)
        base = int(windows.min())
        code = windows - base if base else windows
        space = int(code.max()) + 1
        # The group key is a mixed-radix number (window, dim 1, dim 2, ...):
        # decodable, so a group's window and values need no lookup of a
        # member row, unless the key space had to be compacted.
        decodable = True
        dim_codes: list[tuple[np.ndarray, pa.Array, int]] = []
        for dimension in metric.dimensions:
            codes, dictionary = selection.codes(dimension)
            picked = codes if positions is None else codes[positions]
            width = max(len(dictionary), 1)
            dim_codes.append((picked, dictionary, width))
            if space * width > _DENSE_LIMIT:
                _, code = np.unique(code, return_inverse=True)
                space = int(code.max()) + 1
                decodable = False
            code = code * width + picked
            space *= width
        first: np.ndarray | None = None
        if space <= _DENSE_LIMIT:
            counts_all = np.bincount(code, minlength=space)
            present = np.flatnonzero(counts_all)
            lookup = np.empty(space, dtype=np.int64)
            lookup[present] = np.arange(len(present))
            group_ids = lookup[code]
            counts = counts_all[present]
        else:
            present, first, group_ids, counts = np.unique(
                code, return_index=True, return_inverse=True, return_counts=True
            )
            decodable = False
        groups = len(counts)
        group_dims: list[list[Any]] = []
        if decodable:
            rest = present
            for _, dictionary, width in reversed(dim_codes):
                rest, value_code = np.divmod(rest, width)
                group_dims.insert(0, dictionary.take(pa.array(value_code)).to_pylist())
            group_starts = ((rest + base) * metric.slide_ms).tolist()
        else:
            if first is None:
                first = np.full(groups, n, dtype=np.int64)
                np.minimum.at(first, group_ids, np.arange(n))
            group_starts = (windows[first] * metric.slide_ms).tolist()
            group_dims = [
                dictionary.take(pa.array(picked[first])).to_pylist()
                for picked, dictionary, _ in dim_codes
            ]
        keys = [(group_starts[g], tuple(str(d[g]) for d in group_dims)) for g in range(groups)]
        partials: list[Any] = []
        for aggregation in metric.aggregations:
            function = aggregation.function
            if function == "count":
                partials.append(None)
                continue
            assert aggregation.column is not None
            if function == "uniq":
                hashes = selection.hashes(aggregation.column)
                partials.append(hashes if positions is None else hashes[positions])
                continue
            values = selection.numbers(aggregation.column)
            if positions is not None:
                values = values[positions]
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
        group_counts = counts.tolist()
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
                self.over_limit_events += group_counts[g]
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
            state.count += group_counts[g]
            if late:
                state.revision += group_counts[g]
            rt.dirty.add((start, dims))
            states.append(state)
        for i, aggregation in enumerate(metric.aggregations):
            function = aggregation.function
            partial = partials[i]
            if function == "count":
                continue
            if function == "uniq":
                self._merge_uniq(states, i, group_ids, counts, partial)
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
        counts: np.ndarray,
        hashes: np.ndarray,
    ) -> None:
        """Exact groups get their batch's hashes (deduplicated in the sketch,
        so a sketch is a function of its set of values, whatever the
        batching); groups already in HLL mode get register maxima.

        Group ids are dense and small: a stable radix sort of them (8- or
        16-bit keys) lays each group's hashes out contiguously."""
        narrow = np.int8 if len(states) <= 2**7 else np.int16 if len(states) <= 2**15 else None
        keys = group_ids if narrow is None else group_ids.astype(narrow)
        grouped = hashes[np.argsort(keys, kind="stable")]
        ends = np.cumsum(counts).tolist()
        start = 0
        for state, end in zip(states, ends, strict=True):
            if state is not None:
                sketch = state.values[index]
                if sketch.registers is None:
                    sketch.add_hashes(grouped[start:end])
                else:
                    register, rank = hll_positions(grouped[start:end])
                    np.maximum.at(sketch.registers, register, rank)
            start = end

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


class _Batch:
    """The concatenated runs of one ``process_many`` call."""

    __slots__ = ("runs", "table", "ts", "bounds")

    def __init__(
        self, runs: Sequence[tuple[int, pa.Table, int]], table: pa.Table, ts: np.ndarray
    ) -> None:
        self.runs = runs
        self.table = table
        self.ts = ts
        # Row where each run starts, and the end.
        self.bounds = np.concatenate([[0], np.cumsum([r[1].num_rows for r in runs])])

    def _run_of(self, rows: np.ndarray) -> np.ndarray:
        run_of: np.ndarray = np.searchsorted(self.bounds, rows, side="right") - 1
        return run_of

    def locate(self, rows: np.ndarray) -> tuple[list[int], list[int]]:
        """Partition and log offset of each row. A run whose records were
        filtered carries their offsets in an ``_offset`` column; else they
        are consecutive from its first offset."""
        run_of = self._run_of(rows)
        local = rows - self.bounds[run_of]
        partitions = np.array([r[0] for r in self.runs], dtype=np.int64)[run_of]
        offsets = np.array([r[2] for r in self.runs], dtype=np.int64)[run_of] + local
        for run, (_, table, _) in enumerate(self.runs):
            if "_offset" in table.column_names:
                where = np.flatnonzero(run_of == run)
                if len(where):
                    column = table.column("_offset").take(pa.array(local[where]))
                    offsets[where] = column.to_numpy().astype(np.int64)
        return partitions.tolist(), offsets.tolist()

    def take_pylist(self, rows: np.ndarray, columns: Sequence[str]) -> dict[str, list[Any]]:
        """``columns`` at ``rows`` as Python lists, one take per run: a take
        across chunks would first concatenate the whole columns."""
        if not len(rows):
            return {name: [] for name in columns}
        run_of = self._run_of(rows)
        order = np.argsort(run_of, kind="stable")
        sorted_runs = run_of[order]
        edges = (np.flatnonzero(sorted_runs[1:] != sorted_runs[:-1]) + 1).tolist()
        selected = self.table.select(list(columns))
        pieces = []
        for a, b in zip([0, *edges], [*edges, len(rows)], strict=True):
            run = int(sorted_runs[a])
            low, high = int(self.bounds[run]), int(self.bounds[run + 1])
            part = order[a:b]
            pieces.append(selected.slice(low, high - low).take(pa.array(rows[part] - low)))
        values = pa.concat_tables(pieces).to_pydict()
        if np.all(order[1:] > order[:-1]):
            return values
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[order] = np.arange(len(order))
        places = inverse.tolist()
        return {name: [column[i] for i in places] for name, column in values.items()}


class _Selection:
    """The rows of one batch that a metric's filter selects, and encodings
    of their columns, computed on first use and shared by the metrics with
    the same filter. Everything is indexed by *position* in the selection,
    so unselected rows are never touched again."""

    __slots__ = ("table", "rows", "size", "_codes", "_hashes", "_numbers")

    def __init__(self, table: pa.Table, rows: np.ndarray | None) -> None:
        self.table = table
        self.rows = rows  # the table row of each position; None: all rows
        self.size = table.num_rows if rows is None else len(rows)
        self._codes: dict[str, tuple[np.ndarray, pa.Array]] = {}
        self._hashes: dict[str, np.ndarray] = {}
        self._numbers: dict[str, np.ndarray] = {}

    def table_rows(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.rows is None else self.rows[positions]

    def codes(self, column: str) -> tuple[np.ndarray, pa.Array]:
        """Dictionary code of ``column`` per position, and the dictionary
        (nulls encode as '')."""
        if column not in self._codes:
            fixed = _fixed_width_codes(self.table.column(column), self.rows)
            if fixed is not None:
                self._codes[column] = fixed
                return fixed
            values = self.table.column(column)
            if self.rows is not None:
                values = values.take(self.rows)
            values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
            if values.null_count:
                values = pc.fill_null(values, "")
            encoded = pc.dictionary_encode(values)
            codes = encoded.indices.to_numpy().astype(np.int64)
            self._codes[column] = (codes, encoded.dictionary)
        return self._codes[column]

    def hashes(self, column: str) -> np.ndarray:
        """The 64-bit hash (``hash_strings``) of ``column`` per position."""
        if column not in self._hashes:
            self._hashes[column] = hash_strings_at(self.table.column(column), self.rows)
        return self._hashes[column]

    def numbers(self, column: str) -> np.ndarray:
        if column not in self._numbers:
            values = self.table.column(column).to_numpy().astype(np.float64)
            self._numbers[column] = values if self.rows is None else values[self.rows]
        return self._numbers[column]


def _fixed_width_codes(
    column: pa.ChunkedArray, rows: np.ndarray | None
) -> tuple[np.ndarray, pa.Array] | None:
    """``Selection.codes`` for a column whose values all have the same byte
    length, at most 8 (country, currency and platform codes): each value
    is read as one 64-bit integer, and integers dictionary-encode faster
    than strings. None if the column is not like that."""
    chunks = [chunk for chunk in column.chunks if len(chunk)]
    matrices = [fixed_width_values(chunk) for chunk in chunks]
    widths = {m.shape[1] if m is not None else -1 for m in matrices}
    if len(widths) != 1 or not 0 < (width := widths.pop()) <= 8:
        return None
    bounds = np.concatenate([[0], np.cumsum([len(chunk) for chunk in chunks])]).astype(np.int64)
    if rows is None:
        rows = np.arange(int(bounds[-1]), dtype=np.int64)
    cuts = np.searchsorted(rows, bounds).tolist()
    count = len(rows)
    packed = np.zeros(count * width + 8, dtype=np.uint8)
    for index, matrix in enumerate(matrices):
        a, b = cuts[index], cuts[index + 1]
        if a < b:
            assert matrix is not None
            local = rows[a:b] - bounds[index]
            np.take(matrix, local, axis=0, out=packed[a * width : b * width].reshape(-1, width))
    numbers: np.ndarray
    if width in (1, 2, 4, 8):
        # The narrowest integer that holds a value encodes fastest.
        numbers = packed[: count * width].view(f"<u{width}")
    else:
        view = np.ndarray((count,), dtype="<u8", buffer=packed, strides=(width,))
        numbers = view & np.uint64((1 << (8 * width)) - 1)
    encoded = pc.dictionary_encode(pa.array(numbers))
    codes = encoded.indices.to_numpy().astype(np.int64)
    words = encoded.dictionary.to_numpy().astype("<u8")
    data = np.ascontiguousarray(words.view(np.uint8).reshape(len(words), 8)[:, :width])
    offsets = np.arange(0, width * (len(words) + 1), width, dtype=np.int32)
    dictionary = pa.Array.from_buffers(
        column.type, len(words), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    return codes, dictionary


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
