"""The metrics API: product questions answered without writing SQL.

Routes (all need the ``metrics`` scope, all rate-limited per user):

* ``GET /v1/metrics/count``: event counts per bucket, filters, group_by.
* ``GET /v1/metrics/dau|wau|mau`` and ``/v1/metrics/active-users?window=1d|7d|30d``:
  distinct users per day; WAU/MAU are rolling 7/30-day windows ending on
  each day. Mergeable ``uniqCombined`` states (error: docs/query.md), or
  ``exact=true`` for ``uniqExact`` on the raw events.
* ``GET /v1/metrics/revenue``: revenue, orders and buyers per bucket.
* ``POST /v1/metrics/funnel``: ordered steps (no fixed maximum), a
  conversion window, a breakdown, time to convert.
* ``GET /v1/metrics/retention``: cohorts by first-event day, day N returns.
* ``GET /v1/metrics/top``: top-N values of a dimension.

Every response carries ``served_from``, ``complete_until``,
``open_windows``, ``revised`` and ``cache``.

Counts, DAU, revenue and top-N are written as SQL over ``events`` and go
through the router, so they are served from a rollup whenever one can
answer them. Literal values in that SQL are built as sqlglot literal nodes
(escaped by sqlglot) and the text passes the SQL sandbox like any user
query. WAU/MAU, funnels and retention are fixed templates with bound
parameters (decision 023).
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import msgspec
from sqlglot import exp
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Route

from strata.config import ConfigError, parse_duration_ms
from strata.metrics import STRING_COLUMNS
from strata.query.api import (
    APIError,
    CoreAPI,
    _completeness,
    _json_object,
    json_endpoint,
    parse_time,
)
from strata.query.results import QueryResult
from strata.query.router import DAY_MS, TimeRange
from strata.server.pipeline import iso

GRANULARITY_MS = {"5m": 300_000, "15m": 900_000, "1h": 3_600_000, "1d": DAY_MS}
_BUCKET_SQL = {
    "5m": "toStartOfFiveMinutes(ts)",
    "15m": "toStartOfFifteenMinutes(ts)",
    "1h": "toStartOfHour(ts)",
    "1d": "toStartOfDay(ts)",
}
ACTIVE_WINDOWS = {"1d": 1, "7d": 7, "30d": 30}
MAX_FUNNEL_STEPS = 500  # a request-size bound, not a semantic one
MAX_FUNNEL_WINDOW_MS = 366 * DAY_MS  # a conversion window of at most a (leap) year
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_WINDOW_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": DAY_MS, "w": 7 * DAY_MS}
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
FUNNEL_STEPS_PER_LEVEL = 8  # steps per subquery level of funnel_sql_steps
FAST_FUNNEL_MAX_STEPS = 64  # beyond: funnel_sql_fold (planning cost, see funnel_sql_steps)
MAX_RETENTION_DAYS = 366


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def _day_ms(row: tuple[Any, ...]) -> int:
    """Epoch ms of the day in a (day, ...) row."""
    day = row[0]
    if isinstance(day, datetime):
        day = day.date()
    return (day.toordinal() - _EPOCH_ORDINAL) * DAY_MS


def _literal(value: str) -> str:
    return exp.Literal.string(value).sql(dialect="clickhouse")


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return value


def _records(columns: list[str], rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Rows as JSON objects, dates and times as ISO strings (``_cell``).
    Column-wise, each distinct time converted once: a day of 5-minute
    buckets by country is 2,880 rows but 288 times, and per-cell
    conversion was as slow as the store query."""
    if not rows:
        return []
    values = [list(column) for column in zip(*rows, strict=True)]
    for index, column in enumerate(values):
        if any(isinstance(v, date) for v in column):
            converted = {v: _cell(v) for v in set(column)}
            values[index] = [converted[v] for v in column]
    return [dict(zip(columns, row, strict=True)) for row in zip(*values, strict=True)]


def _dimension(name: str, field: str) -> str:
    if name not in STRING_COLUMNS:
        raise APIError(400, f"{field}: unknown dimension {name!r}; one of {sorted(STRING_COLUMNS)}")
    return name


# ``<column>=value`` short forms of ``filter.<column>=value`` (every metrics
# endpoint, GET /v1/metrics/{name} included).
SHORT_FILTERS = ("event_type", "country", "platform", "currency")


