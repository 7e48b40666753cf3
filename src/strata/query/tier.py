"""In-memory tier of finalized rollup rows (decision 102).

A rollup-routed query over a short range costs chDB's fixed price per query
(parse, plan, pipeline: 2-4 ms at any size, decision 098) even when the rows
it reads are a few thousand. Finalized days never change unless something
revises them, so this process keeps their rollup rows in memory, one entry
per (rollup table, day), and answers the rollup route's query from them with
numpy instead of sending it to the engine.

What it holds: a day's rows of one ``rollup_<metric>_5m``/``_1d`` table read
``FINAL`` (one row per window start and dimension values, the router's
decision-098 form), with every aggregation finalized except ``uniq`` (its
states merge only inside the engine). Dimension values are codes into one
dictionary per (table, dimension).

When it answers (``RollupTier.answer``), everything must hold, or the query
goes to the engine exactly as before:

* the route is a rollup route whose shape the live-window merge accepts
  (``LiveShape.unsupported`` empty: no HAVING, no expression over
  aggregates) with a bounded range, no DISTINCT, no ROLLUP/CUBE/TOTALS;
* every aggregate is count, min or max, or a sum/avg whose every output
  group is one rollup row (a float sum in another order could differ in
  the last bit); no uniq;
* every filter and every dimension group key uses one dimension; every
  non-aggregate output is a GROUP BY key;
* **every day of the range is final for this process**: before the
  frontier that this process's ``DayFinalizer`` confirmed
  (``DayAnswers.local_frontier``: the loader has stored every record the
  processor had read when its watermark passed the day, plus the largest
  allowed lateness) and not marked stale. That is exactly when
  ``day_answers`` serves a day (decision 096), so the tier has the same
  contract: late data (reported by the processor, by the finalizer's scan
  of ``late_events``, and by the events loader itself, before and after it
  stores rows whose event time lies in a final day:
  ``Pipeline.on_rows_stored``), a batch replace and a GDPR delete reach
  ``QueryService.on_revised``, which marks the days stale and then drops
  them here (``invalidate``); a day is read again only after the finalizer
  recomputed it, i.e. after the loader stored the rows that revised it. A
  load that raced with an invalidation is thrown away (generation check).
  The local frontier exists only in a process whose own loader and
  finalizer run (``strata serve``'s core, ``strata query-api``), and the
  tier is on only on the embedded chDB store, which no other process can
  open: every write to the rollups passes through this process.

Time buckets, filters and derived dimension keys are evaluated by the
engine itself, once per distinct window start or dimension value, and
remembered: they mean exactly what they mean in the routed SQL. Grouping,
merging, ORDER BY, OFFSET and LIMIT run in numpy. Where Python could differ
from the engine, the tier declines instead:

* an expression calling a function the engine does not call deterministic
  (``system.functions``: ``now()``, ``rand()``, ``arrayJoin``,
  ``runningDifference``, ``dictGet`` ...) or an aggregate: its value cannot
  be remembered (checked once per expression with ``EXPLAIN AST``); an
  expression the engine fails to evaluate over the dictionary's values (it
  may include values outside the query's rows); a filter that is not a
  number;
* a key value of the query's rows that is not valid UTF-8 (``substring``
  of 'Ü': the client decodes it to a str that neither groups nor sorts like
  the engine's bytes), NaN or -0.0 (grouped differently), or unhashable
  (arrays, maps); an ORDER BY key that is NULL or not a string, number or
  date (strings compare by code point, which is UTF-8 byte order, as in the
  engine);
* an empty answer: chDB's empty answer names its columns or not depending
  on how the query ran (none after GROUP BY over no rows, all under LIMIT 0).
* two different outputs under one name: the engine rejects the query.

tests/test_rollup_tier.py and tests/test_rollup_tier_fuzz.py compare
answers with the engine's answer to the routed SQL.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np
import pyarrow as pa
from sqlglot import exp

from strata.metrics import Metric
from strata.query.day_answers import DayAnswers, day_ms, day_of
from strata.query.results import QueryResult
from strata.query.router import DAY_MS, Route, _is_rollup_bucket, _utc

log = logging.getLogger("strata.query.tier")

# A function node of ``EXPLAIN AST`` output ("    Function lower (children 1)").
_AST_FUNCTION = re.compile(r"^\s*Function (\S+)")

# A query whose range holds more rows than this goes to the engine (numpy
# over millions of rows is no faster than chDB).
MAX_QUERY_ROWS = 2_000_000
MAX_PLANS = 1024
# Longer ranges go to the engine (a day costs a few microseconds per request).
MAX_QUERY_DAYS = 1100
MAX_REMEMBERED_ARRAYS = 256
# Remembered evaluations of time buckets / filters / dimension expressions.
MAX_VALUES_PER_EXPRESSION = 1_000_000


class Declined(Exception):
    """The tier cannot answer this query; the message says why."""


@dataclass
class _Day:
    """One (table, day) of finalized rollup rows."""

    ws: np.ndarray  # int64 epoch seconds of window_start
    dims: list[np.ndarray]  # int64 codes, one array per dimension
    values: dict[str, np.ndarray]  # finalized aggregation -> per-row value
    # Time key SQL -> (interning generation, per-row ids into the table's
    # interned values of that key): computed once per held day.
    time_ids: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.ws.shape[0])

    @property
    def cost(self) -> int:
        """What the day counts against the row budget: an empty day is held
        too, and counts as one row, so the number of held days is bounded."""
        return max(self.rows, 1)


@dataclass
class _Dictionary:
    """Codes of one (table, dimension)'s values; append-only."""

    values: list[str] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)

    def encode(self, strings: list[str]) -> np.ndarray:
        out = np.empty(len(strings), dtype=np.int64)
        for i, text in enumerate(strings):
            code = self.codes.get(text)
            if code is None:
                code = self.codes[text] = len(self.values)
                self.values.append(text)
            out[i] = code
        return out


