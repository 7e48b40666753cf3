"""Merging the serving store's live windows into rollup-routed SQL answers.

The rule (decision 092) is the one ``GET /v1/metrics/{name}`` uses: every
time bucket whose windows the serving store fully holds is answered from the
serving store, the rest from the rollup, and no output group ever mixes the
two sources (distinct counts cannot be merged across them).

The serving store fully holds a metric's window when every partition of the
``events`` topic is covered by exactly one processor shard (``all`` or
``p0-1-…``) and the window starts after ``max(shard watermark) - W - L - R``
(window, allowed lateness, ``processor.final_retention``): the shard that is
furthest ahead has evicted the most. ``held_start`` is that bound rounded up
to a window start, and no earlier than the end of the last window that hit
``processor.max_groups`` (``<metric>#capped_until`` in a shard's progress).

A query with a time bucket in GROUP BY is split at ``split``: the first
bucket boundary at or after ``held_start``. Buckets before it come from the
rollup (the query re-routed with ``ts < split``), buckets from it on from
the window states, merged across windows and shards with ``merge_values`` /
``finalize``. A query without a time bucket is merged only when its whole
range lies in the held windows. Time buckets, non-aggregate projections and
the dimension filters of the live part are evaluated by the store itself
over the (window start, dimensions) of the live states, so they mean exactly
what they mean on the rollup. ORDER BY, LIMIT and OFFSET are applied to the
union. Anything else (HAVING, expressions over aggregates, ...) is answered
from the rollup alone with ``live_windows: "not merged: <reason>"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlglot import exp

from strata.processor.engine import capped_key
from strata.query.results import QueryResult
from strata.query.router import LiveShape, NotAnswerable, Route, Router
from strata.serving.base import ServingStore
from strata.serving.state import WindowState, finalize, merge_values

log = logging.getLogger("strata.query")

# The live part never evaluates more than this many window starts at once.
MAX_CANDIDATES = 200_000
_LIVE = "__live"

RunSQL = Callable[[str, dict[str, Any] | None], tuple[list[str], list[tuple[Any, ...]]]]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shard_partitions(shard: str, total: int) -> set[int] | None:
    if shard == "all":
        return set(range(total))
    if shard.startswith("p"):
        try:
            return {int(p) for p in shard[1:].split("-")}
        except ValueError:
            return None
    return None


@dataclass
class LivePlan:
    """How one routed query gets its live buckets. ``merged`` False: the
    rollup answer stands and ``note`` says why."""

    merged: bool
    note: str
    watermark_ms: int | None = None
    held_start_ms: int | None = None
    split_ms: int | None = None
    rollup: Route | None = None
    states: list[WindowState] = field(default_factory=list)

    def explain(self) -> dict[str, Any]:
        out: dict[str, Any] = {"merged": self.merged, "note": self.note}
        if self.watermark_ms is not None:
            out["serving_watermark"] = _iso(self.watermark_ms)
        if self.held_start_ms is not None:
            out["serving_holds_from"] = _iso(self.held_start_ms)
        if self.split_ms is not None:
            out["live_from"] = _iso(self.split_ms)
        if self.rollup is not None:
            out["rollup_sql"] = self.rollup.sql
        if self.merged:
            out["live_window_states"] = len(self.states)
        return out


def _not_merged(reason: str, **kw: Any) -> LivePlan:
    return LivePlan(False, f"not merged: {reason}", **kw)


def _qualify(node: exp.Expression, dimensions: tuple[str, ...]) -> exp.Expression:
    """ts -> the live rows' window_start, dimensions -> their columns."""

    def replace(n: exp.Expression) -> exp.Expression:
        if isinstance(n, exp.Column) and n.table in ("", "events"):
            if n.name == "ts":
                return exp.column("window_start", table=_LIVE)
            if n.name in dimensions:
                return exp.column(n.name, table=_LIVE)
        return n

    return node.copy().transform(replace)


def _live_rows_sql(shape: LiveShape, selects: list[str], with_filters: bool) -> str:
    """SELECT ``selects`` over rows bound as arrays: __i (UInt32),
    window_start (epoch s), one String array per dimension."""
    dimensions = shape.metric.dimensions
    arrays = ["{__i:Array(UInt32)}", "{__ws:Array(UInt32)}"]
    arrays += [f"{{__d{i}:Array(String)}}" for i in range(len(dimensions))]
    columns = ["__r.1 AS __i", "toDateTime(__r.2, 'UTC') AS window_start"]
    columns += [f"__r.{i + 3} AS {d}" for i, d in enumerate(dimensions)]  # validated names
    sql = (
        f"SELECT {', '.join(selects)} FROM (SELECT {', '.join(columns)} "
        f"FROM (SELECT arrayJoin(arrayZip({', '.join(arrays)})) AS __r)) AS {_LIVE}"
    )
    if with_filters and shape.filters:
        conditions = [
            f"({_qualify(f, dimensions).sql(dialect='clickhouse', comments=False)})"
            for f in shape.filters
        ]
        sql += " WHERE " + " AND ".join(conditions)
    return sql


