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
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from strata.config import Config, parse_duration_ms
from strata.metrics import Metric, compile_metrics
from strata.store import ddl
from strata.store.client import chdb_server_settings, connect


class StoreError(Exception):
    """A store operation failed."""


class Store:
    def __init__(self, client: Any, metrics: Sequence[Metric]) -> None:
        self.client = client
        self.metrics = list(metrics)
        self.metrics_by_name = {m.name: m for m in self.metrics}
        # chDB runs queries of one process on one engine; clickhouse-connect's
        # chDB client is not documented as thread-safe, so writes and reads
        # take turns. Queries are short; the loader inserts large batches.
        self._lock = threading.RLock()

    @classmethod
    def open(cls, config: Config) -> Store:
        client = connect(
            config.store.backend,
            data_path=config.data_path,
            url=config.store.url,
            database=config.store.database,
            chdb_settings=chdb_server_settings(
                cache_bytes=config.store.chdb_cache_bytes,
                max_memory_bytes=config.store.chdb_max_memory_bytes,
                extra=config.store.chdb_settings,
            ),
        )
        store = cls(client, compile_metrics(config.metrics))
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
        return list(result.column_names), [tuple(row) for row in result.result_rows]

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        _, rows = self.query_rows(sql, parameters)
        return rows[0][0] if rows else None

    def close(self) -> None:
        with self._lock:
            try:
                self.client.close()
            except Exception:  # closing a half-open client must not mask the real error
                pass
