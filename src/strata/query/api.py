"""HTTP routes of the core process: SQL, metrics, status and health.

Every route here authenticates a query token and checks its scope
(``metrics``, ``sql`` or ``admin``; see strata.auth). Errors are JSON
``{"error": "..."}`` with a 4xx status that names the field.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from strata.auth import Principal, bearer
from strata.query import sandbox
from strata.query.results import json_fallback
from strata.server.pipeline import Pipeline, iso
from strata.telemetry import REGISTRY, load_snapshots

log = logging.getLogger("strata.query")

# Cells msgspec has no JSON form for (IP addresses, ...) become their text.
_json = msgspec.json.Encoder(enc_hook=json_fallback)


class APIError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _json.encode(content)


# The store's time columns are DateTime (seconds, to 2106); bounds past them
# would overflow date arithmetic in SQL and in Python.
MAX_TIME_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z


def parse_time(value: str | None, field: str) -> int | None:
    """ISO-8601 or epoch milliseconds -> epoch ms, within 1970-01-01 .. 2100-01-01."""
    if value is None or value == "":
        return None
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
    if value.lstrip("-").isascii() and value.lstrip("-").isdigit():
        ms = int(value)
    else:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise APIError(400, f"{field}: expected ISO-8601 or epoch milliseconds") from exc
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        ms = int(parsed.timestamp() * 1000)
    if not 0 <= ms <= MAX_TIME_MS:
        raise APIError(400, f"{field}: must be between 1970-01-01 and 2100-01-01 (UTC)")
    return ms


GRANULARITY_SECONDS = {"5m": 300, "1h": 3600, "1d": 86_400}
EVENTS_PARAMETERS = ("from", "to", "granularity", "event_type")  # GET /v1/metrics/events


class CoreAPI:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config

    def require(self, request: Request, scope: str) -> Principal:
        principal = self.pipeline.keyring.authenticate(bearer(request.headers))
        if principal is None:
            raise APIError(
                401,
                "authorization: missing or unknown query token",
                {"WWW-Authenticate": 'Bearer realm="strata"'},
            )
        if scope not in principal.scopes:
            raise APIError(403, f"authorization: this token lacks the {scope!r} scope")
        return principal

    # -- SQL -----------------------------------------------------------------------
    def limit(self, principal: Principal) -> None:
        """Take one token from the user's bucket; 429 + Retry-After if empty."""
        from strata.query.limits import RateLimitExceeded

        try:
            self.pipeline.query.limits.check(principal.user)
        except RateLimitExceeded as exc:
            REGISTRY.inc("strata_query_rate_limited_total", 1)
            retry = str(max(1, math.ceil(exc.retry_after_s)))
            raise APIError(429, str(exc), {"Retry-After": retry}) from exc

    async def sql(self, request: Request) -> Any:
        """POST /v1/sql ``{"sql": "...", "explain": false}``; the answer in
        JSON (default), CSV or Arrow IPC by ``Accept`` (docs/query.md)."""
        from strata.query.limits import RateLimitExceeded
        from strata.query.results import negotiate

        principal = self.require(request, "sql")
        self.limit(principal)
        try:
            media = negotiate(request.headers.get("accept"))
        except ValueError as exc:
            raise APIError(406, str(exc)) from exc
        body = await request.body()
        payload = _json_object(body)
        text = payload.get("sql")
        if not isinstance(text, str):
            raise APIError(400, "sql: required, a string")
        explain = payload.get("explain", False)
        if not isinstance(explain, bool):
            raise APIError(400, "explain: expected true or false")
        service = self.pipeline.query
        started = time.perf_counter()
        try:
            if explain:
                _, route = await run_in_threadpool(service.plan, text)
                return {
                    "explain": route.explain(),
                    "served_from": route.served_from,
                    "executed": False,
                    **_completeness(service.completeness(route.time_range)),
                }
            result = await run_in_threadpool(service.sql, principal.user, text)
        except sandbox.SQLRejected as exc:
            raise APIError(400, str(exc)) from exc
        except RateLimitExceeded as exc:
            retry = str(max(1, math.ceil(exc.retry_after_s)))
            raise APIError(429, str(exc), {"Retry-After": retry}) from exc
        except Exception as exc:
            raise APIError(400, f"sql: query failed: {_first_line(exc)}") from exc
        try:
            return await self._sql_answer(result, media, started)
        except APIError:
            raise
        except Exception as exc:
            # Never let the answer's encoding escape the handler: the worker
            # proxy would see a dropped connection (audit 5, bug 5).
            log.exception("encoding a /v1/sql answer as %s failed", media)
            raise APIError(
                500, f"sql: the answer could not be encoded as {media}: {_first_line(exc)}"
            ) from exc

    async def _sql_answer(self, result: Any, media: str, started: float) -> Any:
        from strata.query.results import ARROW_STREAM, CSV

        elapsed = (time.perf_counter() - started) * 1000
        REGISTRY.observe(
            "strata_query_seconds", elapsed / 1000,
            {"endpoint": "sql", "served_from": str(result.meta.get("served_from"))},
        )
        meta = result.meta
        headers = {
            "X-Strata-Served-From": str(meta.get("served_from")),
            "X-Strata-Cache": str(meta.get("cache")),
            "X-Strata-Complete-Until": str(iso(meta.get("complete_until_ms"))),
            "X-Strata-Open-Windows": str(bool(meta.get("open_windows"))).lower(),
            "X-Strata-Revised": str(bool(meta.get("revised"))).lower(),
        }
        if media == CSV:
            return Response(result.to_csv(), media_type="text/csv; charset=utf-8", headers=headers)
        if media == ARROW_STREAM:
            data = await run_in_threadpool(result.to_arrow_ipc)
            return Response(data, media_type=ARROW_STREAM, headers=headers)
        return JSON({
            "columns": result.columns,
            "rows": result.json_rows(),
            "served_from": meta.get("served_from"),
            "reason": meta.get("reason"),
            "metric": meta.get("metric"),
            "cache": meta.get("cache"),
            **_completeness(meta),
            "live_windows": meta.get("live_windows"),
            "live_buckets": meta.get("live_buckets", 0),
            "live_from": meta.get("live_from"),
            "rollup_tier": meta.get("rollup_tier"),
            "elapsed_ms": round(elapsed, 3),
        })

    # -- metrics ---------------------------------------------------------------------
    async def events_metric(self, request: Request) -> Any:
        """GET /v1/metrics/events: events and users per event type and bucket
        from the events_by_type rollup. Rate-limited and result-cached per
        user like every metrics endpoint, with the completeness fields."""
        from strata.query.results import QueryResult
        from strata.query.router import TimeRange

        principal = self.require(request, "metrics")
        self.limit(principal)
        params = request.query_params
        seen: set[str] = set()
        for key, _ in params.multi_items():
            if key in seen:
                raise APIError(400, f"{key}: given more than once")
            seen.add(key)
            if key not in EVENTS_PARAMETERS:
                raise APIError(
                    400,
                    f"{key}: unknown parameter; expected {', '.join(EVENTS_PARAMETERS)} "
                    "(filters and group_by: GET /v1/metrics/count)",
                )
        granularity = params.get("granularity", "1h")
        if granularity not in GRANULARITY_SECONDS:
            raise APIError(400, "granularity: expected one of 5m, 1h, 1d")
        now = int(time.time() * 1000)
        start = parse_time(params.get("from"), "from")
        end = parse_time(params.get("to"), "to")
        end = now if end is None else end
        start = end - 86_400_000 if start is None else start
        if start >= end:
            raise APIError(400, "from: must be before to")
        step = GRANULARITY_SECONDS[granularity]
        served_from = f"rollup_{'1d' if granularity == '1d' else '5m'}"
        table = "rollup_events_by_type_1d" if granularity == "1d" else "rollup_events_by_type_5m"
        sql = (
            "SELECT toStartOfInterval(window_start, toIntervalSecond({step:UInt32})) AS t, "
            "event_type, countMerge(events) AS events, uniqCombinedMerge(users) AS users "
            f"FROM {table} "
            "WHERE window_start >= toStartOfInterval(fromUnixTimestamp64Milli({start:Int64}, 'UTC'), toIntervalSecond({step:UInt32})) "
            "AND window_start < fromUnixTimestamp64Milli({end:Int64}, 'UTC') "
        )
        parameters: dict[str, Any] = {"step": step, "start": start, "end": end}
        event_type = params.get("event_type")
        if event_type:
            sql += "AND event_type = {event_type:String} "
            parameters["event_type"] = event_type
        sql += "GROUP BY t, event_type ORDER BY t, event_type"
        service = self.pipeline.query
        # The SQL reads from the start of from's bucket: so does the cache entry.
        time_range = TimeRange(start - start % (step * 1000), end)

        def compute() -> QueryResult:
            result: QueryResult = service.run(principal.user, sql, parameters, heavy=False)
            result.meta.update(
                {"served_from": served_from, "reason": "rollup template", "live_buckets": 0}
            )
            return result

        started = time.perf_counter()
        result = await run_in_threadpool(
            lambda: service.cached(
                user=principal.user,
                kind="events-metric",
                normalized=msgspec.json.encode([granularity, event_type or ""]).decode(),
                time_range=time_range,
                compute=compute,
            )
        )
        REGISTRY.observe(
            "strata_query_seconds", time.perf_counter() - started, {"endpoint": "metrics"}
        )
        return {
            "metric": "events",
            "granularity": granularity,
            "from": iso(start),
            "to": iso(end),
            "rows": [
                {"time": iso(int(t.replace(tzinfo=UTC).timestamp() * 1000)), "event_type": et, "events": n, "users": u}
                for t, et, n, u in result.rows
            ],
            "served_from": served_from,
            "reason": result.meta.get("reason"),
            "cache": result.meta.get("cache"),
            **_completeness(result.meta),
        }

    # -- operations -------------------------------------------------------------------
    async def status(self, request: Request) -> Any:
        self.require(request, "metrics")
        return await run_in_threadpool(self.pipeline.status)

    async def healthz(self, request: Request) -> Response:
        healthy, problems = self.pipeline.healthy()
        return JSON({"ok": healthy, "problems": problems}, status_code=200 if healthy else 503)

    async def readyz(self, request: Request) -> Response:
        healthy, problems = self.pipeline.healthy()
        ready = healthy and not self.pipeline.stop_event.is_set()
        return JSON({"ready": ready, "problems": problems}, status_code=200 if ready else 503)

    async def prometheus(self, request: Request) -> Response:
        await run_in_threadpool(self.pipeline.status)  # refreshes the gauges
        merged = REGISTRY.merged_with(load_snapshots(self.config.data_path / "run"))
        return PlainTextResponse(merged.render(), media_type="text/plain; version=0.0.4")


