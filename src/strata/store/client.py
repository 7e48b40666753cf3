"""Client construction: the only place where chDB and a ClickHouse server
differ. Everything else in strata.store runs the same SQL through the same
clickhouse-connect client API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    create_database: bool = True,
) -> Any:
    """A clickhouse-connect client for chDB in ``data_path/store`` (embedded)
    or for the server at ``url`` (distributed). ``chdb_settings`` are server
    settings for the chDB engine (``chdb_server_settings``); chDB applies the
    ones of the first client of the process, so every client of one process
    should pass the same. Each call opens a client of its own (for chDB its
    own connection handle to the process's one engine; such handles run
    queries concurrently). ``create_database=False`` skips the server's
    ``CREATE DATABASE`` (a further client of a store already open)."""
    if backend == "chdb":
        store_path = data_path / "store"
        store_path.mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(
            dsn=f"chdb://{store_path}", chdb_options=dict(chdb_settings or {})
        )
    if backend == "clickhouse":
        if not url:
            raise ValueError("store.url: required when store.backend = 'clickhouse'")
        if create_database:
            admin = clickhouse_connect.get_client(dsn=url)
            try:
                admin.command(f"CREATE DATABASE IF NOT EXISTS {database}")
            finally:
                admin.close()
        return clickhouse_connect.get_client(dsn=url, database=database)
    raise ValueError(f"store.backend: unknown backend {backend!r}")



def reads_arrow_in_place(client: Any) -> bool:
    """Whether ``client`` is chDB's, whose engine can read a Python Arrow
    table in place (``insert_arrow_in_process``)."""
    backend = getattr(client, "_backend", None)
    return type(backend).__name__ == "ChdbBackend" and hasattr(backend, "_run")


def insert_arrow_in_process(
    client: Any,
    table: str,
    data: Any,
    settings: Mapping[str, Any],
    *,
    select: tuple[Sequence[str], str] | None = None,
) -> None:
    """Insert the Arrow table ``data`` into ``table`` as one INSERT with the
    query ``settings``, with the same semantics as ``client.insert_arrow``
    (columns by name, insert deduplication by ``insert_deduplication_token``).

    On chDB the engine reads ``data``'s Arrow buffers in place through its
    ``Python()`` table function (``INSERT ... SELECT ... FROM Python(...)``),
    in the engine's own threads; clickhouse-connect's ``insert_arrow`` for
    chDB serializes the table to an Arrow stream in Python, writes it to a
    temporary file and has the engine read that back (measured: most of the
    loader's insert CPU, docs/benchmarks.md). On a ClickHouse server this is
    ``client.insert_arrow``.

    ``select`` = (columns, SELECT with a ``{source}`` placeholder) inserts
    the SELECT's rows over ``data`` into those columns instead of ``data``'s
    columns as they are; chDB only (``reads_arrow_in_place``), else
    ValueError. The SELECT is trusted SQL: callers build it from validated
    identifiers only. Raises what the client raises."""
    if not reads_arrow_in_place(client):
        if select is not None:
            raise ValueError("insert with a SELECT over Arrow data needs chDB")
        client.insert_arrow(table, data, settings=dict(settings))
        return
    from clickhouse_connect.driver._backend.chdb_backend import _settings_clause
    from clickhouse_connect.driver.binding import quote_identifier

    names, query = select if select is not None else (data.column_names, "")
    columns = ", ".join(quote_identifier(name) for name in names)
    # Python() resolves this name in the calling frames: keep it unlikely to
    # collide with any other variable of the process.
    strata_insert_rows = data  # noqa: F841
    source = "Python(strata_insert_rows)"
    query = query.format(source=source) if query else f"SELECT {columns} FROM {source}"
    values = {name: str(value) for name, value in settings.items()}
    clause = f" SETTINGS {_settings_clause(values)}" if values else ""
    client._backend._run(
        f"INSERT INTO {quote_identifier(table)} ({columns}) {query}{clause}",
        "TabSeparated",
        database=client.database,
    )
