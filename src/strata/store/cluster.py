"""Cluster DDL: ReplicatedMergeTree tables plus Distributed tables, generated
from the same ``.sql`` sources as the single-node DDL (``strata.store.ddl``).

For every table ``t`` of the single-node DDL the cluster gets:

* ``t_local`` on every node (``ON CLUSTER``), with the engine made replicated
  (``MergeTree`` -> ``ReplicatedMergeTree('/clickhouse/tables/{shard}/<db>/t_local',
  '{replica}')``, same for ``AggregatingMergeTree``) and
  ``non_replicated_deduplication_window`` turned into
  ``replicated_deduplication_window``, so insert dedup tokens keep dropping
  replays (checked through Keeper, per shard);
* ``t`` as a ``Distributed`` table over ``t_local``, so every query strata
  sends stays the same. Tables loaded from the log are sharded by their
  ``_partition`` column (one log partition, one shard); others by ``rand()``.

Materialized views are created on every node from ``events_local`` into the
local rollup tables; a rollup's states from several shards merge at query
time through its Distributed table (``-Merge`` functions).

Not generated, and why: writes. The loader must insert a log partition's
batches into the local tables of one fixed shard (for example
``partition % shards``), never through the Distributed table, so that a
replayed batch meets its own dedup token again. That routing is not
implemented; see docs/deploy.md. This module is not exercised against a
real cluster here (no modern ClickHouse server is available).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from strata.metrics import Metric
from strata.store import ddl

_CREATE_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS (\w+)", re.M)
_CREATE_VIEW = re.compile(r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+) TO (\w+)", re.M)
_ENGINE = re.compile(r"ENGINE = (\w*MergeTree)\b(?:\(\))?")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check(name: str, value: str) -> str:
    if not _IDENTIFIER.match(value):
        raise ValueError(f"{name}: expected an identifier, got {value!r}")
    return value


def cluster_statements(
    metrics: Sequence[Metric],
    *,
    cluster: str,
    database: str,
    raw_ttl_seconds: int,
    rollup_5m_ttl_seconds: int,
) -> list[str]:
    """The cluster DDL, in execution order (see the module docstring)."""
    cluster = _check("store.cluster", cluster)
    database = _check("store.database", database)
    single = ddl.all_statements(
        metrics, raw_ttl_seconds=raw_ttl_seconds, rollup_5m_ttl_seconds=rollup_5m_ttl_seconds
    )
    tables = [m.group(1) for s in single if (m := _CREATE_TABLE.match(s))]
    out: list[str] = []
    for statement in single:
        table = _CREATE_TABLE.match(statement)
        if table is not None:
            name = table.group(1)
            local = f"{name}_local"
            # `CREATE TABLE t AS other` copies the columns of the local table.
            for source in tables:
                statement = re.sub(rf"\bAS {source}\b", f"AS {source}_local", statement)
            engine = (
                r"ENGINE = Replicated\1"
                f"('/clickhouse/tables/{{shard}}/{database}/{local}', '{{replica}}')"
            )
            replicated = _ENGINE.sub(engine, statement, count=1)
            if replicated == statement:
                raise ValueError(f"cluster DDL: no MergeTree engine found for table {name}")
            replicated = replicated.replace(
                "non_replicated_deduplication_window", "replicated_deduplication_window"
            )
            out.append(
                replicated.replace(
                    f"CREATE TABLE IF NOT EXISTS {name}",
                    f"CREATE TABLE IF NOT EXISTS {local} ON CLUSTER '{cluster}'",
                    1,
                )
            )
            # Tables fed from the log shard by log partition: one partition's
            # rows always live on one shard, next to their dedup history.
            sharding = "_partition" if re.search(r"^\s*_partition\s", statement, re.M) else "rand()"
            out.append(
                f"CREATE TABLE IF NOT EXISTS {name} ON CLUSTER '{cluster}' AS {local}\n"
                f"ENGINE = Distributed('{cluster}', '{database}', '{local}', {sharding})"
            )
            continue
        view = _CREATE_VIEW.match(statement)
        if view is not None:
            local_view = statement.replace(
                view.group(0),
                f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view.group(1)} "
                f"ON CLUSTER '{cluster}' TO {view.group(2)}_local",
                1,
            )
            # Views read the local source table on each node.
            for source in tables:
                local_view = re.sub(rf"\bFROM {source}\b", f"FROM {source}_local", local_view)
                local_view = re.sub(rf"\b{source}\.", f"{source}_local.", local_view)
            out.append(local_view)
            continue
        raise ValueError(f"cluster DDL: unsupported statement: {statement[:80]}")
    return out
