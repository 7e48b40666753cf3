"""SQL and metrics API hardening from audit 5 (bugs 4, 5, 6, 10, 11), against
a real Pipeline/Store (chDB in tmp) and, for the Redis namespaces, a real
redis-server:

* ``query.sql_max_rows`` holds for one-block answers too (the engine checks
  ``max_result_rows`` per block): the routed SQL is cut after the limit + 1
  rows and the answer is a 400;
* every column type the engine returns is answered in JSON, CSV and Arrow
  (IP addresses, UInt64 above 2^63, 128-bit integers, arrays of them);
* funnel windows are bounded and whole;
* the result cache and rate limits live under ``serving.redis_prefix``;
* 4xx wording: required fields, 405 with Allow, no parser or SETTINGS
  internals, ``WWW-Authenticate`` on 401.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient
from tests.fixtures_query import DAY_MS, base_day_ms, load, make_rows

from strata.config import load_config
from strata.query.api import CoreAPI, core_routes, json_endpoint
from strata.query.limits import RateLimitExceeded
from strata.query.sandbox import SQLRejected
from strata.query.service import QueryService, cap_rows
from strata.server.pipeline import Pipeline

MAX_ROWS = 50
ARROW = "application/vnd.apache.arrow.stream"


class Env:
    def __init__(self, pipeline: Pipeline, client: TestClient, token: str, base: int) -> None:
        self.pipeline = pipeline
        self.client = client
        self.token = token
        self.base = base

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}

    def sql(self, text: str, accept: str = "application/json") -> Any:
        return self.client.post("/v1/sql", json={"sql": text}, headers=self.headers(Accept=accept))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    config = load_config(
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("sql_hardening")),
            "query.sql_max_rows": MAX_ROWS,
            "query.open_range_cache_ttl": "600s",
            "query.rate_limit_burst": 10_000,
        }
    )
    pipeline = Pipeline.open(config)
    token = pipeline.keyring.create_token("alice", ["metrics", "sql"])
    base = base_day_ms(6)
    load(pipeline.store, make_rows(600, start_ms=base, span_ms=3 * DAY_MS, users=40, seed=5), "h-1")
    app = Starlette(routes=core_routes(CoreAPI(pipeline)))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Env(pipeline, client, token, base)
    pipeline.stop()


# -- bug 4: query.sql_max_rows ------------------------------------------------------------
def test_cap_rows_keeps_offset_and_smaller_limits() -> None:
    assert cap_rows("SELECT x FROM events", 51) == "SELECT x FROM events LIMIT 51"
    assert cap_rows("SELECT x FROM events LIMIT 10", 51) == "SELECT x FROM events LIMIT 10"
    assert cap_rows("SELECT x FROM events LIMIT 500", 51) == "SELECT x FROM events LIMIT 51"
    assert cap_rows("SELECT x FROM events LIMIT 5, 500", 51) == (
        "SELECT x FROM events LIMIT 51 OFFSET 5"
    )
    assert cap_rows("SELECT x FROM events OFFSET 3", 51) == "SELECT x FROM events LIMIT 51 OFFSET 3"
    # A UNION's trailing LIMIT belongs to its last SELECT in ClickHouse: wrap.
    assert cap_rows("SELECT 1 UNION ALL SELECT 2 LIMIT 1", 51) == (
        "SELECT * FROM (SELECT 1 UNION ALL SELECT 2 LIMIT 1) LIMIT 51"
    )
    assert cap_rows("SELECT x FROM events LIMIT 5 BY x", 51) == (
        "SELECT * FROM (SELECT x FROM events LIMIT 5 BY x) LIMIT 51"
    )


def test_one_block_answer_above_sql_max_rows_is_a_400(env: Env) -> None:
    text = "SELECT arrayJoin(range(3000000)) AS x"
    route, _ = env.pipeline.query._planned(text)
    assert route.sql.endswith(f"LIMIT {MAX_ROWS + 1}"), route.sql  # the engine stops early
    for accept in ("application/json", "text/csv", ARROW):
        response = env.sql(text, accept)
        assert response.status_code == 400, response.text
        assert response.json()["error"] == (
            f"sql: the result has more than {MAX_ROWS} rows (query.sql_max_rows); "
            "add a LIMIT or aggregate"
        )
    over = env.sql(f"SELECT arrayJoin(range({MAX_ROWS + 1})) AS x")
    assert over.status_code == 400 and "query.sql_max_rows" in over.json()["error"]
    # A UNION of many blocks (the engine's own check) says the same.
    union = env.sql("SELECT arrayJoin(range(3)) AS x UNION ALL SELECT arrayJoin(range(3000))")
    assert union.status_code == 400 and "query.sql_max_rows" in union.json()["error"]
    # The next query on the engine is answered normally (chDB must not hand
    # it the rest of the stopped stream).
    after = env.sql("SELECT 7 AS a, 'x' AS b")
    assert after.status_code == 200, after.text
    assert after.json()["rows"] == [[7, "x"]]


def test_answers_within_sql_max_rows_are_unchanged(env: Env) -> None:
    exact = env.sql(f"SELECT arrayJoin(range({MAX_ROWS})) AS x")
    assert exact.status_code == 200, exact.text
    assert exact.json()["rows"] == [[i] for i in range(MAX_ROWS)]
    paged = env.sql(f"SELECT arrayJoin(range(3000)) AS x LIMIT {MAX_ROWS} OFFSET 7")
    assert paged.status_code == 200, paged.text
    assert paged.json()["rows"] == [[i] for i in range(7, 7 + MAX_ROWS)]
    too_big_page = env.sql("SELECT arrayJoin(range(3000)) AS x LIMIT 100 OFFSET 7")
    assert too_big_page.status_code == 400
    # A wrapped UNION whose columns share a name still runs.
    union = env.sql("SELECT 1, 1 UNION ALL SELECT 2, 2")
    assert union.status_code == 200, union.text
    assert sorted(union.json()["rows"]) == [[1, 1], [2, 2]]
    # Capped queries are still cached.
    text = "SELECT count() AS n FROM events WHERE ts >= '2020-01-01 00:00:00'"
    first, second = env.sql(text), env.sql(text)
    assert first.json()["rows"] == [[600]] and second.json()["rows"] == [[600]]
    assert second.json()["cache"] == "hit"


def test_routed_rollup_answers_match_raw_under_the_cap(env: Env) -> None:
    """A rollup-routed query (whose SQL the cap rewrites) equals its raw form."""
    start = datetime.fromtimestamp(env.base / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    end = datetime.fromtimestamp((env.base + 3 * DAY_MS) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    window = f"ts >= '{start}' AND ts < '{end}'"
    routed = env.sql(
        f"SELECT toStartOfHour(ts) AS h, event_type, count() AS n FROM events WHERE {window} "
        "GROUP BY h, event_type ORDER BY h, event_type LIMIT 40"
    )
    raw = env.sql(
        f"SELECT toStartOfHour(ts) AS h, event_type, countIf(1) AS n FROM events WHERE {window} "
        "GROUP BY h, event_type ORDER BY h, event_type LIMIT 40"
    )
    assert routed.status_code == 200 and raw.status_code == 200, (routed.text, raw.text)
    assert routed.json()["served_from"].startswith("rollup"), routed.json()
    assert raw.json()["served_from"] == "raw"
    assert routed.json()["rows"] == raw.json()["rows"]
    assert len(routed.json()["rows"]) == 40


# -- bug 5: every type answered -----------------------------------------------------------------
TYPES = (
    "SELECT toIPv4('1.2.3.4') AS ip4, toIPv6('::1') AS ip6, "
    "toUInt64(18446744073709551615) AS big, "
    "toUInt128('340282366920938463463374607431768211455') AS huge, "
    "[toIPv4('10.0.0.1')] AS ips, map('k', toIPv4('10.0.0.2')) AS m, "
    "toUUID('00000000-0000-0000-0000-000000000001') AS u, toDecimal64(1.5, 3) AS d"
)


def test_every_type_is_answered_in_json(env: Env) -> None:
    response = env.sql(TYPES)
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == [
        [
            "1.2.3.4",
            "::1",
            18446744073709551615,
            340282366920938463463374607431768211455,
            ["10.0.0.1"],
            {"k": "10.0.0.2"},
            "00000000-0000-0000-0000-000000000001",
            "1.500",
        ]
    ]


def test_every_type_is_answered_in_csv(env: Env) -> None:
    response = env.sql(TYPES, "text/csv")
    assert response.status_code == 200, response.text
    assert response.text.splitlines() == [
        "ip4,ip6,big,huge,ips,m,u,d",
        '1.2.3.4,::1,18446744073709551615,340282366920938463463374607431768211455,'
        '"[""10.0.0.1""]","{""k"":""10.0.0.2""}",00000000-0000-0000-0000-000000000001,1.500',
    ]


def test_every_type_is_answered_in_arrow(env: Env) -> None:
    response = env.sql(TYPES, ARROW)
    assert response.status_code == 200, response.text
    table = pa.ipc.open_stream(io.BytesIO(response.content)).read_all()
    assert table.schema.field("big").type == pa.uint64()
    row = table.to_pylist()[0]
    assert row["big"] == 18446744073709551615
    assert row["huge"] == "340282366920938463463374607431768211455"
    assert row["ip4"] == "1.2.3.4" and row["ip6"] == "::1"
    assert row["ips"] == '["10.0.0.1"]'


def test_an_answer_that_cannot_be_encoded_is_a_json_500() -> None:
    """json_endpoint answers in JSON even when the handler's answer cannot be
    encoded (the worker proxy must see an answer, not a dropped connection)."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text form")

    async def handler(request: Request) -> Any:
        return {"value": Unprintable()}

    app = Starlette(routes=[Route("/x", json_endpoint(handler))])
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/x")
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/json"
        assert "could not be encoded" in response.json()["error"]


