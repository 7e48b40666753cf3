"""The contract every metrics endpoint keeps (audit 5, bugs 2, 3, 7, 8).

A real pipeline (chDB store, the embedded processor and its memory serving
store) over a log of events spanning two hours: the older windows have left
the serving store (``processor.final_retention``), so ``GET
/v1/metrics/{name}`` answers the first hour from the rollups and the newest
buckets from the serving store. Checked against a Python reference over the
same events:

* filters on ``GET /v1/metrics/{name}`` apply to both sources, exactly;
* unknown or repeated parameters, and filters on non-dimensions, are 400s
  that name the parameter (also on ``GET /v1/metrics/events``);
* both endpoints take a token from the user's bucket: 429 + Retry-After for
  a user whose bucket is empty while another user is served;
* every metrics endpoint carries ``served_from``, ``complete_until``,
  ``open_windows`` and ``revised`` (booleans) and ``cache``;
* late data into a range the serving store already evicted makes
  ``revised`` true and invalidates the cached answer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from tests.fixtures_processor import BASE_MS, fill_log, make_events

from strata.config import load_config
from strata.processor.runner import Processor
from strata.query.api import CoreAPI, core_routes
from strata.server.pipeline import Pipeline

ADMIN = "adm_metrics_contract"
FIVE_MINUTES = 300_000
HOUR = 3_600_000
END_MS = BASE_MS + 2 * HOUR
LIMITED = ("limited_live", "limited_events")


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ms_of(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def _drain(pipeline: Pipeline) -> None:
    processor: Processor = pipeline.components["processor"]
    while processor.lag():
        processor.run_once(wait_s=0)
    processor.flush()
    for loader in pipeline.loaders.values():
        while loader.lag():
            loader.run_once(timeout_s=0.5)
    # The server's day finalizer scans the stored late events every few
    # seconds: late events in windows the processor no longer holds reach
    # the query layer (on_revised) only this way. Its first scan takes the
    # offsets to start from.
    pipeline.components["day_answers"].scan_late()


class Env:
    def __init__(
        self, pipeline: Pipeline, client: TestClient, events: list[dict], tokens: dict[str, str]
    ) -> None:
        self.pipeline = pipeline
        self.client = client
        self.events = events
        self.tokens = tokens

    def headers(self, user: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def get(self, path: str, user: str = "alice", **params: Any) -> dict[str, Any]:
        response = self.client.get(path, params=params, headers=self.headers(user))
        assert response.status_code == 200, (path, params, response.text)
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    config = load_config(
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("metrics_contract")),
            "auth.admin_tokens": [ADMIN],
            "log.partitions": 2,
            # Repeats within a test must hit even though ranges near the
            # watermark count as open.
            "query.open_range_cache_ttl": "600s",
            "query.user_limits": {
                user: {"rate_limit_per_minute": 1, "rate_limit_burst": 3} for user in LIMITED
            },
        },
        environ={},
    )
    # No late events in the base log: the serving store and the rollups
    # then agree with one Python reference.
    events = make_events(5000, seed=23, late_share=0.0)
    fill_log(config, events)
    pipeline = Pipeline.open(config)
    _drain(pipeline)
    tokens = {
        user: pipeline.keyring.create_token(user, ["metrics", "sql"])
        for user in ("alice", "bob", *LIMITED)
    }
    app = Starlette(routes=core_routes(CoreAPI(pipeline)))
    with TestClient(app) as client:
        yield Env(pipeline, client, events, tokens)
    pipeline.components["processor"].serving.clear()
    pipeline.stop()


# -- references -----------------------------------------------------------------------------
def page_views_reference(
    events: list[dict], step: int, start: int, end: int, filters: dict[str, str], group_by: list[str]
) -> dict[tuple, tuple[int, int]]:
    """(bucket, *group values) -> (views, distinct user_id) of page views."""
    views: dict[tuple, int] = defaultdict(int)
    users: dict[tuple, set[str]] = defaultdict(set)
    for e in events:
        if e["event_type"] != "page_view" or not start <= e["ts"] < end:
            continue
        if any(e[c] != v for c, v in filters.items()):
            continue
        key = (e["ts"] // step * step, *[e[d] for d in group_by])
        views[key] += 1
        users[key].add(e["user_id"])
    return {key: (views[key], len(users[key])) for key in views}


def page_views_answer(body: dict[str, Any], group_by: list[str]) -> dict[tuple, tuple[int, int]]:
    return {
        (ms_of(r["time"]), *[r[d] for d in group_by]): (r["views"], r["users"])
        for r in body["rows"]
    }


# -- filters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity,step", [("5m", FIVE_MINUTES), ("1h", HOUR)])
@pytest.mark.parametrize(
    "params,filters,group_by",
    [
        ({"filter.country": "DE"}, {"country": "DE"}, []),
        ({"country": "FR"}, {"country": "FR"}, []),  # the short form
        ({"filter.country": "US", "group_by": "country"}, {"country": "US"}, ["country"]),
        ({"filter.country": "XX"}, {"country": "XX"}, []),  # no such value: no rows
        ({}, {}, ["country"]),
    ],
)
def test_filters_on_a_configured_metric_match_the_reference(
    env: Env,
    granularity: str,
    step: int,
    params: dict[str, str],
    filters: dict[str, str],
    group_by: list[str],
) -> None:
    query = {"from": iso(BASE_MS), "to": iso(END_MS), "granularity": granularity, **params}
    if group_by:
        query["group_by"] = ",".join(group_by)
    body = env.get("/v1/metrics/page_views_by_country", **query)
    # Both sources answered part of the range, so the filter reached both.
    assert body["served_from"] == "rollup_5m+serving", body["served_from"]
    assert body["filters"] == filters
    expected = page_views_reference(env.events, step, BASE_MS, END_MS, filters, group_by)
    assert page_views_answer(body, group_by) == expected
    if filters.get("country") != "XX":
        assert expected  # the reference is not trivially empty
    if filters:  # and the filter changed the answer
        unfiltered = page_views_reference(env.events, step, BASE_MS, END_MS, {}, group_by)
        assert sum(v for v, _ in expected.values()) < sum(v for v, _ in unfiltered.values())


def test_two_dimension_filters_on_the_daily_rollup(env: Env) -> None:
    body = env.get(
        "/v1/metrics/revenue_by_country",
        **{"from": iso(BASE_MS), "to": iso(BASE_MS + 86_400_000), "granularity": "1d"},
        **{"filter.country": "BR", "currency": "EUR"},
    )
    assert body["served_from"] == "rollup_1d"
    chosen = [
        e
        for e in env.events
        if e["revenue"] > 0 and e["country"] == "BR" and e["currency"] == "EUR"
    ]
    assert chosen
    assert len(body["rows"]) == 1
    row = body["rows"][0]
    assert row["orders"] == len(chosen)
    assert row["revenue"] == pytest.approx(sum(e["revenue"] for e in chosen))
    assert row["buyers"] == len({e["distinct_id"] for e in chosen})


@pytest.mark.parametrize(
    "path,params,named",
    [
        ("/v1/metrics/page_views_by_country", {"filter.nosuch": "x"}, "filter.nosuch"),
        ("/v1/metrics/page_views_by_country", {"filter.event_type": "click"}, "filter.event_type"),
        ("/v1/metrics/page_views_by_country", {"platform": "web"}, "platform"),
        ("/v1/metrics/page_views_by_country", {"bogus": "1"}, "bogus"),
        ("/v1/metrics/page_views_by_country", {"group_by": "platform"}, "group_by"),
        ("/v1/metrics/page_views_by_country", {"granularity": "2m"}, "granularity"),
        (
            "/v1/metrics/page_views_by_country",
            [("filter.country", "DE"), ("filter.country", "FR")],
            "filter.country",
        ),
        ("/v1/metrics/events", {"filter.country": "DE"}, "filter.country"),
        ("/v1/metrics/events", {"group_by": "country"}, "group_by"),
        ("/v1/metrics/events", [("event_type", "click"), ("event_type", "signup")], "event_type"),
    ],
)
def test_unknown_parameters_and_non_dimension_filters_are_400(
    env: Env, path: str, params: Any, named: str
) -> None:
    response = env.client.get(path, params=params, headers=env.headers("bob"))
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{named}:"), response.json()


# -- rate limits -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path,user",
    [("/v1/metrics/page_views_by_country", LIMITED[0]), ("/v1/metrics/events", LIMITED[1])],
)
def test_rate_limit_refuses_one_user_and_serves_another(env: Env, path: str, user: str) -> None:
    params = {"from": iso(BASE_MS), "to": iso(END_MS)}
    statuses = []
    for _ in range(6):
        response = env.client.get(path, params=params, headers=env.headers(user))
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert "rate limit" in response.json()["error"]
            # Another user is served meanwhile.
            served = env.client.get(path, params=params, headers=env.headers("bob"))
            assert served.status_code == 200, served.text
    # Burst 3: cache hits take tokens too (the cache sits behind the limit).
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:], statuses


# -- completeness fields -----------------------------------------------------------------------
def _all_metrics_endpoints(env: Env) -> list[tuple[str, str, dict[str, Any]]]:
    window = {"from": iso(BASE_MS), "to": iso(END_MS)}
    return [
        ("GET", "/v1/metrics/count", {**window, "group_by": "country"}),
        ("GET", "/v1/metrics/events", window),
        ("GET", "/v1/metrics/dau", window),
        ("GET", "/v1/metrics/wau", window),
        ("GET", "/v1/metrics/mau", window),
        ("GET", "/v1/metrics/active-users", {**window, "window": "7d"}),
        ("GET", "/v1/metrics/revenue", window),
        ("GET", "/v1/metrics/top", {**window, "dimension": "country"}),
        ("GET", "/v1/metrics/retention", {**window, "days": "1"}),
        ("POST", "/v1/metrics/funnel", {**window, "steps": ["page_view", "click"]}),
        ("GET", "/v1/metrics/page_views_by_country", window),
        ("GET", "/v1/metrics/events_by_type", window),
        ("GET", "/v1/metrics/active_users", window),
        ("GET", "/v1/metrics/revenue_by_country", window),
    ]


def test_every_metrics_endpoint_carries_the_completeness_fields(env: Env) -> None:
    spec_paths = env.client.get("/openapi.json").json()["paths"]
    assert "/v1/metrics/{name}" in spec_paths
    for method, path, params in _all_metrics_endpoints(env):
        if method == "GET":
            response = env.client.get(path, params=params, headers=env.headers("alice"))
        else:
            response = env.client.post(path, json=params, headers=env.headers("alice"))
        assert response.status_code == 200, (path, response.text)
        body = response.json()
        assert isinstance(body["served_from"], str) and body["served_from"], path
        assert body["complete_until"] is None or isinstance(body["complete_until"], str), path
        assert isinstance(body["open_windows"], bool), (path, body["open_windows"])
        assert isinstance(body["revised"], bool), (path, body["revised"])
        assert body["cache"] in ("hit", "miss"), (path, body.get("cache"))
        # The route is documented with every field it returns.
        documented = {p for p in spec_paths if p == path} or {"/v1/metrics/{name}"}
        (spec_path,) = documented
        operation = spec_paths[spec_path][method.lower()]
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        missing = {"served_from", "complete_until", "open_windows", "revised", "cache"} - set(
            schema["properties"]
        )
        assert not missing, (path, missing)


def test_events_metric_is_cached_per_user_and_equals_the_reference(env: Env) -> None:
    # A range no earlier test asked for.
    params = {"from": iso(BASE_MS), "to": iso(END_MS), "granularity": "5m"}
    first = env.get("/v1/metrics/events", "alice", **params)
    again = env.get("/v1/metrics/events", "alice", **params)
    other = env.get("/v1/metrics/events", "bob", **params)
    assert (first["cache"], again["cache"], other["cache"]) == ("miss", "hit", "miss")
    assert first["rows"] == again["rows"] == other["rows"]
    expected: dict[tuple[int, str], int] = defaultdict(int)
    for e in env.events:
        if BASE_MS <= e["ts"] < END_MS:
            expected[(e["ts"] // FIVE_MINUTES * FIVE_MINUTES, e["event_type"])] += 1
    assert {(ms_of(r["time"]), r["event_type"]): r["events"] for r in first["rows"]} == expected


# -- late data into an evicted range -------------------------------------------------------------
def test_late_data_into_an_evicted_range_sets_revised(env: Env) -> None:
    pipeline = env.pipeline
    serving = pipeline.components["processor"].serving
    start, end = BASE_MS, BASE_MS + HOUR // 2
    # The serving store no longer holds these windows.
    assert serving.windows("page_views_by_country", start, end) == []
    params = {"from": iso(start), "to": iso(end), "granularity": "5m"}
    before = env.get("/v1/metrics/page_views_by_country", **params)
    assert before["served_from"] == "rollup_5m"
    assert before["revised"] is False and before["cache"] == "miss"
    assert env.get("/v1/metrics/page_views_by_country", **params)["cache"] == "hit"
    events_before = env.get("/v1/metrics/events", **params)
    assert events_before["revised"] is False
    # Late page views at BASE + 10 min, far behind the watermark.
    late = make_events(30, seed=99, span_ms=60_000, late_share=0.0)
    for i, event in enumerate(late):
        event.update(
            event_id=f"late-{i}",
            event_type="page_view",
            ts=BASE_MS + 10 * 60_000 + i * 1000,
            received_at=END_MS + HOUR,
        )
    fill_log(pipeline.config, late)
    _drain(pipeline)
    after = env.get("/v1/metrics/page_views_by_country", **params)
    assert after["cache"] == "miss", "late data must invalidate the cached answer"
    assert after["revised"] is True
    assert after["revised_ranges"] == []  # the serving store forgot the evicted windows
    expected = page_views_reference(env.events + late, FIVE_MINUTES, start, end, {}, [])
    assert {ms_of(r["time"]): r["views"] for r in after["rows"]} == {
        k[0]: v[0] for k, v in expected.items()
    }
    gained = sum(r["views"] for r in after["rows"]) - sum(r["views"] for r in before["rows"])
    assert gained == len(late)
    events_after = env.get("/v1/metrics/events", **params)
    assert events_after["revised"] is True and events_after["cache"] == "miss"
    assert sum(r["events"] for r in events_after["rows"]) == len(late) + sum(
        r["events"] for r in events_before["rows"]
    )
    env.events.extend(late)