def _filters(params: Any) -> dict[str, str]:
    """``filter.<column>=value`` (or ``<column>=value`` for event_type,
    country, platform) query parameters."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if key.startswith("filter."):
            out[_dimension(key[len("filter.") :], key)] = value
        elif key in SHORT_FILTERS:
            out[key] = value
    return out


def _range(params: Any, align_ms: int, default_span_ms: int = DAY_MS) -> tuple[int, int]:
    """``from``/``to`` widened to whole ``align_ms`` buckets."""
    now = int(time.time() * 1000)
    end = parse_time(params.get("to"), "to")
    start = parse_time(params.get("from"), "from")
    end = now if end is None else end
    start = end - default_span_ms if start is None else start
    if start >= end:
        raise APIError(400, "from: must be before to")
    start -= start % align_ms
    end = end if end % align_ms == 0 else end - end % align_ms + align_ms
    return start, end


def _granularity(params: Any, default: str = "1h") -> str:
    granularity = params.get("granularity", default)
    if granularity not in GRANULARITY_MS:
        raise APIError(400, f"granularity: expected one of {sorted(GRANULARITY_MS)}")
    return granularity


def _group_by(params: Any) -> list[str]:
    raw = params.get("group_by", "")
    return [_dimension(g.strip(), "group_by") for g in raw.split(",") if g.strip()]


def _where(start: int, end: int, filters: dict[str, str], extra: list[str] = ()) -> str:  # type: ignore[assignment]
    parts = [*extra, f"ts >= '{_utc(start)}'", f"ts < '{_utc(end)}'"]
    parts += [f"{column} = {_literal(value)}" for column, value in sorted(filters.items())]
    return " AND ".join(parts)


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run a blocking query off the event loop; the user's heavy-query limit
    (strata.query.limits) becomes 429 + Retry-After."""
    from strata.query.limits import RateLimitExceeded

    try:
        return await run_in_threadpool(fn, *args)
    except RateLimitExceeded as exc:
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        raise APIError(429, str(exc), {"Retry-After": retry}) from exc


