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

Response: ``{"metric", "granularity", "from", "to", "rows", "complete_until",
"open_windows", "revised", "served_from"}``. ``complete_until`` is
``M - L``: every window ending by then is final. ``revised`` lists windows
corrected by late events.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Route

from strata.config import parse_duration_ms
from strata.metrics import Metric, compile_metrics
from strata.processor.engine import capped_key
from strata.serving.base import ServingStore
from strata.serving.state import WindowState, finalize, merge_values

# Names the query layer's own metrics routes own (strata.query.metrics_api);
# they are registered before this route, so a GET only lands here by mistake.
RESERVED = frozenset({"dau", "wau", "mau", "active-users", "revenue", "funnel", "retention", "top"})
GRANULARITY_MS = {"5m": 300_000, "1h": 3_600_000, "1d": 86_400_000}


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

    async def handle(self, request: Request) -> Any:
        self.api.require(request, "metrics")
        name = request.path_params["name"]
        if name in RESERVED:
            raise self.APIError(
                404, f"metric {name!r}: reserved by the metrics API (see /v1/openapi.json)"
            )
        metric = self.metrics.get(name)
        if metric is None:
            known = ", ".join(sorted(self.metrics))
            raise self.APIError(404, f"metric {name!r}: unknown metric; configured: {known}")
        params = request.query_params
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
        return await run_in_threadpool(self.answer, metric, start, end, granularity, group_by)

    def answer(
        self, metric: Metric, start: int, end: int, granularity: str, group_by: list[str]
    ) -> dict[str, Any]:
        from strata.server.pipeline import iso

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
            rows.extend(self._from_rollups(metric, first_bucket, rollup_end, granularity, group_by))
            sources.append("rollup_1d" if granularity == "1d" else "rollup_5m")
        states: list[WindowState] = []
        if horizon is not None and horizon < end:
            states = [
                s
                for s in serving.windows(metric.name, horizon, end)
                if s.window_start % metric.window_ms == 0  # hopping windows: a tiling subset
            ]
            rows.extend(self._from_serving(metric, states, step, group_by))
            sources.append("serving")
        rows.sort(key=lambda r: (r["time"], *[r[d] for d in group_by]))
        open_windows = sorted({(s.window_start, s.window_end) for s in states if not s.final})
        revised = serving.revised(metric.name, first_bucket, end)
        complete_until = None if watermark is None else watermark - metric.allowed_lateness_ms
        return {
            "metric": metric.name,
            "granularity": granularity,
            "from": iso(first_bucket),
            "to": iso(end),
            "rows": rows,
            "complete_until": iso(complete_until),
            "open_windows": [
                {"window_start": iso(a), "window_end": iso(b)} for a, b in open_windows
            ],
            "revised": [{"window_start": iso(a), "window_end": iso(b)} for a, b in revised],
            "served_from": "+".join(sources) or "none",
        }

    def _from_rollups(
        self, metric: Metric, start: int, end: int, granularity: str, group_by: list[str]
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
            f"GROUP BY t{keys} ORDER BY t{keys}"
        )
        parameters = {"step": GRANULARITY_MS[granularity] // 1000, "start": start, "end": end}
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