@dataclass
class _Interned:
    """The distinct values of one time key over one table's held days."""

    generation: int
    values: list[Any] = field(default_factory=list)
    ids: dict[Any, int] = field(default_factory=dict)
    invalid: int | None = None  # the id of _INVALID (not valid UTF-8), if seen


@dataclass(frozen=True)
class _Key:
    """One GROUP BY key: a time bucket (``sql`` over window_start), a bare
    dimension (``sql`` empty) or an expression of one dimension."""

    time: bool
    dimension: int  # index into metric.dimensions; -1 for time keys
    sql: str


@dataclass(frozen=True)
class _Plan:
    metric: Metric
    table: str
    start_ms: int
    end_ms: int
    filters: tuple[tuple[int, str], ...]  # (dimension index, SQL over that column)
    keys: tuple[_Key, ...]
    # ("key", key index) or (function, aggregation alias)
    outputs: tuple[tuple[str, Any], ...]
    columns: tuple[str, ...]
    order: tuple[tuple[int, bool], ...]
    limit: int | None
    offset: int
    # GROUP BY holds every dimension bare and the rollup's own bucket: each
    # held row (one per window start and dimension values) is one group.
    one_row_per_group: bool = False


def _unqualified(node: exp.Expression, ts_to: str | None = None) -> exp.Expression:
    """Drop table qualifiers (``events.country`` -> ``country``); ``ts`` ->
    ``ts_to`` when given."""

    def replace(n: exp.Expression) -> exp.Expression:
        if isinstance(n, exp.Column) and n.table in ("", "events"):
            if ts_to is not None and n.name == "ts":
                return exp.column(ts_to)
            return exp.column(n.name)
        return n

    return node.copy().transform(replace)


def _columns_of(node: exp.Expression) -> set[str]:
    return {c.name for c in node.find_all(exp.Column)}


def _sort_rank(values: list[Any], used: np.ndarray) -> np.ndarray:
    """Rank of each value in ascending engine order (strings by code point,
    which is UTF-8 byte order; dates and numbers by value). NULL (the
    engine puts it last in both directions unless told otherwise) and values
    of types whose order may differ from the engine's are declined. Only
    the values at ``used`` indices are ranked (the others rank 0)."""
    wanted = np.unique(used).tolist()
    for kind in {type(values[i]) for i in wanted}:
        if kind is type(None):
            raise Declined("NULL in an ORDER BY key")
        if not issubclass(kind, str | bytes | int | float | date):
            raise Declined(f"ORDER BY over {kind.__name__} keys")
    try:
        order = sorted(wanted, key=lambda i: values[i])
    except TypeError as exc:
        raise Declined(f"ORDER BY key values do not compare: {exc}") from None
    rank = np.zeros(len(values), dtype=np.int64)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(len(order), dtype=np.int64)
    return rank