class MetricsAPI:
    def __init__(self, api: CoreAPI) -> None:
        self.api = api
        self.pipeline = api.pipeline

    @property
    def service(self) -> Any:
        return self.pipeline.query

    def _authorize(self, request: Request) -> str:
        principal = self.api.require(request, "metrics")
        self.api.limit(principal)
        return principal.user

    def _response(
        self, name: str, result: QueryResult, start: int, end: int, rows: Any, **extra: Any
    ) -> dict[str, Any]:
        meta = result.meta
        return {
            "metric": name,
            "from": iso(start),
            "to": iso(end),
            **extra,
            "rows": rows,
            "served_from": meta.get("served_from"),
            "reason": meta.get("reason"),
            "cache": meta.get("cache"),
            **_completeness(meta),
        }

    async def _routed(self, user: str, sql: str, start: int, end: int) -> QueryResult:
        """Run generated SQL through sandbox, router and cache."""
        return await _in_thread(self.service.sql, user, sql)

    async def _templated(
        self,
        user: str,
        kind: str,
        request_key: dict[str, Any],
        time_range: TimeRange,
        sql: str,
        parameters: dict[str, Any],
        served_from: str,
        heavy: bool,
    ) -> QueryResult:
        normalized = msgspec.json.encode(request_key).decode()

        def compute() -> QueryResult:
            result = self.service.run(user, sql, parameters, heavy=heavy)
            result.meta["served_from"] = served_from
            result.meta["reason"] = "fixed template" if heavy else "rollup template"
            return result

        def cached() -> QueryResult:
            return self.service.cached(
                user=user,
                kind=kind,
                normalized=normalized,
                time_range=time_range,
                compute=compute,
            )

        return await _in_thread(cached)

    # -- counts ------------------------------------------------------------------------
    async def count(self, request: Request) -> Any:
        user = self._authorize(request)
        params = request.query_params
        granularity = _granularity(params)
        start, end = _range(params, GRANULARITY_MS[granularity])
        group_by = _group_by(params)
        keys = ["time", *group_by]
        sql = (
            f"SELECT {_BUCKET_SQL[granularity]} AS time{''.join(', ' + g for g in group_by)}, "
            f"count() AS events FROM events WHERE {_where(start, end, _filters(params))} "
            f"GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
        )
        result = await self._routed(user, sql, start, end)
        rows = _records(result.columns, result.rows)
        return self._response("count", result, start, end, rows, granularity=granularity)

    # -- active users --------------------------------------------------------------------
    async def active_users(self, request: Request, window: str | None = None) -> Any:
        user = self._authorize(request)
        params = request.query_params
        window = window or params.get("window", "1d")
        if window not in ACTIVE_WINDOWS:
            raise APIError(400, f"window: expected one of {sorted(ACTIVE_WINDOWS)}")
        exact = _boolean(params.get("exact", "false"), "exact")
        filters = _filters(params)
        start, end = _range(params, DAY_MS, default_span_ms=30 * DAY_MS)
        days = ACTIVE_WINDOWS[window]
        distinct = "uniqExact(distinct_id)" if exact else "uniq(distinct_id)"
        if days == 1:
            result = await self._daily_active(user, start, end, filters, distinct)
        else:
            result = await self._rolling_active(user, start, end, days, filters, exact)
        rows = [{"day": _cell(row[0]), "users": row[1]} for row in result.rows]
        name = {"1d": "dau", "7d": "wau", "30d": "mau"}[window]
        return self._response(
            name,
            result,
            start,
            end,
            rows,
            window=window,
            distinct_count="exact" if exact else "uniqCombined (mergeable, approximate)",
            **{
                field: result.meta[field]
                for field in (
                    "granules_cached", "granules_computed", "days_answered", "days_computed"
                )
                if field in result.meta
            },
            **(
                {"answered_until": iso(result.meta["answered_until_ms"])}
                if "answered_until_ms" in result.meta
                else {}
            ),
        )

    async def _daily_active(
        self, user: str, start: int, end: int, filters: dict[str, str], distinct: str
    ) -> QueryResult:
        """DAU per day through the router. Without filters (uniq): complete
        days from the finalized ``day_answers`` (``QueryService.daily_answers``,
        decision 096), the open days routed. Otherwise, or before any day is
        finalized, complete days cached per day (``QueryService.granule_cached``):
        a year's series merges only the days it has not seen and the open ones."""

        def compute(lower: int, upper: int) -> QueryResult:
            sql = (
                f"SELECT toDate(ts) AS day, {distinct} AS users FROM events "
                f"WHERE {_where(lower, upper, filters)} GROUP BY day ORDER BY day"
            )
            return self.service.sql(user, sql)

        def run() -> QueryResult:
            target = (
                self.service.day_answer_target("distinct_id")
                if not filters and distinct == "uniq(distinct_id)"
                else None
            )
            if target is not None:  # finalized days from day_answers (decision 096)
                # Result-cached like any answer (on_revised drops it; open
                # ranges get the short TTL), so a refreshing dashboard does
                # not even read the table.
                answered = self.service.cached_unless_none(
                    user=user,
                    kind="dau-answers",
                    normalized=target.metric.name + "." + target.alias,
                    time_range=TimeRange(start, end),
                    compute=lambda: self.service.daily_answers(
                        target=target, start_ms=start, end_ms=end, compute=compute
                    ),
                )
                if answered is not None:
                    return answered
            return self.service.granule_cached(
                user=user,
                kind="dau",
                normalized=msgspec.json.encode({"filters": filters, "distinct": distinct}).decode(),
                start_ms=start,
                end_ms=end,
                granule_ms=DAY_MS,
                compute=compute,
                granule_of=_day_ms,
            )

        return await _in_thread(run)

    async def _rolling_active(
        self, user: str, start: int, end: int, days: int, filters: dict[str, str], exact: bool
    ) -> QueryResult:
        parameters: dict[str, Any] = {
            "lookback": _utc(start - (days - 1) * DAY_MS),
            "start": _utc(start),
            "end": _utc(end),
            "days": days,
        }
        if filters or exact:
            conditions = []
            for index, (column, value) in enumerate(sorted(filters.items())):
                conditions.append(f"{column} = {{f{index}:String}}")
                parameters[f"f{index}"] = value
            distinct = "uniqExact(distinct_id)" if exact else "uniqCombined(distinct_id)"
            sql = ROLLING_ACTIVE_RAW.format(
                distinct=distinct, filters="".join(f" AND {c}" for c in conditions)
            )
            served_from, heavy = "raw", True
        else:
            sql = ROLLING_ACTIVE_ROLLUP
            served_from, heavy = "rollup_1d", False
        key = {"days": days, "filters": filters, "exact": exact, "start": start, "end": end}
        return await self._templated(
            user,
            "rolling_active",
            key,
            TimeRange(start - (days - 1) * DAY_MS, end),
            sql,
            parameters,
            served_from,
            heavy,
        )

    async def dau(self, request: Request) -> Any:
        return await self.active_users(request, "1d")

    async def wau(self, request: Request) -> Any:
        return await self.active_users(request, "7d")

    async def mau(self, request: Request) -> Any:
        return await self.active_users(request, "30d")

    # -- revenue ----------------------------------------------------------------------------
    async def revenue(self, request: Request) -> Any:
        user = self._authorize(request)
        params = request.query_params
        granularity = _granularity(params, "1d")
        start, end = _range(params, GRANULARITY_MS[granularity], default_span_ms=30 * DAY_MS)
        group_by = _group_by(params)
        keys = ["time", *group_by]
        sql = (
            f"SELECT {_BUCKET_SQL[granularity]} AS time{''.join(', ' + g for g in group_by)}, "
            # Not ``AS revenue``: ClickHouse would substitute that alias
            # into ``WHERE revenue > 0`` on the raw path.
            "sum(revenue) AS revenue_total, count() AS orders, uniq(distinct_id) AS buyers "
            f"FROM events WHERE {_where(start, end, _filters(params), ['revenue > 0'])} "
            f"GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
        )
        result = await self._routed(user, sql, start, end)
        names = ["revenue" if c == "revenue_total" else c for c in result.columns]
        rows = _records(names, result.rows)
        return self._response("revenue", result, start, end, rows, granularity=granularity)

    # -- top-N ---------------------------------------------------------------------------------
    async def top(self, request: Request) -> Any:
        user = self._authorize(request)
        params = request.query_params
        if not params.get("dimension"):
            raise APIError(400, f"dimension: required; one of {sorted(STRING_COLUMNS)}")
        dimension = _dimension(params.get("dimension", ""), "dimension")
        measure = params.get("measure", "events")
        try:
            n = int(params.get("n", "10"))
        except ValueError as exc:
            raise APIError(400, "n: expected an integer") from exc
        if not 1 <= n <= 1000:
            raise APIError(400, "n: must be between 1 and 1000")
        expressions = {
            "events": ("count()", []),
            "users": ("uniq(distinct_id)", []),
            "revenue": ("sum(revenue)", ["revenue > 0"]),
        }
        if measure not in expressions:
            raise APIError(400, f"measure: expected one of {sorted(expressions)}")
        aggregate, extra = expressions[measure]
        start, end = _range(params, 300_000)
        sql = (
            f"SELECT {dimension} AS value, {aggregate} AS total FROM events "
            f"WHERE {_where(start, end, _filters(params), extra)} GROUP BY value "
            f"ORDER BY total DESC, value LIMIT {n}"
        )
        result = await self._routed(user, sql, start, end)
        rows = [{"value": row[0], measure: row[1]} for row in result.rows]
        return self._response(
            "top", result, start, end, rows, dimension=dimension, measure=measure, n=n
        )

    # -- funnels ------------------------------------------------------------------------------------
    async def funnel_get(self, request: Request) -> Any:
        self.api.require(request, "metrics")
        raise APIError(
            405,
            "method: /v1/metrics/funnel takes POST with a JSON body (see /openapi.json)",
            {"Allow": "POST"},
        )

    async def funnel(self, request: Request) -> Any:
        user = self._authorize(request)
        body = await request.body()
        payload = _json_object(body or b"{}")
        steps = payload.get("steps")
        if not isinstance(steps, list) or len(steps) < 2:
            raise APIError(400, "steps: a list of at least 2 steps is required")
        if len(steps) > MAX_FUNNEL_STEPS:
            raise APIError(400, f"steps: at most {MAX_FUNNEL_STEPS} steps per request")
        window_ms = _funnel_window(payload.get("window", "1d"))
        breakdown = payload.get("breakdown")
        if breakdown is not None:
            if not isinstance(breakdown, str):
                raise APIError(400, "breakdown: expected a dimension name")
            _dimension(breakdown, "breakdown")
        start, end = _funnel_range(payload)
        parameters: dict[str, Any] = {"start": _utc(start), "end": _utc(end)}
        parameters["until"] = _utc(end + window_ms)
        conditions = []
        for index, step in enumerate(steps):
            conditions.append(_step_condition(index, step, parameters))
        normalized_steps = [{"event_type": s} if isinstance(s, str) else s for s in steps]
        sql = funnel_sql(conditions, window_ms, breakdown, steps_exclusive(normalized_steps))
        key = {
            "steps": steps,
            "window": window_ms,
            "breakdown": breakdown,
            "start": start,
            "end": end,
        }
        result = await self._templated(
            user, "funnel", key, TimeRange(start, end + window_ms), sql, parameters, "raw", True
        )
        groups: dict[str, list[dict[str, Any]]] = {}
        for group, level, users, avg_ms, median_ms in result.rows:
            groups.setdefault(group, []).append(
                {
                    "step": int(level),
                    "users": int(users),
                    "avg_ms_to_convert": _finite(avg_ms),
                    "median_ms_to_convert": _finite(median_ms),
                }
            )
        breakdowns = []
        for group, levels in sorted(groups.items()):
            levels.sort(key=lambda item: item["step"])
            first = levels[0]["users"] if levels else 0
            for position, item in enumerate(levels):
                previous = levels[position - 1]["users"] if position else item["users"]
                item["conversion_from_first"] = item["users"] / first if first else 0.0
                item["conversion_from_previous"] = item["users"] / previous if previous else 0.0
            breakdowns.append({"value": group if breakdown else None, "steps": levels})
        return self._response(
            "funnel",
            result,
            start,
            end,
            breakdowns,
            window_ms=window_ms,
            breakdown=breakdown,
            steps=len(steps),
        )

    # -- retention ------------------------------------------------------------------------------------
    async def retention(self, request: Request) -> Any:
        user = self._authorize(request)
        params = request.query_params
        try:
            days = int(params.get("days", "7"))
        except ValueError as exc:
            raise APIError(400, "days: expected an integer") from exc
        if not 0 <= days <= MAX_RETENTION_DAYS:
            raise APIError(400, f"days: must be between 0 and {MAX_RETENTION_DAYS}")
        start, end = _range(params, DAY_MS, default_span_ms=14 * DAY_MS)
        parameters: dict[str, Any] = {
            "start": _utc(start),
            "end": _utc(end),
            "days": days,
            "start_event": params.get("start_event", ""),
            "return_event": params.get("return_event", ""),
        }
        key = {
            "days": days,
            "start": start,
            "end": end,
            "se": parameters["start_event"],
            "re": parameters["return_event"],
        }
        result = await self._templated(
            user,
            "retention",
            key,
            TimeRange(None, end + (days + 1) * DAY_MS),
            RETENTION_SQL,
            parameters,
            "raw",
            True,
        )
        cohorts: dict[str, dict[str, Any]] = {}
        for cohort, size, n, users in result.rows:
            entry = cohorts.setdefault(
                _cell(cohort),
                {"cohort": _cell(cohort), "users": int(size), "returned": [0] * (days + 1)},
            )
            if n is not None and 0 <= n <= days:
                entry["returned"][int(n)] = int(users)
        rows = []
        for entry in cohorts.values():
            size = entry["users"]
            entry["rate"] = [r / size if size else 0.0 for r in entry["returned"]]
            rows.append(entry)
        return self._response("retention", result, start, end, rows, days=days)