# -- bug 6: funnel windows ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "window",
    ["10000000d", 9999999999999999999, 1e300, "999999999999d", 1.5, 3600000.0, "367d", 0, -5,
     "0ms", "9" * 400 + "d", "1.5ms"],
)
def test_funnel_window_out_of_range_or_fractional_is_a_400(env: Env, window: Any) -> None:
    response = env.client.post(
        "/v1/metrics/funnel",
        json={"steps": ["page_view", "signup"], "window": window},
        headers=env.headers(),
    )
    assert response.status_code == 400, (window, response.text)
    assert response.json()["error"].startswith("window:"), response.text


@pytest.mark.parametrize("window", ["366d", "30m", 3_600_000, "1.5h"])
def test_funnel_window_within_bounds_is_answered(env: Env, window: Any) -> None:
    response = env.client.post(
        "/v1/metrics/funnel",
        json={"steps": ["page_view", "signup"], "window": window},
        headers=env.headers(),
    )
    assert response.status_code == 200, (window, response.text)


# -- bug 11: wording ------------------------------------------------------------------------
def test_top_without_dimension_says_required(env: Env) -> None:
    response = env.client.get("/v1/metrics/top", headers=env.headers())
    assert response.status_code == 400
    assert response.json()["error"].startswith("dimension: required")


