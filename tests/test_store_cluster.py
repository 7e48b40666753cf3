"""Cluster DDL (ReplicatedMergeTree + Distributed) from the single-node sources.

No ClickHouse cluster runs here, so the generated DDL is checked for shape,
and its local half is executed in chDB with replication turned back off (the
only difference a single node can show): the local tables and the rewired
materialized views must work, so rows inserted into ``events_local`` reach
every ``rollup_*_local`` table.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from strata.config import default_metrics
from strata.metrics import compile_metrics
from strata.store import ddl
from strata.store.cluster import cluster_statements

METRICS = compile_metrics(default_metrics())


def generate() -> list[str]:
    return cluster_statements(
        METRICS,
        cluster="analytics",
        database="strata",
        raw_ttl_seconds=86_400 * 90,
        rollup_5m_ttl_seconds=86_400 * 35,
    )


def test_every_table_gets_a_replicated_local_table_and_a_distributed_table() -> None:
    single = ddl.all_statements(METRICS, raw_ttl_seconds=1, rollup_5m_ttl_seconds=1)
    tables = [m.group(1) for s in single if (m := re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", s))]
    statements = generate()
    text = "\n".join(statements)
    assert "non_replicated_deduplication_window" not in text
    for table in tables:
        local = next(
            s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS {table}_local ")
        )
        assert "ON CLUSTER 'analytics'" in local
        assert re.search(
            rf"ENGINE = Replicated\w*MergeTree\('/clickhouse/tables/{{shard}}/strata/{table}_local', '{{replica}}'\)",
            local,
        ), local
        distributed = next(
            s for s in statements if s.startswith(f"CREATE TABLE IF NOT EXISTS {table} ON")
        )
        assert f"Distributed('analytics', 'strata', '{table}_local'" in distributed
    views = [s for s in statements if s.startswith("CREATE MATERIALIZED VIEW")]
    assert len(views) == 2 * len(METRICS)
    for view in views:
        assert re.search(r"TO rollup_\w+_local\b", view)
        assert "FROM events_local" in view and not re.search(r"\bevents\.", view)


def test_identifiers_are_validated() -> None:
    with pytest.raises(ValueError):
        cluster_statements(
            METRICS,
            cluster="x'; DROP",
            database="strata",
            raw_ttl_seconds=1,
            rollup_5m_ttl_seconds=1,
        )


def test_local_half_runs_in_chdb_and_views_feed_local_rollups(tmp_path: Path) -> None:
    local = [s for s in generate() if "ENGINE = Distributed" not in s]
    # Replication off again: what one node without Keeper can execute.
    runnable = [
        re.sub(r"Replicated(\w*MergeTree)\('[^']*', '[^']*'\)", r"\1", s)
        .replace(" ON CLUSTER 'analytics'", "")
        .replace("replicated_deduplication_window", "non_replicated_deduplication_window")
        for s in local
    ]
    script = textwrap.dedent(
        """
        import json, sys, clickhouse_connect
        client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
        for statement in json.loads(sys.stdin.read()):
            client.command(statement)
        client.command(
            "INSERT INTO events_local (event_id, event_type, user_id, distinct_id, ts, country, "
            "revenue, currency) VALUES ('e1', 'page_view', 'u1', 'u1', now64(3), 'DE', 0, ''), "
            "('e2', 'purchase', 'u2', 'u2', now64(3), 'FR', 12.5, 'EUR')"
        )
        print(json.dumps({
            "views": client.command("SELECT countMerge(views) FROM rollup_page_views_by_country_5m_local"),
            "types": client.command("SELECT countMerge(events) FROM rollup_events_by_type_1d_local"),
            "revenue": float(client.command("SELECT sumMerge(revenue) FROM rollup_revenue_by_country_1d_local")),
        }))
        """
    )
    import json

    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "chdb")],
        input=json.dumps(runnable),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "views": 1,
        "types": 2,
        "revenue": 12.5,
    }