def _boolean(value: str, field: str) -> bool:
    try:
        return _BOOLEANS[value.strip().lower()]
    except KeyError:
        raise APIError(400, f"{field}: expected true or false, got {value!r}") from None


def _funnel_window(value: Any) -> int:
    """The conversion window in ms: a duration string (``"30m"``, ``"1d"``)
    or a whole number of milliseconds, above 0 and at most 366 days."""
    expected = "window: expected a duration like '30m' or '1d', or a whole number of milliseconds"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise APIError(400, f"{expected}, got {value!r}"[:300])
    if isinstance(value, int):
        window_ms = value
    else:
        match = _WINDOW.match(value)
        if match is None:
            try:  # its message names the accepted forms
                parse_duration_ms(value, "window")
            except ConfigError as exc:
                raise APIError(400, str(exc)[:300]) from exc
            raise APIError(400, f"{expected}, got {value[:100]!r}")
        exact = Decimal(match.group(1)) * _WINDOW_UNITS_MS[match.group(2)]
        if exact > MAX_FUNNEL_WINDOW_MS:
            raise APIError(400, f"window: at most 366d ({MAX_FUNNEL_WINDOW_MS} ms)")
        if exact != exact.to_integral_value():
            raise APIError(400, f"window: must be a whole number of milliseconds, got {value!r}")
        window_ms = int(exact)
    if window_ms <= 0:
        raise APIError(400, "window: must be positive")
    if window_ms > MAX_FUNNEL_WINDOW_MS:
        raise APIError(400, f"window: at most 366d ({MAX_FUNNEL_WINDOW_MS} ms)")
    return window_ms


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if number != number else round(number, 3)


