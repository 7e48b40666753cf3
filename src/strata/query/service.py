"""The query service: what ``POST /v1/sql`` and the metrics API share.

One object per API process, held by the ``Pipeline`` (``pipeline.query``):

* the ``Router`` (rollup or raw),
* the result cache (``strata.query.cache``),
* the per-user limits (``strata.query.limits``),
* the ranges revised by late data, so responses can say ``revised``.

Order of work for a request: rate limit -> sandbox -> route -> cache ->
heavy-query slot (raw path only) -> store. A cache hit does not touch the
store. ``on_revised(start_ms, end_ms)`` drops cached results overlapping a
range changed by late data (``Pipeline.on_revised`` calls it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from strata.config import Config, parse_duration_ms
from strata.query import sandbox
from strata.query.cache import ResultCache, fingerprint, open_cache
from strata.query.limits import QueryLimits, open_limits
from strata.query.results import QueryResult
from strata.query.router import Route, Router, TimeRange
from strata.telemetry import REGISTRY

log = logging.getLogger("strata.query")

LIVE_WINDOWS_NOTE = (
    "open windows are answered from the rollups/raw events as loaded so far; "
    "the serving store's live windows are not merged in"
)


def sql_settings(config: Config) -> dict[str, Any]:
    q = config.query
    return {
        "readonly": 2,
        "max_execution_time": q.sql_max_execution_s,
        "max_result_rows": q.sql_max_rows,
        "result_overflow_mode": "throw",
        "max_memory_usage": q.sql_max_memory_bytes,
    }


class QueryService:
    def __init__(
        self,
        config: Config,
        store_getter: Callable[[], Any],
        watermark: Callable[[], int | None],
    ) -> None:
        self.config = config
        self._store = store_getter
        self.watermark = watermark
        self.router = Router(
            [m for m in self._metrics()],
            rollup_5m_ttl_ms=parse_duration_ms(config.store.rollup_5m_ttl),
        )
        redis_url = config.query.redis_url or config.serving.redis_url
        self.cache: ResultCache = open_cache(
            config.query.backend, redis_url=redis_url, max_entries=config.query.cache_max_entries
        )
        self.limits: QueryLimits = open_limits(config.query, redis_url=redis_url)
        self.cache_ttl_ms = parse_duration_ms(config.query.cache_ttl)
        self.open_ttl_ms = parse_duration_ms(config.query.open_range_cache_ttl)
        self._revised: deque[tuple[int, int]] = deque(maxlen=10_000)
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "invalidated": 0}

    def _metrics(self) -> list[Any]:
        from strata.metrics import compile_metrics

        return compile_metrics(self.config.metrics)

    @property
    def store(self) -> Any:
        return self._store()

    # -- late data -------------------------------------------------------------------
    def on_revised(self, start_ms: int, end_ms: int) -> int:
        """Late data changed ``[start_ms, end_ms)``: forget cached answers
        that overlap it and remember the range for ``revised`` flags."""
        with self._lock:
            self._revised.append((start_ms, end_ms))
        removed = self.cache.invalidate(start_ms, end_ms)
        self.stats["invalidated"] += removed
        REGISTRY.inc("strata_query_cache_invalidations_total", removed)
        return removed

    def was_revised(self, time_range: TimeRange) -> bool:
        with self._lock:
            return any(time_range.overlaps(s, e) for s, e in self._revised)

    # -- completeness ------------------------------------------------------------------
    def completeness(self, time_range: TimeRange) -> dict[str, Any]:
        """``complete_until`` (the watermark, epoch ms), ``open_windows`` and
        ``revised`` for answers over ``time_range``."""
        watermark = self.watermark()
        end = time_range.end_ms
        open_windows = watermark is None or end is None or end > watermark
        return {
            "complete_until_ms": watermark,
            "open_windows": open_windows,
            "revised": self.was_revised(time_range),
        }

    def ttl_for(self, completeness: dict[str, Any]) -> int:
        return self.open_ttl_ms if completeness["open_windows"] else self.cache_ttl_ms

    # -- cached execution ---------------------------------------------------------------
    def cached(
        self,
        *,
        user: str,
        kind: str,
        normalized: str,
        time_range: TimeRange,
        compute: Callable[[], QueryResult],
    ) -> QueryResult:
        """The cached answer for (kind, normalized, time_range, user), or
        ``compute()``'s, stored with the TTL its completeness allows."""
        key = fingerprint(normalized, time_range, user, kind)
        payload = self.cache.get(key)
        if payload is not None:
            self.stats["hits"] += 1
            REGISTRY.inc("strata_query_cache_total", 1, {"result": "hit"})
            result = QueryResult.decode(payload)
            result.meta["cache"] = "hit"
            return result
        self.stats["misses"] += 1
        REGISTRY.inc("strata_query_cache_total", 1, {"result": "miss"})
        result = compute()
        completeness = self.completeness(time_range)
        result.meta.update(completeness)
        result.meta["cache"] = "miss"
        self.cache.put(key, result.encode(), self.ttl_for(completeness), time_range)
        return result

    def run(
        self, user: str, sql: str, parameters: dict[str, Any] | None, heavy: bool
    ) -> QueryResult:
        """Run on the store, under a heavy-query slot when ``heavy``."""
        started = time.perf_counter()
        settings = sql_settings(self.config)
        if heavy:
            with self.limits.heavy(user):
                columns, rows = self.store.query_rows(sql, parameters, settings)
        else:
            columns, rows = self.store.query_rows(sql, parameters, settings)
        elapsed = time.perf_counter() - started
        return QueryResult(columns, rows, {"query_ms": round(elapsed * 1000, 3)})

    # -- SQL ---------------------------------------------------------------------------
    def plan(self, text: str) -> tuple[Any, Route]:
        """Sandbox-check and route ``text``; raises sandbox.SQLRejected."""
        tree = sandbox.check(text)
        return tree, self.router.route(tree)

    def sql(self, user: str, text: str) -> QueryResult:
        tree, route = self.plan(text)
        normalized = sandbox.render(tree)

        def compute() -> QueryResult:
            result = self.run(user, route.sql, None, heavy=route.served_from == "raw")
            result.meta.update(
                {"served_from": route.served_from, "reason": route.reason, "metric": route.metric}
            )
            return result

        result = self.cached(
            user=user,
            kind="sql",
            normalized=normalized,
            time_range=route.time_range,
            compute=compute,
        )
        result.meta.setdefault("live_windows", LIVE_WINDOWS_NOTE)
        return result

    def close(self) -> None:
        self.cache.close()
        self.limits.close()
