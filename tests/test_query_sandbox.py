"""The SQL endpoint's sandbox and a fuzz test that never finds a 5xx.

Runs the real components: a Pipeline with a chDB Store in a tmp dir and
the core routes (sandbox -> router -> cache -> limits -> store)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.testclient import TestClient
from tests.fixtures_query import DAY_MS, base_day_ms, load, make_rows

from strata.config import load_config
from strata.query.api import CoreAPI, core_routes
from strata.server.pipeline import Pipeline

TOKEN = "qt_sandbox_test"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Pipeline]]:
    config = load_config(
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("sandbox")),
            "auth.query_tokens": [TOKEN],
            # The fuzzer sends thousands of queries; limits are tested elsewhere.
            "query.rate_limit_burst": 1_000_000,
            "query.rate_limit_per_minute": 1_000_000,
        }
    )
    pipeline = Pipeline.open(config)
    load(pipeline.store, make_rows(500, start_ms=base_day_ms(3), span_ms=2 * DAY_MS), "sb-1")
    app = Starlette(routes=core_routes(CoreAPI(pipeline)))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client, pipeline
    pipeline.stop()


def _post(client: TestClient, body: Any, **headers: str) -> Any:
    return client.post(
        "/v1/sql", json=body, headers={"Authorization": f"Bearer {TOKEN}", **headers}
    )


REJECTED = [
    # writes and DDL
    "INSERT INTO events (event_id) VALUES ('x')",
    "INSERT INTO events SELECT * FROM events",
    "ALTER TABLE events DELETE WHERE 1",
    "DELETE FROM events WHERE 1",
    "UPDATE events SET country = 'x' WHERE 1",
    "DROP TABLE events",
    "TRUNCATE TABLE events",
    "CREATE TABLE x (a Int8) ENGINE = Memory",
    "OPTIMIZE TABLE events FINAL",
    "RENAME TABLE events TO e2",
    "ATTACH TABLE x",
    "SYSTEM DROP DNS CACHE",
    "GRANT ALL ON *.* TO default",
    "KILL QUERY WHERE 1",
    # table functions and outside reach
    "SELECT * FROM file('/etc/passwd', 'LineAsString')",
    "SELECT * FROM url('http://127.0.0.1/', 'CSV', 'a String')",
    "SELECT * FROM s3('http://x/y', 'Parquet')",
    "SELECT * FROM remote('127.0.0.1', 'system', 'one')",
    "SELECT * FROM numbers(10)",
    "SELECT * FROM Python(x)",
    "SELECT * FROM mysql('h:3306', 'db', 't', 'u', 'p')",
    "SELECT * FROM executable('ls', 'TSV', 'a String')",
    "SELECT sleep(3)",
    "SELECT count() FROM events WHERE dictGet('d', 'a', 1) = 1",
    "SELECT * FROM events AS e JOIN file('x') AS f ON 1",
    # system tables and other databases
    "SELECT * FROM system.tables",
    "SELECT * FROM system.one",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM default.events",
    "SELECT * FROM events WHERE event_id IN (SELECT name FROM system.users)",
    "WITH t AS (SELECT * FROM system.processes) SELECT * FROM t",
    "SELECT * FROM secrets",
    # settings
    "SET readonly = 0",
    "SELECT 1 SETTINGS readonly = 0",
    "SELECT count() FROM events SETTINGS max_execution_time = 1000000",
    "SELECT getSetting('readonly')",
    "SELECT 1 FORMAT JSON",
    "SELECT 1 INTO OUTFILE '/tmp/x'",
    # multi-statement
    "SELECT 1; SELECT 2",
    "SELECT 1; DROP TABLE events",
    "SELECT 1;;DROP TABLE events",
    # comment and unicode tricks
    "SELECT 1 /* ; */ ; DROP TABLE events",
    "SELECT 1 -- \n; DROP TABLE events",
    "SELECT 1\u200b; DROP TABLE events",
    "SELECT * FROM system\u2024tables",
    "SELECT * FROM ｓｙｓｔｅｍ.tables",
    "SELECT\u00a0*\u00a0FROM\u00a0system.tables",
    "SELECT * FROM events\u202e; DROP TABLE events",
    "SELECT 1\u0000; DROP TABLE events",
    "",
    "   ",
]


@pytest.mark.parametrize("sql", REJECTED)
def test_sandbox_rejects(client: tuple[TestClient, Pipeline], sql: str) -> None:
    test_client, pipeline = client
    response = _post(test_client, {"sql": sql})
    assert response.status_code == 400, (sql, response.text)
    assert response.json()["error"].startswith("sql:")
    # Nothing was written or dropped.
    assert pipeline.store.scalar("SELECT count() FROM events") == 500


def test_allowed_queries_run(client: tuple[TestClient, Pipeline]) -> None:
    test_client, _ = client
    for sql in (
        "SELECT count() FROM events",
        "WITH t AS (SELECT country FROM events) SELECT count() FROM t",
        "SELECT 1 UNION ALL SELECT 2",
        "SELECT count() FROM rollup_page_views_by_country_5m",
        "SELECT * FROM events LIMIT 1 -- trailing comment",
        # Comments are dropped before anything runs: what is hidden in them
        # never reaches the engine.
        "/*! DROP TABLE events */ SELECT 1",
        "SELECT 1 /* ; DROP TABLE events */",
    ):
        response = _post(test_client, {"sql": sql})
        assert response.status_code == 200, (sql, response.text)
    assert client[1].store.scalar("SELECT count() FROM events") == 500


def test_bad_bodies_are_4xx(client: tuple[TestClient, Pipeline]) -> None:
    test_client, _ = client
    for body in ({}, {"sql": 1}, {"sql": "SELECT 1", "explain": "yes"}, [1, 2]):
        assert _post(test_client, body).status_code == 400
    raw = test_client.post(
        "/v1/sql", content=b"{not json", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert raw.status_code == 400


_WORDS = st.sampled_from(
    [
        "SELECT",
        "FROM",
        "events",
        "WHERE",
        "GROUP BY",
        "ORDER BY",
        "LIMIT",
        "count()",
        "uniq(",
        "sum(revenue)",
        "ts",
        ">=",
        "<",
        "'2026-01-01 00:00:00'",
        "toStartOfHour(ts)",
        "country",
        "AND",
        "OR",
        "(",
        ")",
        ",",
        ";",
        "--",
        "/*",
        "*/",
        "system.tables",
        "file(",
        "SETTINGS",
        "1",
        "'",
        '"',
        "`",
        "\\",
        "INTERVAL 5 MINUTE",
        "now()",
        "rollup_active_users_1d",
        "countMerge(events)",
        "window_start",
        "UNION ALL",
        "WITH",
        "AS",
        "x",
        "*",
        "NULL",
        "\u200b",
        "ｓｅｌｅｃｔ",
        "JOIN",
        "ARRAY JOIN",
        "arrayJoin([1,2])",
        "FORMAT",
        "INTO",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    sql=st.one_of(
        st.lists(_WORDS, min_size=1, max_size=14).map(" ".join),
        st.text(max_size=200),
    ),
    explain=st.booleans(),
    accept=st.sampled_from(
        ["", "text/csv", "application/vnd.apache.arrow.stream", "*/*", "x/y", "text/csv;q=0"]
    ),
)
def test_fuzz_sql_endpoint_never_5xx(
    client: tuple[TestClient, Pipeline], sql: str, explain: bool, accept: str
) -> None:
    test_client, _ = client
    headers = {"accept": accept} if accept else {}
    response = _post(test_client, {"sql": sql, "explain": explain}, **headers)
    assert response.status_code < 500, (sql, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert "error" in response.json()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=30),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_fuzz_json_bodies_never_5xx(client: tuple[TestClient, Pipeline], body: Any) -> None:
    test_client, _ = client
    assert _post(test_client, body).status_code < 500
    funnel = test_client.post(
        "/v1/metrics/funnel", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert funnel.status_code < 500, (body, funnel.text[:300])