def _funnel_range(payload: dict[str, Any]) -> tuple[int, int]:
    now = int(time.time() * 1000)

    def get(field: str) -> int | None:
        value = payload.get(field)
        if value is None:
            return None
        return parse_time(str(value), field)

    end = get("to")
    start = get("from")
    end = now if end is None else end
    start = end - 30 * DAY_MS if start is None else start
    if start >= end:
        raise APIError(400, "from: must be before to")
    return start, end


def _step_condition(index: int, step: Any, parameters: dict[str, Any]) -> str:
    """A step is ``{"event_type": "...", "<dimension>": "value", ...}``:
    equality on event columns, values bound as parameters."""
    field = f"steps[{index}]"
    if isinstance(step, str):
        step = {"event_type": step}
    if not isinstance(step, dict) or not step:
        raise APIError(400, f'{field}: expected an object such as {{"event_type": "signup"}}')
    parts = []
    for position, (column, value) in enumerate(sorted(step.items())):
        if column not in STRING_COLUMNS:
            raise APIError(
                400, f"{field}.{column}: unknown column; one of {sorted(STRING_COLUMNS)}"
            )
        if not isinstance(value, str):
            raise APIError(400, f"{field}.{column}: expected a string")
        name = f"s{index}_{position}"
        parameters[name] = value
        parts.append(f"{column} = {{{name}:String}}")
    return "(" + " AND ".join(parts) + ")"


