"""Client construction: the only place where chDB and a ClickHouse server
differ. Everything else in strata.store runs the same SQL through the same
clickhouse-connect client API."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import clickhouse_connect


def chdb_server_settings(
    *, cache_bytes: int, max_memory_bytes: int = 0, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """chDB's engine startup options (ClickHouse server settings) for
    ``store.chdb_*``: each of the mark, index-mark and primary index caches
    bounded by ``cache_bytes`` (ClickHouse's default is 5 GiB each, sized for
    a dedicated server, not a process that shares the machine with strata),
    the engine's memory limit if ``max_memory_bytes`` > 0, then ``extra``."""
    out = {
        "mark_cache_size": str(int(cache_bytes)),
        "index_mark_cache_size": str(int(cache_bytes)),
        "primary_index_cache_size": str(int(cache_bytes)),
    }
    if max_memory_bytes > 0:
        out["max_server_memory_usage"] = str(int(max_memory_bytes))
    out.update({str(k): str(v) for k, v in (extra or {}).items()})
    return out


def connect(
    backend: str,
    *,
    data_path: Path,
    url: str = "",
    database: str = "strata",
    chdb_settings: Mapping[str, str] | None = None,
) -> Any:
    """A clickhouse-connect client for chDB in ``data_path/store`` (embedded)
    or for the server at ``url`` (distributed). ``chdb_settings`` are server
    settings for the chDB engine (``chdb_server_settings``); chDB applies the
    ones of the first client of the process, so every client of one process
    should pass the same."""
    if backend == "chdb":
        store_path = data_path / "store"
        store_path.mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(
            dsn=f"chdb://{store_path}", chdb_options=dict(chdb_settings or {})
        )
    if backend == "clickhouse":
        if not url:
            raise ValueError("store.url: required when store.backend = 'clickhouse'")
        admin = clickhouse_connect.get_client(dsn=url)
        admin.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        return clickhouse_connect.get_client(dsn=url, database=database)
    raise ValueError(f"store.backend: unknown backend {backend!r}")
