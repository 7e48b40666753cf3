"""``GET /v1/metrics/{name}``: any configured metric, finished ranges from
the rollups and open windows from the serving store.

For a metric with window W, allowed lateness L, processor watermark M (the
minimum over processor shards), the furthest-ahead shard's watermark X and
``processor.final_retention`` R, the serving store holds every window
starting after ``X - W - L - R`` (each shard evicts by its own watermark). A bucket
of the requested granularity is answered from the serving store when all its
windows are held there, else from the rollups (which the loader keeps from
the raw events and which late events correct). Buckets are never split
between the two sources: distinct counts cannot be merged across them.

Parameters: ``from``, ``to``, ``granularity`` (5m, 1h, 1d), ``group_by``
(dimensions of the metric) and ``filter.<dimension>=value`` (exact match;
``event_type``, ``country``, ``platform`` and ``currency`` also as
``<dimension>=value``, as on the other metrics endpoints). Filters apply to
the rollup rows and to the serving store's windows alike. Any other
parameter, a repeated one, or a filter on a column that is not a dimension
of the metric is a 400 naming it.

Response: ``{"metric", "granularity", "from", "to", "filters", "rows",
"complete_until", "open_windows", "revised", "served_from", "cache",
"open_window_ranges", "revised_ranges"}``. ``complete_until`` is ``M - L``:
every window ending by then is final. ``open_windows`` (boolean) is true
when the range reaches past ``complete_until`` or holds a window the
serving store has not finalized; ``revised`` (boolean) is true when late
events changed the range, whether or not the serving store still holds the
windows (the query service remembers every revised range, as for
``POST /v1/sql``). ``open_window_ranges`` and ``revised_ranges`` list the
windows the serving store still holds that are open or were revised.

Each request takes a token from the user's rate-limit bucket (429 +
Retry-After when empty) and the answer goes through the per-user result
cache (``QueryService.cached``): invalidated by late data in its range,
and kept only ``query.open_range_cache_ttl`` when it has open windows or
serving-store buckets (their values still move).
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC
from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Route

from strata.config import parse_duration_ms
from strata.metrics import Metric, compile_metrics
from strata.processor.engine import capped_key
from strata.query.metrics_api import SHORT_FILTERS
from strata.serving.base import ServingStore
from strata.serving.state import WindowState, finalize, merge_values

# Names the query layer's own metrics routes own (strata.query.metrics_api);
# they are registered before this route, so a GET only lands here by mistake.
RESERVED = frozenset({"dau", "wau", "mau", "active-users", "revenue", "funnel", "retention", "top"})
GRANULARITY_MS = {"5m": 300_000, "1h": 3_600_000, "1d": 86_400_000}
PARAMETERS = ("from", "to", "granularity", "group_by")


class LiveMetrics:
    def __init__(self, api: Any) -> None:
        from strata.query.api import APIError, parse_time

        self.api = api
        self.pipeline = api.pipeline
        self.config = api.pipeline.config
        self.metrics = {m.name: m for m in compile_metrics(self.config.metrics)}
        self.retention_ms = parse_duration_ms(self.config.processor.final_retention)
        self._serving: ServingStore | None = None
        self.APIError = APIError
        self.parse_time = parse_time

    def serving(self) -> ServingStore:
        processor = self.pipeline.components.get("processor")
        if processor is not None:
            store: ServingStore = processor.serving
            return store
        if self._serving is None:
            from strata.serving import open_serving

            self._serving = open_serving(self.config)
        return self._serving

    def _filters(self, metric: Metric, params: Any) -> dict[str, str]:
        """``filter.<dimension>=value`` (and the short forms) of ``params``;
        400 naming the parameter for anything unknown, repeated, or a filter
        on a column that is not a dimension of ``metric``."""
        dimensions = ", ".join(metric.dimensions) or "none"
        filters: dict[str, str] = {}
        seen: set[str] = set()
        for key, value in params.multi_items():
            if key in seen:
                raise self.APIError(400, f"{key}: given more than once")
            seen.add(key)
            if key in PARAMETERS:
                continue
            if key.startswith("filter."):
                column = key[len("filter.") :]
            elif key in SHORT_FILTERS:
                column = key
            else:
                raise self.APIError(
                    400,
                    f"{key}: unknown parameter; expected from, to, granularity, group_by "
                    f"or filter.<dimension> (dimensions of {metric.name!r}: {dimensions})",
                )
            if column not in metric.dimensions:
                raise self.APIError(
                    400,
                    f"{key}: {column!r} is not a dimension of metric {metric.name!r} "
                    f"(dimensions: {dimensions})",
                )
            filters[column] = value
        return filters

    async def handle(self, request: Request) -> Any:
        from strata.query.results import QueryResult
        from strata.query.router import TimeRange

        principal = self.api.require(request, "metrics")
        self.api.limit(principal)
        name = request.path_params["name"]
        if name in RESERVED:
            raise self.APIError(
                404, f"metric {name!r}: reserved by the metrics API (see /openapi.json)"
            )
        metric = self.metrics.get(name)
        if metric is None:
            known = ", ".join(sorted(self.metrics))
            raise self.APIError(404, f"metric {name!r}: unknown metric; configured: {known}")
        params = request.query_params
        filters = self._filters(metric, params)
        granularity = params.get("granularity", "1h")
        if granularity not in GRANULARITY_MS:
            raise self.APIError(400, "granularity: expected one of 5m, 1h, 1d")
        group_by = [d.strip() for d in params.get("group_by", "").split(",") if d.strip()]
        for dimension in group_by:
            if dimension not in metric.dimensions:
                raise self.APIError(
                    400,
                    f"group_by: {dimension!r} is not a dimension of metric {name!r} "
                    f"(dimensions: {', '.join(metric.dimensions) or 'none'})",
                )
        now = int(time.time() * 1000)
        end = self.parse_time(params.get("to"), "to")
        end = now if end is None else end
        start = self.parse_time(params.get("from"), "from")
        start = end - 86_400_000 if start is None else start
        if start >= end:
            raise self.APIError(400, "from: must be before to")
        if (end - start) // GRANULARITY_MS[granularity] > 50_000:
            raise self.APIError(400, "granularity: too many buckets for this range")
        step = GRANULARITY_MS[granularity]
        time_range = TimeRange(start // step * step, end)
        request_key = {
            "metric": metric.name,
            "granularity": granularity,
            "group_by": group_by,
            "filters": sorted(filters.items()),
        }

        def compute() -> QueryResult:
            answer = self.answer(metric, start, end, granularity, group_by, filters)
            serving_rows = answer.pop("_serving_rows")
            # Serving-store buckets move until evicted: the short TTL (decision 092).
            meta = {"answer": answer, "live_buckets": serving_rows}
            if answer["open_windows"]:
                meta["live_buckets"] = max(1, serving_rows)
            return QueryResult([], [], meta)

        result = await run_in_threadpool(
            lambda: self.pipeline.query.cached(
                user=principal.user,
                kind="live-metric",
                normalized=msgspec.json.encode(request_key).decode(),
                time_range=time_range,
                compute=compute,
            )
        )
        # A new dict: the in-process cache holds the answer object itself.
        return {**result.meta["answer"], "cache": result.meta.get("cache")}

    def answer(
        self,
        metric: Metric,
        start: int,
        end: int,
        granularity: str,
        group_by: list[str],
        filters: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The response body without ``cache``, plus ``_serving_rows`` (how
        many rows came from the serving store)."""
        from strata.query.router import TimeRange
        from strata.server.pipeline import iso

        filters = filters or {}

        step = GRANULARITY_MS[granularity]
        first_bucket = start // step * step
        serving = self.serving()
        progress = list(serving.progress().values())
        shards = [w[metric.name] for w in progress if metric.name in w]
        watermark = min(shards) if shards else None
        # Serving answers buckets whose windows it all holds, if windows tile buckets.
        # Each shard evicts by its own watermark, so the furthest-ahead shard
        # decides what every shard still holds.
        horizon: int | None = None
        if watermark is not None and step % metric.window_ms == 0:
            held_from = (
                max(shards) - metric.window_ms - metric.allowed_lateness_ms - self.retention_ms + 1
            )
            horizon = max(first_bucket, -(-held_from // step) * step)
            # Windows that reached processor.max_groups lack groups in the
            # serving store: buckets up to the last of them come from the rollups.
            capped = [w[capped_key(metric.name)] for w in progress if capped_key(metric.name) in w]
            if capped:
                horizon = max(horizon, -(-max(capped) // step) * step)
        rollup_end = end if horizon is None else min(end, horizon)
        rows: list[dict[str, Any]] = []
        sources = []
        if first_bucket < rollup_end:
            rows.extend(
                self._from_rollups(metric, first_bucket, rollup_end, granularity, group_by, filters)
            )
            sources.append("rollup_1d" if granularity == "1d" else "rollup_5m")
        states: list[WindowState] = []
        if horizon is not None and horizon < end:
            states = [
                s
                for s in serving.windows(metric.name, horizon, end)
                if s.window_start % metric.window_ms == 0  # hopping windows: a tiling subset
            ]
            positions = [(metric.dimensions.index(d), v) for d, v in filters.items()]
            matching = [s for s in states if all(s.dims[i] == v for i, v in positions)]
            serving_rows = self._from_serving(metric, matching, step, group_by)
            rows.extend(serving_rows)
            sources.append("serving")
        else:
            serving_rows = []
        rows.sort(key=lambda r: (r["time"], *[r[d] for d in group_by]))
        # Windows, not groups: a window is open (or revised) for every filter.
        open_ranges = sorted({(s.window_start, s.window_end) for s in states if not s.final})
        revised = serving.revised(metric.name, first_bucket, end)
        complete_until = None if watermark is None else watermark - metric.allowed_lateness_ms
        # The serving store forgets revised ranges it evicted; the query
        # service remembers every range late data revised (as POST /v1/sql).
        was_revised = bool(revised) or self.pipeline.query.was_revised(
            TimeRange(first_bucket, end)
        )
        return {
            "metric": metric.name,
            "granularity": granularity,
            "from": iso(first_bucket),
            "to": iso(end),
            "filters": dict(sorted(filters.items())),
            "rows": rows,
            "complete_until": iso(complete_until),
            "open_windows": bool(open_ranges) or complete_until is None or end > complete_until,
            "revised": was_revised,
            "served_from": "+".join(sources) or "none",
            "open_window_ranges": [
                {"window_start": iso(a), "window_end": iso(b)} for a, b in open_ranges
            ],
            "revised_ranges": [
                {"window_start": iso(a), "window_end": iso(b)} for a, b in revised
            ],
            "_serving_rows": len(serving_rows),
        }

    def _from_rollups(
        self,
        metric: Metric,
        start: int,
        end: int,
        granularity: str,
        group_by: list[str],
        filters: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        from strata.server.pipeline import iso

        table = metric.rollup_table("1d" if granularity == "1d" else "5m")
        keys = "".join(f", {d}" for d in group_by)  # validated dimension names
        merges = ", ".join(
            f"{a.merge_expression(a.alias)} AS {a.alias}" for a in metric.aggregations
        )
        sql = (
            "SELECT toStartOfInterval(window_start, toIntervalSecond({step:UInt32})) AS t"
            f"{keys}, {merges} FROM {table} "
            "WHERE window_start >= fromUnixTimestamp64Milli({start:Int64}, 'UTC') "
            "AND window_start < fromUnixTimestamp64Milli({end:Int64}, 'UTC') "
        )
        parameters: dict[str, Any] = {
            "step": GRANULARITY_MS[granularity] // 1000, "start": start, "end": end
        }
        # Validated dimension names; values bound as parameters.
        for i, (dimension, value) in enumerate(sorted((filters or {}).items())):
            sql += f"AND {dimension} = {{filter{i}:String}} "
            parameters[f"filter{i}"] = value
        sql += f"GROUP BY t{keys} ORDER BY t{keys}"
        _, found = self.pipeline.store.query_rows(sql, parameters)
        out = []
        for row in found:
            t = row[0]
            record: dict[str, Any] = {"time": iso(int(t.replace(tzinfo=UTC).timestamp() * 1000))}
            for i, dimension in enumerate(group_by):
                record[dimension] = row[1 + i]
            for i, aggregation in enumerate(metric.aggregations):
                value = row[1 + len(group_by) + i]
                record[aggregation.alias] = value if value == value else None  # NaN avg of nothing
            out.append(record)
        return out

    @staticmethod
    def _from_serving(
        metric: Metric, states: list[WindowState], step: int, group_by: list[str]
    ) -> list[dict[str, Any]]:
        from strata.server.pipeline import iso

        positions = [metric.dimensions.index(d) for d in group_by]
        buckets: dict[tuple[int, tuple[str, ...]], list[WindowState]] = defaultdict(list)
        for state in states:
            key = (state.window_start // step * step, tuple(state.dims[i] for i in positions))
            buckets[key].append(state)
        out = []
        for (bucket, dims), members in buckets.items():
            count, values = merge_values(metric, members)
            record: dict[str, Any] = {"time": iso(bucket)}
            record.update(dict(zip(group_by, dims, strict=True)))
            record.update(finalize(metric, count, values))
            out.append(record)
        return out


def live_metric_routes(api: Any) -> list[Route]:
    """The generic metric route; register it after every specific
    ``/v1/metrics/...`` route."""
    from strata.query.api import json_endpoint

    live = LiveMetrics(api)
    return [Route("/v1/metrics/{name}", json_endpoint(live.handle), methods=["GET"])]