def funnel_sql(
    conditions: list[str], window_ms: int, breakdown: str | None, exclusive: bool = False
) -> str:
    """The funnel query (docs/query.md, "Funnels"): ``funnel_sql_steps`` up
    to FAST_FUNNEL_MAX_STEPS steps, ``funnel_sql_fold`` beyond; both give
    the same answers (tests/test_query_perf_paths.py). ``exclusive``: no
    event can match two steps (``steps_exclusive``)."""
    if len(conditions) <= FAST_FUNNEL_MAX_STEPS:
        return funnel_sql_steps(conditions, window_ms, breakdown, exclusive)
    return funnel_sql_fold(conditions, window_ms, breakdown)


def steps_exclusive(steps: list[dict[str, str]]) -> bool:
    """True when no event can match two of ``steps``: every pair of steps
    has a column with different required values (e.g. distinct event types)."""
    return all(
        any(column in b and b[column] != value for column, value in a.items())
        for i, a in enumerate(steps)
        for b in steps[i + 1 :]
    )


def funnel_sql_steps(
    conditions: list[str], window_ms: int, breakdown: str | None, exclusive: bool = False
) -> str:
    """The fast funnel query for ``len(conditions)`` steps. Per user,
    matching events are sorted by (time, matched steps); ``chain_k[i]`` is
    the latest start of a chain that reached step k by event i within the
    window (-1: none). It is one vectorized pass per
    step, no per-event lambda loop: because ``chain_k <= chain_(k-1)`` at
    every event and both only grow, event i extends a chain to step k
    exactly when it matches step k and ``chain_(k-1)`` *before* i (the
    array shifted by one) started within the window; ``arrayFill`` carries
    the latest such start forward. Time to convert step k is the time of
    the first event that reached it minus that chain's start.

    ClickHouse expands aliases, so a SELECT holding chains 1..k costs k^2
    tree nodes; every FUNNEL_STEPS_PER_LEVEL steps the chains so far are
    passed up through a subquery as plain columns. Planning still grows
    faster than the steps (about 0.5 s at 64 steps, 8 s at 300 on this
    machine), hence FAST_FUNNEL_MAX_STEPS. Only step conditions and the window are
    inlined: conditions are built from bound parameters, the rest are ints.

    With ``exclusive`` steps an event matches at most one step, so the
    matched step is one number and (time, step) packs into one Int64
    (``ms * 128 + step``; steps <= 64): sorting plain integers instead of
    (time, array) tuples is most of the query's cost, and the order is the
    same."""
    n = len(conditions)
    w = int(window_ms)
    first_step = f"({conditions[0]} AND ts < parseDateTime64BestEffort({{end:String}}, 3, 'UTC'))"
    any_step = " OR ".join(conditions)
    is_step = (lambda m, k: f"{m} = {k}") if exclusive else (lambda m, k: f"has({m}, {k})")
    if exclusive:
        branches = ", ".join(
            f"{first_step if i == 0 else c}, {i + 1}" for i, c in enumerate(conditions)
        )
        matched = f"multiIf({branches}, 0)"
        ordered = "arraySort(groupArray(toUnixTimestamp64Milli(ts) * 128 + matched))"
        times, steps, any_match = "intDiv(x, 128)", "x % 128", "matched > 0"
    else:
        listed = ", ".join(
            f"if({first_step if i == 0 else c}, {i + 1}, 0)" for i, c in enumerate(conditions)
        )
        matched = f"arrayFilter(x -> x > 0, [{listed}])"
        ordered = "arraySort(x -> (x.1, x.2), groupArray((toUnixTimestamp64Milli(ts), matched)))"
        times, steps, any_match = "x.1", "x.2", "notEmpty(matched)"
    group = f"argMinIf(toString({breakdown}), ts, {is_step('matched', 1)})" if breakdown else "''"

    def chain(k: int) -> str:
        if k == 1:
            return (
                f"arrayFill(x -> x >= 0, arrayMap((t, m) -> if({is_step('m', 1)}, t, -1), "
                "times, steps))"
            )
        return (
            f"arrayFill(x -> x >= 0, arrayMap((t, m, s) -> "
            f"if({is_step('m', k)} AND s >= 0 AND t - s <= {w}, s, -1), times, steps, "
            f"arrayPushFront(arrayPopBack(chain_{k - 1}), -1)))"
        )

    per_user = f"""
    SELECT distinct_id, {group} AS grp,
        {ordered} AS ordered,
        arrayMap(x -> {times}, ordered) AS times,
        arrayMap(x -> {steps}, ordered) AS steps,
        {chain(1)} AS chain_1
    FROM (
        SELECT distinct_id, ts, {breakdown or "''"} AS {breakdown or "_nothing"},
               {matched} AS matched
        FROM events
        WHERE ts >= parseDateTime64BestEffort({{start:String}}, 3, 'UTC')
          AND ts < parseDateTime64BestEffort({{until:String}}, 3, 'UTC')
          AND ({any_step})
    )
    WHERE {any_match}
    GROUP BY distinct_id
    HAVING chain_1[-1] >= 0"""
    for first in range(2, n + 1, FUNNEL_STEPS_PER_LEVEL):
        ks = range(first, min(n, first + FUNNEL_STEPS_PER_LEVEL - 1) + 1)
        per_user = (
            f"SELECT *, {', '.join(f'{chain(k)} AS chain_{k}' for k in ks)} FROM ({per_user})"
        )
    reached = ", ".join(f"chain_{k}[-1] >= 0" for k in range(1, n + 1))
    to_convert = ", ".join(
        f"arrayFirst(x -> x >= 0, arrayMap((t, s) -> if(s >= 0, t - s, -1), times, chain_{k}))"
        for k in range(1, n + 1)
    )
    return f"""
SELECT grp, k AS level, countIf(reached[k]) AS users,
       avgIf(to_convert[k], reached[k]) AS avg_ms,
       medianIf(to_convert[k], reached[k]) AS median_ms
FROM (
    SELECT grp, [{reached}] AS reached, [{to_convert}] AS to_convert
    FROM ({per_user})
)
ARRAY JOIN range(1, {n + 1}) AS k
GROUP BY grp, k
ORDER BY grp, k
"""