def _completeness(meta: dict[str, Any]) -> dict[str, Any]:
    """The completeness fields every query response carries."""
    return {
        "complete_until": iso(meta.get("complete_until_ms")),
        "open_windows": bool(meta.get("open_windows")),
        "revised": bool(meta.get("revised")),
    }


# The limits the service appends to every SQL API query; engine errors
# quote the query with them, and they are ours, not the caller's.
_OWN_SETTINGS = re.compile(r"\s*\bSETTINGS\s+readonly\s*=\s*'?\d+'?(?:\s*,\s*\w+\s*=\s*'[^']*')*")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return _OWN_SETTINGS.sub("", line)[:500]


def _json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; 400 naming ``body`` else."""
    try:
        return msgspec.json.decode(body, type=dict[str, Any])
    except msgspec.MsgspecError as exc:
        try:
            json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, f"body: malformed JSON: {exc}") from exc
        if b"\\u" in body and _LONE_SURROGATE.search(body.decode("utf-8", "replace")):
            raise APIError(
                400,
                "body: a string holds an unpaired UTF-16 surrogate escape (e.g. \\ud800); "
                "strings must be valid Unicode",
            ) from exc
        raise APIError(400, f"body: expected a JSON object: {exc}") from exc


_LONE_SURROGATE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})|(?<![0-9a-fA-F]{4})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def json_endpoint(
    handler: Callable[[Request], Awaitable[Any]],
) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        try:
            result = await handler(request)
        except APIError as exc:
            return JSON({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        except Exception:
            log.exception("request %s %s failed", request.method, request.url.path)
            return JSON({"error": "internal error"}, status_code=500)
        if isinstance(result, Response):
            return result
        try:
            return JSON(result)
        except Exception:
            # An answer that cannot be encoded is still answered in JSON, so
            # the connection to the worker proxy survives it.
            log.exception("encoding the answer of %s %s failed", request.method, request.url.path)
            return JSON({"error": "internal error: the answer could not be encoded"}, status_code=500)

    return run


def _query_layer_routes(api: CoreAPI) -> list[Route]:
    """Metrics API, token admin and OpenAPI routes (strata.query). They come
    before any generic ``/v1/metrics/{name}`` route added later."""
    from strata.query.metrics_api import metrics_routes
    from strata.query.openapi import openapi_routes
    from strata.query.tokens import token_routes

    return [*metrics_routes(api), *token_routes(api), *openapi_routes(api)]


def _live_metric_routes(api: CoreAPI) -> list[Route]:
    """Any configured metric from rollups + live windows (strata.serving.api)."""
    from strata.serving.api import live_metric_routes

    return live_metric_routes(api)


def core_routes(api: CoreAPI) -> list[Route]:
    return [
        Route("/v1/sql", json_endpoint(api.sql), methods=["POST"]),
        *_query_layer_routes(api),
        Route("/v1/metrics/events", json_endpoint(api.events_metric), methods=["GET"]),
        *_live_metric_routes(api),  # /v1/metrics/{name}: after every specific metrics route
        Route("/v1/status", json_endpoint(api.status), methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", api.prometheus, methods=["GET"]),
    ]
