"""Client construction: the only place where chDB and a ClickHouse server
differ. Everything else in strata.store runs the same SQL through the same
clickhouse-connect client API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import clickhouse_connect


def connect(backend: str, *, data_path: Path, url: str = "", database: str = "strata") -> Any:
    """A clickhouse-connect client for chDB in ``data_path/store`` (embedded)
    or for the server at ``url`` (distributed)."""
    if backend == "chdb":
        store_path = data_path / "store"
        store_path.mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(dsn=f"chdb://{store_path}")
    if backend == "clickhouse":
        if not url:
            raise ValueError("store.url: required when store.backend = 'clickhouse'")
        admin = clickhouse_connect.get_client(dsn=url)
        admin.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        return clickhouse_connect.get_client(dsn=url, database=database)
    raise ValueError(f"store.backend: unknown backend {backend!r}")