def funnel_sql_fold(conditions: list[str], window_ms: int, breakdown: str | None) -> str:
    """The general funnel query, for any number of steps; ``funnel_sql``
    uses it beyond FAST_FUNNEL_MAX_STEPS. Same answers as
    ``funnel_sql_steps`` (tests/test_query_perf_paths.py), but the fold runs
    its lambda once per event of the longest per-user array, so one heavy
    user makes it slow (seconds at 20M events). Per user, events are sorted
    by (time, matched steps) and folded: ``acc[k]`` is the latest start of a chain that reached step k
    within the window (-1: none), ``acc[N + k]`` the time that chain took
    when step k was first reached. Only step conditions and the window are
    inlined: conditions are built from bound parameters, the rest are ints."""
    n = len(conditions)
    w = int(window_ms)

    def new_start(k: str) -> str:
        return (
            f"if(has(e.2, {k}) AND ({k} = 1 OR (acc[greatest({k} - 1, 1)] >= 0 "
            f"AND e.1 - acc[greatest({k} - 1, 1)] <= {w})), "
            f"if({k} = 1, e.1, greatest(acc[{k}], acc[greatest({k} - 1, 1)])), acc[{k}])"
        )

    k_ttc = f"(j - {n})"
    fold = (
        f"arrayMap(j -> if(j <= {n}, {new_start('j')}, "
        f"if(acc[j] >= 0, acc[j], if({new_start(k_ttc)} >= 0, e.1 - {new_start(k_ttc)}, -1))), "
        f"range(1, {2 * n + 1}))"
    )
    first_step = f"({conditions[0]} AND ts < parseDateTime64BestEffort({{end:String}}, 3, 'UTC'))"
    matched = ", ".join(
        f"if({first_step if i == 0 else c}, {i + 1}, 0)" for i, c in enumerate(conditions)
    )
    group = f"argMinIf(toString({breakdown}), ts, has(matched, 1))" if breakdown else "''"
    return f"""
SELECT grp, k AS level, countIf(progress[k] >= 0) AS users,
       avgIf(progress[{n} + k], progress[k] >= 0) AS avg_ms,
       medianIf(progress[{n} + k], progress[k] >= 0) AS median_ms
FROM (
    SELECT distinct_id, {group} AS grp,
        arrayFold((acc, e) -> {fold},
                  arraySort(x -> (x.1, x.2), groupArray((toUnixTimestamp64Milli(ts), matched))),
                  arrayWithConstant({2 * n}, toInt64(-1))) AS progress
    FROM (
        SELECT distinct_id, ts, {breakdown or "''"} AS {breakdown or "_nothing"},
               arrayFilter(x -> x > 0, [{matched}]) AS matched
        FROM events
        WHERE ts >= parseDateTime64BestEffort({{start:String}}, 3, 'UTC')
          AND ts < parseDateTime64BestEffort({{until:String}}, 3, 'UTC')
          AND ({" OR ".join(conditions)})
    )
    WHERE notEmpty(matched)
    GROUP BY distinct_id
    HAVING progress[1] >= 0
)
ARRAY JOIN range(1, {n + 1}) AS k
GROUP BY grp, k
ORDER BY grp, k
"""