def test_lone_surrogate_in_the_body_is_named(env: Env) -> None:
    response = env.client.post(
        "/v1/sql", content=b'{"sql":"\\ud800"}', headers=env.headers()
    )
    assert response.status_code == 400
    assert "unpaired UTF-16 surrogate" in response.json()["error"]
    paired = env.client.post(
        "/v1/sql", content=b'{"sql":"SELECT \'\\ud83d\\ude00\' AS s"}', headers=env.headers()
    )
    assert paired.status_code == 200 and paired.json()["rows"] == [["\U0001f600"]]


def test_funnel_with_another_method_is_a_405(env: Env) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = env.client.request(method, "/v1/metrics/funnel", headers=env.headers())
        assert response.status_code == 405, (method, response.text)
        assert response.headers["allow"] == "POST"
        assert "/v1/openapi.json" not in response.text
    answer = env.client.get("/v1/metrics/funnel", headers=env.headers())
    assert answer.json()["error"].startswith("method: /v1/metrics/funnel takes POST")
    # Without a token it is a 401 like every metrics route.
    assert env.client.get("/v1/metrics/funnel").status_code == 401


def test_exact_must_be_a_boolean(env: Env) -> None:
    response = env.client.get("/v1/metrics/dau?exact=maybe", headers=env.headers())
    assert response.status_code == 400
    assert response.json()["error"].startswith("exact:")
    assert env.client.get("/v1/metrics/dau?exact=TRUE", headers=env.headers()).status_code == 200