class RollupTier:
    """The tier of one query service; see the module docstring."""

    def __init__(
        self,
        store_getter: Callable[[], Any],
        answers: DayAnswers,
        *,
        enabled: bool = True,
        max_rows: int = 2_000_000,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """``settings``: the SQL API's limits, applied to the engine
        evaluations of the query's own expressions."""
        self._store = store_getter
        self.settings = dict(settings or {})
        self.answers = answers
        self.enabled = enabled
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._days: OrderedDict[tuple[str, date], _Day] = OrderedDict()
        self._held_rows = 0
        # Invalidation generations: a load keeps its rows only if neither
        # moved while it read (see invalidate).
        self._generation = 0
        self._day_generation: dict[date, int] = {}
        self._dictionaries: dict[tuple[str, str], _Dictionary] = {}
        # (kind, table, sql) -> {window start s | dimension code: value}
        self._evaluated: dict[tuple[str, str, str], dict[int, Any]] = {}
        self._interned: dict[tuple[str, str], _Interned] = {}
        # Rank and object arrays of remembered values lists, by list identity.
        self._arrays: dict[tuple[Any, ...], Any] = {}
        self._interned_generation = 0
        self._plans: OrderedDict[str, _Plan | str] = OrderedDict()
        # Expression text -> why it must not be remembered ("" when it may);
        # function name -> deterministic scalar (see _check_functions).
        self._verdicts: dict[str, str] = {}
        self._functions: dict[str, bool] | None = None
        self.stats = {
            "answered": 0,
            "declined": 0,
            "days_loaded": 0,
            "days_evicted": 0,
            "days_invalidated": 0,
            "evaluations": 0,
        }

    @property
    def store(self) -> Any:
        return self._store()

    # -- invalidation -------------------------------------------------------------------
    def invalidate(self, start_ms: int, end_ms: int) -> int:
        """Forget the days overlapping ``[start_ms, end_ms)``; a load in
        flight for one of them is discarded. Call after
        ``DayAnswers.mark_stale`` (QueryService.on_revised does)."""
        if end_ms <= start_ms:
            return 0
        first, last = day_of(start_ms), day_of(end_ms - 1)
        with self._lock:
            if (last - first).days > 4000:
                self._generation += 1
                dropped = len(self._days)
                self._days.clear()
                self._held_rows = 0
            else:
                dropped = 0
                for key in [k for k in self._days if first <= k[1] <= last]:
                    self._held_rows -= self._days.pop(key).cost
                    dropped += 1
                day = first
                while day <= last:
                    self._day_generation[day] = self._day_generation.get(day, 0) + 1
                    day = date.fromordinal(day.toordinal() + 1)
            self.stats["days_invalidated"] += dropped
        return dropped

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._days.clear()
            self._held_rows = 0

    def held(self) -> dict[str, Any]:
        with self._lock:
            return {"days": len(self._days), "rows": self._held_rows, **self.stats}

    # -- answering ------------------------------------------------------------------------
    def explain(self, route: Route) -> str:
        """Whether the tier would answer ``route`` now, in words."""
        if not self.enabled:
            return "off (query.rollup_tier = false, or the store is a ClickHouse server)"
        try:
            plan = self._plan(route)
            self._check_final(plan)
        except Declined as exc:
            return f"not used: {exc}"
        return "used: every day of the range is final and held in memory (or read once)"

    def answer(self, route: Route) -> tuple[QueryResult | None, str]:
        """(the answer, "") or (None, why not)."""
        if not self.enabled:
            return None, "off"
        started = time.perf_counter()
        try:
            plan = self._plan(route)
            days = self._check_final(plan)
            entries = self._entries(plan, days)
            result = self._evaluate(plan, entries)
        except Declined as exc:
            self.stats["declined"] += 1
            return None, str(exc)
        self.stats["answered"] += 1
        result.meta["query_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return result, ""

    # -- planning ---------------------------------------------------------------------------
    def _plan(self, route: Route) -> _Plan:
        with self._lock:
            found = self._plans.get(route.sql)
        if found is None:
            try:
                found = self._compile(route)
            except Declined as exc:
                found = str(exc)
            with self._lock:
                self._plans[route.sql] = found
                while len(self._plans) > MAX_PLANS:
                    self._plans.popitem(last=False)
        if isinstance(found, str):
            raise Declined(found)
        self._check_functions(found)
        return found

    def _check_functions(self, plan: _Plan) -> None:
        """Decline expressions the tier must not evaluate once and remember:
        every function they call must be deterministic for the engine
        (``system.functions.deterministic``: not ``now()``, ``rand()``,
        ``arrayJoin``, ``runningDifference`` or ``dictGet``, whose values
        change between calls, rows or blocks) and not an aggregate. The
        engine names the functions (``EXPLAIN AST``), so operators count
        too; each expression is checked once."""
        texts = [sql for _, sql in plan.filters] + [key.sql for key in plan.keys if key.sql]
        with self._lock:
            unknown = [t for t in dict.fromkeys(texts) if t not in self._verdicts]
        if unknown:
            allowed = self._function_table()
            verdicts = {}
            for text in unknown:
                try:
                    _, rows = self.store.query_rows(f"EXPLAIN AST SELECT {text}")
                except Exception:  # the engine reports the routed query's error
                    verdicts[text] = f"the engine cannot parse {text}"
                    continue
                names = [
                    match.group(1)
                    for (line, *_) in rows
                    if (match := _AST_FUNCTION.match(str(line))) is not None
                ]
                bad = [
                    n for n in names if not allowed.get(n, allowed.get(n.lower() + "\0", False))
                ]
                verdicts[text] = (
                    f"{bad[0]} is not a deterministic scalar function: its values are not "
                    "remembered"
                    if bad
                    else ""
                )
            with self._lock:
                if len(self._verdicts) > MAX_PLANS * 8:
                    self._verdicts.clear()
                self._verdicts.update(verdicts)
        for text in texts:
            with self._lock:
                verdict = self._verdicts.get(text, "")
            if verdict:
                raise Declined(verdict)

    def _function_table(self) -> dict[str, bool]:
        """Function name -> deterministic scalar (case-insensitive names
        also as ``lower(name) + NUL``); read once."""
        with self._lock:
            if self._functions is not None:
                return self._functions
        try:
            _, rows = self.store.query_rows(
                "SELECT name, deterministic = 1 AND is_aggregate = 0, case_insensitive "
                "FROM system.functions"
            )
        except Exception as exc:  # an engine without the column: nothing is remembered
            raise Declined(
                f"the engine does not say which functions are deterministic: {exc}"
            ) from None
        table: dict[str, bool] = {}
        for name, ok, insensitive in rows:
            table[str(name)] = bool(ok)
            if insensitive:
                table[str(name).lower() + "\0"] = bool(ok)
        with self._lock:
            self._functions = table
        return table

    @staticmethod
    def _compile(route: Route) -> _Plan:
        shape = route.shape
        if route.served_from not in ("rollup_5m", "rollup_1d") or shape is None:
            raise Declined("not a rollup route")
        if shape.unsupported:
            raise Declined(shape.unsupported)
        if shape.start_ms is None or shape.end_ms is None:
            raise Declined("the range is open-ended")
        select = shape.select
        if select.args.get("distinct"):
            raise Declined("DISTINCT")
        group_node = select.args.get("group")
        if group_node is not None and any(
            value for key, value in group_node.args.items() if key != "expressions"
        ):
            raise Declined("GROUP BY modifiers (ROLLUP, CUBE, TOTALS)")
        metric = shape.metric
        dimensions = list(metric.dimensions)
        filters: list[tuple[int, str]] = []
        for conjunct in shape.filters:
            used = _columns_of(conjunct)
            if len(used) != 1 or next(iter(used)) not in dimensions:
                raise Declined("a filter uses more than one dimension")
            filters.append(
                (
                    dimensions.index(next(iter(used))),
                    _unqualified(conjunct).sql(dialect="clickhouse", comments=False),
                )
            )
        keys: list[_Key] = []
        key_texts: list[str] = []
        for expression, is_time in zip(shape.group, shape.time_group, strict=True):
            used = _columns_of(expression)
            key_texts.append(expression.sql(dialect="clickhouse", comments=False))
            if is_time:
                if used != {"ts"}:
                    raise Declined("a time key uses more than ts")
                keys.append(
                    _Key(
                        True,
                        -1,
                        _unqualified(expression, "window_start").sql(
                            dialect="clickhouse", comments=False
                        ),
                    )
                )
                continue
            if len(used) != 1 or next(iter(used)) not in dimensions:
                raise Declined("a GROUP BY key uses no dimension or several")
            index = dimensions.index(next(iter(used)))
            bare = isinstance(expression, exp.Column)
            text = "" if bare else _unqualified(expression).sql(dialect="clickhouse", comments=False)
            keys.append(_Key(False, index, text))
        outputs: list[tuple[str, Any]] = []
        named: dict[str, tuple[str, Any]] = {}
        for name, position, projected in shape.projections:
            # Two outputs of one name must be one expression (in the routed
            # SQL): else the engine rejects the query ("Multiple expressions
            # for the alias").
            same = ("aggregation", position) if position is not None else (
                "expression",
                projected.sql(dialect="clickhouse", comments=False) if projected else name,
            )
            if named.setdefault(name, same) != same:
                raise Declined(f"two different outputs are named {name!r}")
            if position is not None:
                aggregation = metric.aggregations[position]
                if aggregation.function == "uniq":
                    raise Declined("uniq states merge only inside the engine")
                outputs.append((aggregation.function, aggregation.alias))
                continue
            if projected is None:
                raise Declined(f"output {name!r} is not an aggregation of the metric")
            text = projected.sql(dialect="clickhouse", comments=False)
            if text not in key_texts:
                raise Declined(f"output {name!r} is not a GROUP BY key")
            outputs.append(("key", key_texts.index(text)))
        if not keys and any(kind == "key" for kind, _ in outputs):
            raise Declined("a non-aggregate output without GROUP BY")
        granularity = route.served_from.removeprefix("rollup_")
        bare_dimensions = {key.dimension for key in keys if not key.time and not key.sql}
        own_bucket = any(
            is_time and _is_rollup_bucket(grouped, granularity)
            for grouped, is_time in zip(shape.group, shape.time_group, strict=True)
        )
        return _Plan(
            metric=metric,
            table=route.table,
            start_ms=shape.start_ms,
            end_ms=shape.end_ms,
            filters=tuple(filters),
            keys=tuple(keys),
            outputs=tuple(outputs),
            columns=tuple(name for name, _, _ in shape.projections),
            order=shape.order,
            limit=shape.limit,
            offset=shape.offset,
            one_row_per_group=own_bucket and bare_dimensions == set(range(len(dimensions))),
        )

    def _check_final(self, plan: _Plan) -> list[date]:
        first, last = day_of(plan.start_ms), day_of(plan.end_ms - 1)
        frontier = self.answers.local_frontier
        if frontier is None:
            raise Declined("no day is final in this process yet (no local DayFinalizer frontier)")
        if last >= frontier:
            raise Declined(f"the range reaches past the finalized days (frontier {frontier})")
        if self.answers.any_stale(first, last):
            raise Declined("a day of the range was revised and is not recomputed yet")
        count = (last - first).days + 1
        if count > MAX_QUERY_DAYS:
            raise Declined(f"the range spans {count:,} days, over {MAX_QUERY_DAYS:,}")
        return [date.fromordinal(first.toordinal() + i) for i in range(count)]

    # -- loading ------------------------------------------------------------------------------
    def _entries(self, plan: _Plan, days: list[date]) -> list[_Day]:
        """The held rows of ``days``; the missing ones are read in one query."""
        held: dict[date, _Day] = {}
        missing: list[date] = []
        with self._lock:
            for day in days:
                found = self._days.get((plan.table, day))
                if found is None:
                    missing.append(day)
                else:
                    self._days.move_to_end((plan.table, day))
                    held[day] = found
            generations = {day: self._day_generation.get(day, 0) for day in missing}
            generation = self._generation
        if missing:
            # Stale marks are checked after the generations were read: an
            # invalidation that lands in between moves a generation.
            if self.answers.any_stale(missing[0], missing[-1]):
                raise Declined("a day of the range was revised and is not recomputed yet")
            loaded = self._load(plan, missing[0], missing[-1])
            rows = sum(loaded[day].cost for day in missing)
            with self._lock:
                if generation != self._generation or any(
                    self._day_generation.get(day, 0) != generations[day] for day in missing
                ):
                    raise Declined("a day of the range was revised while it was read")
                if rows + sum(e.cost for e in held.values()) <= self.max_rows:
                    for day in missing:
                        key = (plan.table, day)
                        if key not in self._days:
                            self._days[key] = loaded[day]
                            self._held_rows += loaded[day].cost
                            self.stats["days_loaded"] += 1
                    while self._held_rows > self.max_rows and self._days:
                        _, evicted = self._days.popitem(last=False)
                        self._held_rows -= evicted.cost
                        self.stats["days_evicted"] += 1
                else:
                    raise Declined(
                        f"the range holds more rollup rows than query.rollup_tier_max_rows "
                        f"({self.max_rows:,})"
                    )
            held.update({day: loaded[day] for day in missing})
        return [held[day] for day in days]

    def _load(self, plan: _Plan, first: date, last: date) -> dict[date, _Day]:
        """Rows of every day in ``[first, last]`` (empty days too)."""
        metric = plan.metric
        selects = ["toInt64(toUnixTimestamp(window_start)) AS __ws"]
        selects += [f"toString({d}) AS {d}" for d in metric.dimensions]
        aggregations = [a for a in metric.aggregations if a.function != "uniq"]
        selects += [f"finalizeAggregation({a.alias}) AS {a.alias}" for a in aggregations]
        lower, upper = _utc(day_ms(first)), _utc(day_ms(last) + DAY_MS)
        table: pa.Table = self.store.query_arrow(
            f"SELECT {', '.join(selects)} FROM {plan.table} FINAL "
            f"WHERE window_start >= toDateTime('{lower}', 'UTC') "
            f"AND window_start < toDateTime('{upper}', 'UTC') ORDER BY window_start "
            f"LIMIT {self.max_rows + 1}",
            # Not the SQL API's settings: this query is the tier's own, and
            # chDB applies query_arrow's settings with SET (readonly would stay).
        )
        if table.num_rows > self.max_rows:
            raise Declined(
                f"the range holds more rollup rows than query.rollup_tier_max_rows "
                f"({self.max_rows:,})"
            )
        ws = table.column("__ws").to_numpy().astype(np.int64, copy=False)
        dims: list[np.ndarray] = []
        for dimension in metric.dimensions:
            column = table.column(dimension).combine_chunks()
            if not pa.types.is_dictionary(column.type):
                column = column.dictionary_encode()
            strings = [
                v.decode() if isinstance(v, bytes) else str(v)
                for v in column.dictionary.to_pylist()
            ]
            with self._lock:
                dictionary = self._dictionaries.setdefault((plan.table, dimension), _Dictionary())
                codes = dictionary.encode(strings)
            indices = column.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            dims.append(codes[indices] if len(codes) else indices)
        values = {
            a.alias: table.column(a.alias).to_numpy(zero_copy_only=False)
            for a in aggregations
        }
        # Sorted by window_start: each day is one slice.
        first_s = day_ms(first) // 1000
        count = (last - first).days + 1
        edges = np.searchsorted(ws, first_s + 86_400 * np.arange(count + 1, dtype=np.int64))
        out: dict[date, _Day] = {}
        for i in range(count):
            lo, hi = int(edges[i]), int(edges[i + 1])
            out[date.fromordinal(first.toordinal() + i)] = _Day(
                ws[lo:hi].copy(),
                [d[lo:hi].copy() for d in dims],
                {alias: v[lo:hi].copy() for alias, v in values.items()},
            )
        return out

    # -- evaluation by the engine, remembered -------------------------------------------------
    def _time_values(self, plan: _Plan, key: _Key, starts: np.ndarray) -> list[Any]:
        """The bucket expression's value for each window start (epoch s)."""
        memo = self._memo(("time", plan.table, key.sql))
        wanted = starts.tolist()
        missing = [s for s in wanted if s not in memo]
        if missing:
            rows = self._engine_values(
                f"SELECT __w, {key.sql} AS __v, isValidUTF8(toString(__v)) FROM "
                "(SELECT arrayJoin({w:Array(Int64)}) AS __w, "
                "toDateTime(__w, 'UTC') AS window_start)",
                {"w": missing},
                key.sql,
                len(missing),
            )
            with self._lock:
                memo.update(rows)
        return _remembered(memo, wanted)

    def _entry_time_ids(self, plan: _Plan, key: _Key, entry: _Day) -> tuple[_Interned, np.ndarray]:
        """Per-row ids of ``key``'s values for one held day, into the
        table's interned values of that key; computed once per day."""
        with self._lock:
            interned = self._interned.get((plan.table, key.sql))
            if interned is None or len(interned.values) > MAX_VALUES_PER_EXPRESSION:
                self._interned_generation += 1
                interned = _Interned(self._interned_generation)
                self._interned[(plan.table, key.sql)] = interned
            cached = entry.time_ids.get(key.sql)
            if cached is not None and cached[0] == interned.generation:
                return interned, cached[1]
        starts, inverse = np.unique(entry.ws, return_inverse=True)
        local, distinct = _intern(self._time_values(plan, key, starts))
        with self._lock:
            ids = interned.ids
            for value in distinct:
                if value not in ids:
                    ids[value] = len(interned.values)
                    if value is _INVALID:
                        interned.invalid = ids[value]
                    interned.values.append(value)
            global_of = np.fromiter(
                (ids[value] for value in distinct), dtype=np.int64, count=len(distinct)
            )
            per_row = global_of[local][inverse] if len(distinct) else inverse.astype(np.int64)
            entry.time_ids[key.sql] = (interned.generation, per_row)
        return interned, per_row

    def _remembered_ranks(
        self, identity: tuple[Any, ...] | None, values: list[Any]
    ) -> np.ndarray | None:
        """The engine-order rank of every value of a remembered values list
        (a table's dimension dictionary, a time key's interned values), kept
        while the list does not grow; None when some value has no engine
        order in Python (NULL, other types: the caller ranks the values in
        use, and declines if those are such)."""
        def rank() -> Any:
            try:
                return _sort_rank(values, np.arange(len(values), dtype=np.int64))
            except Declined:
                return False

        found = self._remembered("rank", identity, rank)
        return None if found is False else found

    def _remembered_objects(
        self, identity: tuple[Any, ...] | None, values: list[Any]
    ) -> np.ndarray | None:
        """A remembered values list as an object array (rows pick from it)."""
        return self._remembered(
            "objects", identity, lambda: np.fromiter(values, dtype=object, count=len(values))
        )

    def _remembered(
        self, kind: str, identity: tuple[Any, ...] | None, build: Callable[[], Any]
    ) -> Any:
        """``build()``'s array for a remembered values list, built once per
        (kind, list identity); None without an identity."""
        if identity is None:
            return None
        key = (kind, *identity)
        with self._lock:
            found = self._arrays.get(key)
        if found is None:
            found = build()
            with self._lock:
                if len(self._arrays) >= MAX_REMEMBERED_ARRAYS:
                    self._arrays.clear()
                self._arrays[key] = found
        return found

    def _dimension_values(self, plan: _Plan, index: int, sql: str, kind: str) -> list[Any]:
        """``sql`` (over the dimension column) for every code of the
        dimension's dictionary."""
        dimension = plan.metric.dimensions[index]
        with self._lock:
            dictionary = self._dictionaries.setdefault((plan.table, dimension), _Dictionary())
            values = list(dictionary.values)
        memo = self._memo((kind, plan.table, sql))
        missing = [i for i in range(len(values)) if i not in memo]
        if missing:
            rows = self._engine_values(
                f"SELECT __r.1, {sql} AS __v, isValidUTF8(toString(__v)) FROM "
                "(SELECT arrayJoin(arrayZip({i:Array(UInt32)}, {v:Array(String)})) AS __r, "
                f"toLowCardinality(__r.2) AS {dimension})",
                {"i": missing, "v": [values[i] for i in missing]},
                sql,
                len(missing),
            )
            with self._lock:
                memo.update(rows)
        return _remembered(memo, range(len(values)))

    def _engine_values(
        self, query: str, parameters: dict[str, Any], sql: str, expected: int
    ) -> dict[int, Any]:
        """Input -> value of ``sql`` (``_INVALID`` where its text is not
        valid UTF-8) from an evaluation query. A failure declines: the engine then runs the
        routed query and reports its own error, if any (the tier evaluates
        ``sql`` over every value the dictionary holds, which may include
        values the query's rows do not)."""
        try:
            _, rows = self.store.query_rows(query, parameters, self.settings)
        except Exception as exc:  # the engine's error is the routed query's to report
            raise Declined(f"the engine could not evaluate {sql}: {str(exc)[:200]}") from None
        self.stats["evaluations"] += 1
        if len(rows) != expected or len({row[0] for row in rows}) != expected:
            raise Declined(f"{sql} does not give one value per input")
        return {int(key): _INVALID if valid == 0 else value for key, value, valid in rows}

    def _memo(self, key: tuple[str, str, str]) -> dict[int, Any]:
        with self._lock:
            memo = self._evaluated.get(key)
            if memo is None or len(memo) > MAX_VALUES_PER_EXPRESSION:
                memo = self._evaluated[key] = {}
            return memo

    # -- evaluation in numpy --------------------------------------------------------------------
    def _evaluate(self, plan: _Plan, entries: list[_Day]) -> QueryResult:
        total = sum(e.rows for e in entries)
        if total > MAX_QUERY_ROWS:
            raise Declined(f"{total:,} rollup rows in the range, over {MAX_QUERY_ROWS:,}")
        if len(entries) == 1:
            ws, dims, values = entries[0].ws, entries[0].dims, entries[0].values
        elif entries:
            ws = np.concatenate([e.ws for e in entries])
            dims = [np.concatenate([e.dims[i] for e in entries]) for i in range(len(plan.metric.dimensions))]
            values = {
                alias: np.concatenate([e.values[alias] for e in entries])
                for alias in entries[0].values
            }
        else:
            raise Declined("empty range")
        # Time keys: per-row ids into the table's interned values, computed
        # once per held day.
        times: dict[int, tuple[_Interned, np.ndarray]] = {}
        for k, key in enumerate(plan.keys):
            if not key.time:
                continue
            parts = [self._entry_time_ids(plan, key, e) for e in entries]
            interned = parts[0][0]
            if any(part[0] is not interned for part in parts):
                raise Declined("the tier's remembered time values were reset meanwhile")
            times[k] = (
                interned,
                parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts]),
            )
        mask: np.ndarray | None = None
        if plan.start_ms % DAY_MS or plan.end_ms % DAY_MS:
            mask = (ws >= plan.start_ms // 1000) & (ws < plan.end_ms // 1000)
        for index, sql in plan.filters:
            evaluated = self._dimension_values(plan, index, sql, "filter")
            if any(not isinstance(v, int | float | None) for v in evaluated):
                # The engine rejects a string (or array, ...) as a filter.
                raise Declined(f"{sql} is not a number: the engine decides what it means")
            allowed = np.asarray([bool(v) for v in evaluated], dtype=bool)
            hit = allowed[dims[index]] if len(allowed) else np.zeros(len(ws), dtype=bool)
            mask = hit if mask is None else mask & hit
        if mask is not None:
            ws = ws[mask]
            dims = [d[mask] for d in dims]
            values = {alias: v[mask] for alias, v in values.items()}
            times = {k: (interned, ids[mask]) for k, (interned, ids) in times.items()}
        rows_in = int(ws.shape[0])
        if not plan.keys and rows_in == 0:
            raise Declined("no rows: the engine's answer for an empty aggregate stands")

        # Group ids per key.
        key_ids: list[np.ndarray] = []
        key_values: list[list[Any]] = []
        # Per key: what identifies its values list while it does not grow
        # (None: built for this query), for the remembered rank and lookup
        # arrays (_Remembered).
        key_lists: list[tuple[Any, ...] | None] = []
        for k, key in enumerate(plan.keys):
            if key.time:
                interned, ids = times[k]
                with self._lock:
                    distinct = list(interned.values)
                if interned.invalid is not None and bool((ids == interned.invalid).any()):
                    raise Declined(f"{key.sql} gives a value that is not valid UTF-8")
                key_ids.append(ids)
                key_values.append(distinct)
                key_lists.append(("time", plan.table, key.sql, interned.generation, len(distinct)))
            else:
                dimension = plan.metric.dimensions[key.dimension]
                with self._lock:
                    names = list(self._dictionaries[(plan.table, dimension)].values)
                if key.sql:
                    evaluated = self._dimension_values(plan, key.dimension, key.sql, "key")
                    ids, distinct = _intern(evaluated)
                    key_ids.append(ids[dims[key.dimension]] if len(ids) else dims[key.dimension])
                    key_values.append(distinct)
                    key_lists.append(None)
                    _check_valid(key_ids[-1], distinct, key.sql)
                else:
                    key_ids.append(dims[key.dimension])
                    key_values.append(names)
                    key_lists.append(("dim", plan.table, dimension, len(names)))
        if plan.one_row_per_group:
            first = np.arange(rows_in, dtype=np.int64)
            inverse = first
        elif key_ids:
            sizes = [max(len(v), 1) for v in key_values]
            if float(np.prod(np.asarray(sizes, dtype=np.float64))) >= 2.0**62:
                raise Declined("too many key combinations")
            combined = np.ravel_multi_index(key_ids, sizes) if len(key_ids) > 1 else key_ids[0]
            _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
        else:
            first = np.zeros(1, dtype=np.int64)
            inverse = np.zeros(rows_in, dtype=np.int64)
        groups = int(first.shape[0])
        single = groups == rows_in  # every group is one rollup row
        if not single:
            order = np.argsort(inverse, kind="stable")
            sorted_groups = inverse[order]
            bounds = np.flatnonzero(np.diff(sorted_groups)) + 1
            starts_at = np.concatenate([np.zeros(1, dtype=np.int64), bounds])

        # Per output: a numpy array per group (key ids or merged values).
        arrays: list[np.ndarray] = []
        sort_arrays: list[np.ndarray] = []
        ordered = {index for index, _ in plan.order} if groups > 1 else set()
        for position, (kind, ref) in enumerate(plan.outputs):
            if kind == "key":
                ids = key_ids[ref][first]
                arrays.append(ids)
                distinct = key_values[ref]
                if position in ordered and len(distinct):
                    rank = self._remembered_ranks(key_lists[ref], distinct)
                    if rank is None:
                        rank = _sort_rank(distinct, ids)
                    sort_arrays.append(rank[ids])
                else:
                    sort_arrays.append(ids)
                continue
            column = values[ref]
            if single:
                merged = column[first]
            elif kind == "count":
                merged = np.add.reduceat(column[order].astype(np.uint64), starts_at)
            elif kind == "min":
                merged = np.minimum.reduceat(column[order], starts_at)
            elif kind == "max":
                merged = np.maximum.reduceat(column[order], starts_at)
            else:
                raise Declined(f"{kind} over several rollup rows per group")
            if merged.dtype.kind == "f" and bool(np.isnan(merged).any()):
                raise Declined("NaN in an aggregate")
            arrays.append(merged)
            sort_arrays.append(merged)

        selected: np.ndarray | slice = slice(None)
        if plan.order and groups > 1:
            sort_keys = []
            for index, descending in reversed(plan.order):
                array = sort_arrays[index]
                if descending:
                    array = -(array.astype(np.float64) if array.dtype.kind == "u" else array)
                sort_keys.append(array)
            selected = np.lexsort(sort_keys)
        if plan.offset or plan.limit is not None:
            upper = None if plan.limit is None else plan.offset + plan.limit
            selected = (
                np.arange(groups)[plan.offset : upper]
                if isinstance(selected, slice)
                else selected[plan.offset : upper]
            )
        columns_out: list[list[Any]] = []
        for (kind, ref), array in zip(plan.outputs, arrays, strict=True):
            picked = array[selected]
            if kind == "key":
                distinct = key_values[ref]
                whole = self._remembered_objects(key_lists[ref], distinct)
                if whole is not None:
                    columns_out.append(whole[picked].tolist())
                    continue
                used, positions = np.unique(picked, return_inverse=True)
                lookup = np.fromiter(
                    (distinct[i] for i in used.tolist()), dtype=object, count=len(used)
                )
                columns_out.append(lookup[positions].tolist() if len(used) else [])
            else:
                columns_out.append(picked.tolist())
        rows = list(zip(*columns_out, strict=True)) if columns_out else []
        if not rows:
            # The engine's empty answer names its columns or not depending on
            # how the query ran (chDB: none after GROUP BY over no rows, all
            # of them under LIMIT 0): it answers those itself.
            raise Declined("no rows: the engine's empty answer stands")
        if len(rows) > int(self.settings.get("max_result_rows") or 2**62):
            raise Declined("more rows than query.sql_max_rows: the engine reports it")
        return QueryResult(
            list(plan.columns),
            rows,
            {"rollup_tier": "memory", "tier_rows": rows_in},
        )


# An evaluated value whose text is not valid UTF-8 (``substring`` of a
# multi-byte character): the client decodes it to a str that neither groups
# nor sorts like the engine's bytes.
_INVALID = object()


def _remembered(memo: dict[int, Any], wanted: Any) -> list[Any]:
    """The remembered values (``_INVALID`` where not valid UTF-8)."""
    try:
        return [memo[item] for item in wanted]
    except KeyError:
        raise Declined("an evaluation lost a value") from None


def _check_valid(ids: np.ndarray, distinct: list[Any], sql: str) -> None:
    """Decline when a row's key value (``distinct[ids]``) is not valid UTF-8."""
    for index, value in enumerate(distinct):
        if value is _INVALID and bool((ids == index).any()):
            raise Declined(f"{sql} gives a value that is not valid UTF-8")


def _intern(values: list[Any]) -> tuple[np.ndarray, list[Any]]:
    """Ids of ``values`` (equal values, equal id) and the distinct values.

    Python equality must be the engine's GROUP BY equality: it is not for
    NaN (the engine makes one group), -0.0 (the engine keeps it apart from
    0.0) and unhashable values (arrays, maps), so those are declined."""
    seen: dict[Any, int] = {}
    try:
        ids = np.fromiter(
            (seen.setdefault(v, len(seen)) for v in values), dtype=np.int64, count=len(values)
        )
    except TypeError as exc:
        raise Declined(f"a GROUP BY key has values Python cannot group: {exc}") from None
    if any(issubclass(kind, float | tuple) for kind in set(map(type, values))):
        for value in values:  # all of them: 0.0 and -0.0 are one key of ``seen``
            if isinstance(value, float | tuple):
                _check_groupable(value)
    return ids, list(seen)


def _check_groupable(value: Any) -> None:
    if isinstance(value, float) and (value != value or (value == 0 and str(value)[0] == "-")):
        raise Declined("NaN or -0.0 in a GROUP BY key")
    if isinstance(value, tuple):
        for item in value:
            _check_groupable(item)
