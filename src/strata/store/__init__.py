"""The OLAP store: chDB in the data directory (embedded) or a ClickHouse
server (distributed), one class, one SQL dialect.

Contract:

* ``insert_arrow(table, data, dedup_token)`` is idempotent per token: a
  repeated token is dropped by ClickHouse insert deduplication, in the table
  and in every materialized-view rollup that depends on it (all of them carry
  ``non_replicated_deduplication_window``). Tokens are derived by callers
  from log partition/offset ranges, so replays are dropped.
* Queries bind parameters (``{name:Type}``); values are never formatted in.
* Thread-safe: the loader, the batch job and the query API share one Store.
* Heavy lanes (decision 103): ``query_rows_heavy`` runs a long query on one
  of a few extra clients of the same store, so it does not hold the main
  client (and its lock) that the loaders' inserts, rollup reads and DDL use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from strata.config import Config, parse_duration_ms
from strata.metrics import Metric, compile_metrics
from strata.store import ddl
from strata.store.client import chdb_server_settings, connect


class StoreError(Exception):
    """A store operation failed."""


class HeavyLanesBusy(StoreError):
    """Every heavy lane stayed busy for the whole wait (``query_rows_heavy``)."""

    def __init__(self, lanes: int, wait_s: float) -> None:
        super().__init__(
            f"all {lanes} heavy-query lanes of the store stayed busy for {wait_s:g} s"
        )
        self.lanes = lanes
        self.wait_s = wait_s


class _Lane:
    """One extra client; held by one thread at a time (taken from the free list)."""

    __slots__ = ("client", "queries")

    def __init__(self) -> None:
        self.client: Any = None  # opened on first use
        self.queries = 0


class Store:
    def __init__(
        self,
        client: Any,
        metrics: Sequence[Metric],
        *,
        heavy_lanes: int = 0,
        lane_factory: Callable[[], Any] | None = None,
    ) -> None:
        """``heavy_lanes`` extra clients from ``lane_factory()`` (same store,
        opened lazily) serve ``query_rows_heavy``; 0 or no factory: heavy
        queries run on ``client``."""
        self.client = client
        self.metrics = list(metrics)
        self.metrics_by_name = {m.name: m for m in self.metrics}
        # clickhouse-connect serializes the calls on one client (for chDB,
        # on its connection handle), so writes and reads of the main client
        # take turns. Long queries go to the heavy lanes instead.
        self._lock = threading.RLock()
        self._lane_factory = lane_factory if heavy_lanes > 0 else None
        self._lanes = [_Lane() for _ in range(heavy_lanes if lane_factory else 0)]
        self._free = list(self._lanes)
        self._lanes_changed = threading.Condition(threading.Lock())
        self._closed = False
        self.lanes_opened = 0  # clients opened for lanes, ever (reuse shows as no growth)

    @classmethod
    def open(cls, config: Config) -> Store:
        def open_client(create_database: bool = True) -> Any:
            # Every client of the process: same path (or DSN and database)
            # and the same chDB engine options.
            return connect(
                config.store.backend,
                data_path=config.data_path,
                url=config.store.url,
                database=config.store.database,
                chdb_settings=chdb_server_settings(
                    cache_bytes=config.store.chdb_cache_bytes,
                    max_memory_bytes=config.store.chdb_max_memory_bytes,
                    extra=config.store.chdb_settings,
                ),
                create_database=create_database,
            )

        store = cls(
            open_client(),
            compile_metrics(config.metrics),
            heavy_lanes=config.query.heavy_lanes,
            lane_factory=lambda: open_client(create_database=False),
        )
        store.migrate(
            raw_ttl_seconds=parse_duration_ms(config.store.raw_ttl) // 1000,
            rollup_5m_ttl_seconds=parse_duration_ms(config.store.rollup_5m_ttl) // 1000,
        )
        return store

    def migrate(self, *, raw_ttl_seconds: int, rollup_5m_ttl_seconds: int) -> None:
        """Create every table and view that is missing. Idempotent."""
        for statement in ddl.all_statements(
            self.metrics,
            raw_ttl_seconds=raw_ttl_seconds,
            rollup_5m_ttl_seconds=rollup_5m_ttl_seconds,
        ):
            self.command(statement)

    def insert_arrow(
        self,
        table: str,
        data: pa.Table,
        dedup_token: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Insert ``data`` as one insert; ``settings`` are extra query settings."""
        settings = dict(settings or {})
        if dedup_token is not None:
            settings.update({
                "insert_deduplication_token": dedup_token,
                "deduplicate_blocks_in_dependent_materialized_views": 1,
            })
        with self._lock:
            try:
                self.client.insert_arrow(table, data, settings=settings)
            except Exception as exc:
                raise StoreError(f"insert into {table} failed: {exc}") from exc

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            return self.client.command(sql, parameters=parameters)

    def query_arrow(
        self,
        sql: str,
        parameters: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> pa.Table:
        with self._lock:
            return self.client.query_arrow(sql, parameters=parameters, settings=settings)

    def query_rows(
        self,
        sql: str,
        parameters: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        with self._lock:
            result = self.client.query(sql, parameters=parameters, settings=settings)
        return _columns_and_rows(result)

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        _, rows = self.query_rows(sql, parameters)
        return rows[0][0] if rows else None

    # -- heavy lanes (decision 103) ---------------------------------------------------
    @property
    def heavy_lanes(self) -> int:
        return len(self._lanes)

    def query_rows_heavy(
        self,
        sql: str,
        parameters: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        wait_s: float = 0.0,
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """``query_rows`` on a free heavy lane, waiting up to ``wait_s`` for
        one; raises HeavyLanesBusy when none frees in time. Without lanes
        this is ``query_rows`` (on the main client, under its lock)."""
        if not self._lanes:
            return self.query_rows(sql, parameters, settings)
        lane = self._take_lane(wait_s)
        try:
            if lane.client is None:
                try:
                    lane.client = self._lane_factory()  # type: ignore[misc]
                except Exception as exc:
                    raise StoreError(f"opening a heavy-query lane failed: {exc}") from exc
                with self._lanes_changed:
                    self.lanes_opened += 1
            lane.queries += 1
            # An error (timeout, killed, bad SQL) leaves the client usable:
            # clickhouse-connect closes the result stream before raising.
            result = lane.client.query(sql, parameters=parameters, settings=settings)
            return _columns_and_rows(result)
        finally:
            self._give_back(lane)

    def lanes_status(self) -> dict[str, int]:
        with self._lanes_changed:
            return {
                "lanes": len(self._lanes),
                "busy": len(self._lanes) - len(self._free),
                "opened": self.lanes_opened,
                "queries": sum(lane.queries for lane in self._lanes),
            }

    def _take_lane(self, wait_s: float) -> _Lane:
        with self._lanes_changed:
            if not self._lanes_changed.wait_for(
                lambda: self._free or self._closed, timeout=max(0.0, wait_s)
            ):
                raise HeavyLanesBusy(len(self._lanes), wait_s)
            if self._closed:
                raise StoreError("the store is closed")
            return self._free.pop()

    def _give_back(self, lane: _Lane) -> None:
        with self._lanes_changed:
            closed = self._closed
            if not closed:
                self._free.append(lane)
                self._lanes_changed.notify()
        if closed:  # close() left this lane to its holder
            self._close_client(lane)

    @staticmethod
    def _close_client(lane: _Lane) -> None:
        client, lane.client = lane.client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing must not mask the real error
                pass

    def close(self) -> None:
        """Close the main client and every idle lane; a lane still running a
        query is closed by its holder when the query returns."""
        with self._lanes_changed:
            self._closed = True
            idle, self._free = self._free, []
            self._lanes_changed.notify_all()
        for lane in idle:
            self._close_client(lane)
        with self._lock:
            try:
                self.client.close()
            except Exception:  # closing a half-open client must not mask the real error
                pass


def _columns_and_rows(result: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    """A clickhouse-connect query result as (column names, row tuples)."""
    return list(result.column_names), [tuple(row) for row in result.result_rows]