def _parameters(shape: LiveShape, rows: list[tuple[int, int, list[str]]]) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "__i": [r[0] for r in rows],
        "__ws": [r[1] // 1000 for r in rows],
    }
    for i in range(len(shape.metric.dimensions)):
        parameters[f"__d{i}"] = [r[2][i] for r in rows]
    return parameters


class LiveMerger:
    """Plans and executes the merge for one query service."""

    def __init__(
        self,
        router: Router,
        serving: Callable[[], ServingStore | None],
        partitions: int,
        final_retention_ms: int,
    ) -> None:
        self.router = router
        self.serving = serving
        self.partitions = partitions
        self.retention_ms = final_retention_ms

    # -- planning ------------------------------------------------------------------
    def plan(self, route: Route, run: RunSQL, now_ms: int | None = None) -> LivePlan | None:
        """None for raw routes (nothing to merge). Reads the serving store
        and, for time-bucketed queries, asks the store where buckets start.
        A serving store that fails is reported, never fatal: the rollup
        answer stands (``not merged: serving store unavailable: ...``)."""
        try:
            return self._plan(route, run, now_ms)
        except Exception as exc:  # noqa: BLE001 - any backend failure means "rollup only"
            log.warning("live windows not merged: %s", exc, exc_info=True)
            return _not_merged(f"serving store unavailable: {str(exc).splitlines()[0][:200]}")

    def _plan(self, route: Route, run: RunSQL, now_ms: int | None) -> LivePlan | None:
        shape = route.shape
        if shape is None:
            return None
        if shape.unsupported:
            return _not_merged(shape.unsupported)
        metric = shape.metric
        window = metric.window_ms
        if 300_000 % window:
            return _not_merged(f"the metric's {window // 1000}s windows do not tile 5 minutes")
        serving = self.serving()
        if serving is None:
            return _not_merged("no serving store is reachable from this process")
        everything = serving.progress()
        shards = list(everything.values())
        progress = {s: w[metric.name] for s, w in everything.items() if metric.name in w}
        if not progress:
            return _not_merged("the serving store has no watermark for this metric yet")
        covered: list[int] = []
        for shard in progress:
            owned = _shard_partitions(shard, self.partitions)
            if owned is None:
                return _not_merged(f"unknown processor shard {shard!r} in the serving store")
            covered.extend(owned)
        if sorted(covered) != list(range(self.partitions)):
            return _not_merged(
                "the processor shards in the serving store do not cover every partition "
                f"exactly once ({', '.join(sorted(progress))})"
            )
        watermark = max(progress.values())
        held_from = watermark - window - metric.allowed_lateness_ms - self.retention_ms + 1
        held_start = -(-held_from // window) * window
        # Windows that reached processor.max_groups lack groups in the
        # serving store: everything up to the end of the last one is rollup.
        capped = [w[capped_key(metric.name)] for w in shards if capped_key(metric.name) in w]
        if capped:
            held_start = max(held_start, -(-max(capped) // window) * window)
        base: dict[str, Any] = {"watermark_ms": watermark, "held_start_ms": held_start}
        if shape.end_ms is not None and shape.end_ms <= held_start:
            return LivePlan(False, "no live windows in the range: answered from the rollup", **base)
        lower = held_start if shape.start_ms is None else max(held_start, shape.start_ms)
        upper = shape.end_ms if shape.end_ms is not None else 2**62
        states = [
            s
            for s in serving.windows(metric.name, lower, upper)
            if s.window_start % window == 0 and s.window_start + window <= upper
        ]
        if not any(shape.time_group):
            if shape.start_ms is None or shape.start_ms < held_start:
                return _not_merged(
                    "without a time bucket in GROUP BY the range would mix rollup and live "
                    "windows in one group; add a time bucket or start the range at "
                    f"{_iso(held_start)} or later",
                    **base,
                )
            split = shape.start_ms
        else:
            found = self._split(shape, held_start, lower, states, run)
            if found is None:
                return LivePlan(
                    False,
                    "no whole time bucket in the range is held by the serving store: "
                    "answered from the rollup",
                    **base,
                )
            split = found
        states = [s for s in states if s.window_start >= split]
        if not states:
            return LivePlan(False, "the serving store holds no window states in the range", **base)
        rollup: Route | None = None
        if shape.start_ms is None or shape.start_ms < split:
            try:
                rollup = self.router.reroute(shape, split, now_ms)
            except NotAnswerable as exc:
                return _not_merged(f"the finished part of the range: {exc}", **base)
        return LivePlan(
            True,
            f"merged: buckets from {_iso(split)} on come from the serving store",
            watermark,
            held_start,
            split,
            rollup,
            states,
        )

    def _split(
        self,
        shape: LiveShape,
        held_start: int,
        lower: int,
        states: list[WindowState],
        run: RunSQL,
    ) -> int | None:
        """The first time-bucket boundary at or after ``lower`` whose bucket
        lies wholly in the held windows (None when there is none)."""
        window = shape.metric.window_ms
        if shape.start_ms is not None and shape.start_ms >= held_start:
            return shape.start_ms  # no earlier window is in the range
        last = max([s.window_start for s in states], default=lower)
        count = (last - lower) // window + 2
        if count > MAX_CANDIDATES:
            return None
        starts = [lower - window + i * window for i in range(count)]
        dimensions = shape.metric.dimensions
        keys = [
            _qualify(g, dimensions).sql(dialect="clickhouse", comments=False)
            for g, is_time in zip(shape.group, shape.time_group, strict=True)
            if is_time
        ]
        selects = ["__i"] + [f"{k} AS __t{i}" for i, k in enumerate(keys)]
        rows = [(i, start, [""] * len(dimensions)) for i, start in enumerate(starts)]
        sql = _live_rows_sql(shape, selects, with_filters=False) + " ORDER BY __i"
        _, found = run(sql, _parameters(shape, rows))
        before = tuple(found[0][1:])
        for row in found[1:]:
            if tuple(row[1:]) != before:
                return starts[row[0]]
        return None

    # -- execution -----------------------------------------------------------------------
    def execute(self, plan: LivePlan, route: Route, run: RunSQL) -> QueryResult:
        """The merged answer: rollup rows before ``plan.split_ms``, live rows
        from it, then the query's ORDER BY, OFFSET and LIMIT."""
        shape = route.shape
        assert shape is not None and plan.merged
        metric = shape.metric
        dimensions = metric.dimensions
        columns = [name for name, _, _ in shape.projections]
        rows: list[tuple[Any, ...]] = []
        if plan.rollup is not None:
            names, found = run(plan.rollup.sql, None)
            # An empty rollup answer may come back without column names
            # (everything in the range is still live): keep the projections'.
            columns = names or columns
            rows.extend(found)
        selects = ["__i"]
        selects += [
            f"{_qualify(g, dimensions).sql(dialect='clickhouse', comments=False)} AS __g{i}"
            for i, g in enumerate(shape.group)
        ]
        plain = [(k, e) for k, (_, index, e) in enumerate(shape.projections) if e is not None]
        selects += [
            f"{_qualify(e, dimensions).sql(dialect='clickhouse', comments=False)} AS __p{k}"
            for k, e in plain
        ]
        live_rows = [(i, s.window_start, list(s.dims)) for i, s in enumerate(plan.states)]
        _, evaluated = run(
            _live_rows_sql(shape, selects, with_filters=True), _parameters(shape, live_rows)
        )
        groups: dict[tuple[Any, ...], tuple[list[WindowState], tuple[Any, ...]]] = {}
        width = len(shape.group)
        for row in evaluated:
            key = tuple(row[1 : 1 + width])
            members, values = groups.setdefault(key, ([], tuple(row[1 + width :])))
            members.append(plan.states[row[0]])
        time_keys = {
            tuple(k for k, is_time in zip(key, shape.time_group, strict=True) if is_time)
            for key in groups
        }
        positions = {k: j for j, (k, _) in enumerate(plain)}
        live_output: list[tuple[Any, ...]] = []
        for members, values in groups.values():
            count, merged = merge_values(metric, members)
            final = finalize(metric, count, merged)
            out: list[Any] = []
            for k, (_, index, expression) in enumerate(shape.projections):
                if expression is not None:
                    out.append(values[positions[k]])
                else:
                    assert index is not None
                    out.append(final[metric.aggregations[index].alias])
            live_output.append(tuple(out))
        rows.extend(live_output)
        for index, descending in reversed(shape.order):
            rows.sort(key=lambda r: _sort_key(r[index]), reverse=descending)
        rows = rows[shape.offset :]
        if shape.limit is not None:
            rows = rows[: shape.limit]
        return QueryResult(
            columns,
            rows,
            {
                "live_buckets": len(time_keys),
                "live_groups": len(live_output),
                "live_from": _iso(plan.split_ms) if plan.split_ms is not None else None,
            },
        )


def _sort_key(value: Any) -> Any:
    # ClickHouse sorts NaN after every number (avg over nothing); keep that.
    if isinstance(value, float) and value != value:
        return (1, 0.0)
    return (0, value)