ROLLING_ACTIVE_ROLLUP = """
SELECT toDate(window_start) + arrayJoin(range({days:UInt16})) AS day,
       uniqCombinedMerge(users) AS users
FROM rollup_active_users_1d
WHERE window_start >= toDateTime({lookback:String}, 'UTC')
  AND window_start < toDateTime({end:String}, 'UTC')
GROUP BY day
HAVING day >= toDate(toDateTime({start:String}, 'UTC'))
   AND day < toDate(toDateTime({end:String}, 'UTC'))
ORDER BY day
"""

ROLLING_ACTIVE_RAW = """
SELECT toDate(ts) + arrayJoin(range({{days:UInt16}})) AS day, {distinct} AS users
FROM events
WHERE ts >= toDateTime({{lookback:String}}, 'UTC') AND ts < toDateTime({{end:String}}, 'UTC'){filters}
GROUP BY day
HAVING day >= toDate(toDateTime({{start:String}}, 'UTC'))
   AND day < toDate(toDateTime({{end:String}}, 'UTC'))
ORDER BY day
"""

RETENTION_SQL = """
WITH firsts AS (
    SELECT distinct_id, toDate(min(ts)) AS cohort
    FROM events
    WHERE ts < toDateTime({end:String}, 'UTC')
      AND ({start_event:String} = '' OR event_type = {start_event:String})
    GROUP BY distinct_id
    HAVING cohort >= toDate(toDateTime({start:String}, 'UTC'))
       AND cohort < toDate(toDateTime({end:String}, 'UTC'))
),
sizes AS (SELECT cohort, count() AS size FROM firsts GROUP BY cohort),
activity AS (
    SELECT DISTINCT distinct_id, toDate(ts) AS day
    FROM events
    WHERE ts >= toDateTime({start:String}, 'UTC')
      AND ts < toDateTime({end:String}, 'UTC') + toIntervalDay({days:UInt16} + 1)
      AND ({return_event:String} = '' OR event_type = {return_event:String})
),
returns AS (
    SELECT f.cohort AS cohort, dateDiff('day', f.cohort, a.day) AS n, count() AS users
    FROM firsts AS f INNER JOIN activity AS a ON f.distinct_id = a.distinct_id
    WHERE n >= 0 AND n <= {days:UInt16}
    GROUP BY cohort, n
)
SELECT s.cohort, s.size, r.n, r.users
FROM sizes AS s LEFT JOIN returns AS r ON s.cohort = r.cohort
ORDER BY s.cohort, r.n
"""


def metrics_routes(api: CoreAPI) -> list[Route]:
    """Specific metrics routes; register them before any ``/v1/metrics/{name}``."""
    metrics = MetricsAPI(api)
    return [
        Route("/v1/metrics/count", json_endpoint(metrics.count), methods=["GET"]),
        Route("/v1/metrics/dau", json_endpoint(metrics.dau), methods=["GET"]),
        Route("/v1/metrics/wau", json_endpoint(metrics.wau), methods=["GET"]),
        Route("/v1/metrics/mau", json_endpoint(metrics.mau), methods=["GET"]),
        Route("/v1/metrics/active-users", json_endpoint(metrics.active_users), methods=["GET"]),
        Route("/v1/metrics/revenue", json_endpoint(metrics.revenue), methods=["GET"]),
        Route("/v1/metrics/funnel", json_endpoint(metrics.funnel), methods=["POST"]),
        # GET would reach the generic GET /v1/metrics/{name} route (a 404):
        # answer 405 with Allow: POST like every other method but POST.
        Route("/v1/metrics/funnel", json_endpoint(metrics.funnel_get), methods=["GET"]),
        Route("/v1/metrics/retention", json_endpoint(metrics.retention), methods=["GET"]),
        Route("/v1/metrics/top", json_endpoint(metrics.top), methods=["GET"]),
    ]