def test_statements_other_than_select_are_named_without_parser_internals(env: Env) -> None:
    for text, keyword in (
        ("KILL QUERY WHERE 1", "KILL"),
        ("/* x */ kill mutation where 1", "KILL"),
        ("SHOW TABLES", "SHOW"),
        ("EXPLAIN SELECT 1", "EXPLAIN"),
    ):
        response = env.sql(text)
        assert response.status_code == 400
        assert response.json()["error"] == f"sql: only SELECT is allowed, got {keyword}"
    broken = env.sql("SELECT FROM WHERE")
    assert broken.status_code == 400
    assert "<" not in broken.json()["error"] and "sqlglot" not in broken.json()["error"]


def test_engine_errors_do_not_echo_our_settings(env: Env) -> None:
    response = env.sql("SELECT nosuchfunction(1)")
    assert response.status_code == 400
    error = response.json()["error"]
    assert "nosuchfunction" in error
    assert "SETTINGS" not in error and "readonly" not in error


def test_401_carries_www_authenticate(env: Env) -> None:
    for response in (
        env.client.post("/v1/sql", json={"sql": "SELECT 1"}),
        env.client.get("/v1/metrics/dau", headers={"Authorization": "Bearer wrong"}),
    ):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")


# -- bug 10: Redis namespaces ---------------------------------------------------------------------
def _service(env: Env, redis_url: str, prefix: str) -> QueryService:
    config = load_config(
        overrides={
            "data_dir": str(env.pipeline.config.data_path),
            "query.backend": "redis",
            "query.redis_url": redis_url,
            "query.open_range_cache_ttl": "600s",
            "query.rate_limit_per_minute": 1,
            "query.rate_limit_burst": 2,
            "serving.redis_prefix": prefix,
        }
    )
    return QueryService(config, lambda: env.pipeline.store, lambda: None)


def test_two_deployments_on_one_redis_share_no_cache_and_no_buckets(
    env: Env, redis_url: str
) -> None:
    first = _service(env, redis_url, "deploy-a:")
    second = _service(env, redis_url, "deploy-b:")
    try:
        text = "SELECT count() AS n FROM events WHERE ts >= '2021-01-01 00:00:00'"
        assert first.sql("carol", text).meta["cache"] == "miss"
        assert first.sql("carol", text).meta["cache"] == "hit"
        # Same user, same text, same Redis: another deployment does not see it.
        assert second.sql("carol", text).meta["cache"] == "miss"
        assert second.sql("carol", text).meta["cache"] == "hit"
        keys = {k.decode() for k in redis.Redis.from_url(redis_url).keys("*")}
        assert any(k.startswith("deploy-a:cache:") for k in keys)
        assert any(k.startswith("deploy-b:cache:") for k in keys)
        assert not any(k.startswith("strata:") for k in keys), keys
        # Late data revised in deployment A leaves B's entry alone.
        first.on_revised(env.base, env.base + DAY_MS)
        assert first.sql("carol", text).meta["cache"] == "miss"
        assert second.sql("carol", text).meta["cache"] == "hit"
        # Buckets: dave empties his in A; in B he still has his full burst.
        first.limits.check("dave")
        first.limits.check("dave")
        with pytest.raises(RateLimitExceeded):
            first.limits.check("dave")
        second.limits.check("dave")
        second.limits.check("dave")
        with pytest.raises(RateLimitExceeded):
            second.limits.check("dave")
        keys = {k.decode() for k in redis.Redis.from_url(redis_url).keys("*")}
        assert {"deploy-a:rl:dave", "deploy-b:rl:dave"} <= keys
    finally:
        first.close()
        second.close()


def test_sql_max_rows_refusal_is_not_cached(env: Env) -> None:
    service = env.pipeline.query
    text = "SELECT arrayJoin(range(100)) AS y"
    for _ in range(2):
        with pytest.raises(SQLRejected, match="query.sql_max_rows"):
            service.sql("erin", text)
