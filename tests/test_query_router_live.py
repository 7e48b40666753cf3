"""The SQL router merges the serving store's live windows (decision 092).

A real processor runs over a log whose loader stopped part-way: the newest
windows are in the serving store (memory, or a real redis-server) but not in
the store. The SQL answer for those buckets must equal the serving store's
values and a Python count over the events; after the loader catches up it
must equal the raw answer. Shapes that cannot be merged safely keep the
rollup answer and say so."""

from __future__ import annotations

import socket
import uuid
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
from strata.query import sandbox
from strata.query.api import CoreAPI, core_routes
from strata.query.live import LiveMerger
from strata.server.pipeline import Pipeline
from strata.serving import open_serving
from strata.serving.memory import MemoryServingStore
from strata.serving.redis import RedisServingStore
from strata.serving.state import finalize, merge_values

ADMIN = "adm_router_live"
FIVE_MINUTES = 300_000


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ms(value: Any) -> int:
    return int(value.replace(tzinfo=UTC).timestamp() * 1000)


def _drain_processor(processor: Processor) -> None:
    while processor.lag():
        processor.run_once(wait_s=0)
    processor.flush()


def _drain_loader(pipeline: Pipeline) -> None:
    loader = pipeline.loaders["events"]
    while loader.lag():
        loader.run_once(timeout_s=0.5)


class Env:
    def __init__(
        self,
        pipeline: Pipeline,
        client: TestClient,
        events: list[dict],
        processors: list[Processor],
    ) -> None:
        self.pipeline = pipeline
        self.client = client
        self.events = events
        self.processors = processors
        self.serving = processors[0].serving
        self.headers = {"Authorization": f"Bearer {ADMIN}"}

    def sql(self, text: str, **extra: Any) -> dict[str, Any]:
        response = self.client.post("/v1/sql", json={"sql": text, **extra}, headers=self.headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture(scope="module", params=["memory", "redis"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """memory: the embedded processor (shard ``all``) next to the query
    service. redis: two processors on partitions 0-1 and 2-3 (shards
    ``p0-1``, ``p2-3``) and no processor in the query's process, which
    reads the Redis serving store on its own connection."""
    overrides: dict[str, Any] = {
        "data_dir": str(tmp_path_factory.mktemp(f"router_live_{request.param}")),
        "auth.admin_tokens": [ADMIN],
        "log.partitions": 4,
        # Complete rollup answers are cached; open or live ones never are.
        "query.cache_ttl": "600s",
        "query.open_range_cache_ttl": "0s",
    }
    if request.param == "redis":
        overrides["serving.backend"] = "redis"
        overrides["serving.redis_url"] = request.getfixturevalue("redis_url")
        overrides["serving.redis_prefix"] = f"live{uuid.uuid4().hex[:8]}:"
        overrides["processor.embedded"] = False  # processors are separate shards
    config = load_config(overrides=overrides, environ={})
    events = make_events(6000, seed=11)
    loaded = int(len(events) * 0.6)
    fill_log(config, events[:loaded])
    pipeline = Pipeline.open(config)
    if request.param == "memory":
        processors = [pipeline.components["processor"]]
    else:
        processors = [
            Processor(config, pipeline.log, open_serving(config), partitions=shard)
            for shard in ([0, 1], [2, 3])
        ]
    # The loader stops after the first 60 % of the log; the processors read all.
    _drain_loader(pipeline)
    fill_log(config, events[loaded:])
    for processor in processors:
        _drain_processor(processor)
        assert processor.lag() == 0
    assert pipeline.loaders["events"].lag() > 0
    assert sorted(processors[0].serving.progress()) == (
        ["all"] if request.param == "memory" else ["p0-1", "p2-3"]
    )
    app = Starlette(routes=core_routes(CoreAPI(pipeline)))
    with TestClient(app) as client:
        yield Env(pipeline, client, events, processors)
    processors[0].serving.clear()
    if request.param == "redis":
        for processor in processors:
            processor.close()
            processor.serving.close()
    pipeline.stop()


END_MS = BASE_MS + 3 * 3_600_000
PAGE_VIEWS = (
    "SELECT toStartOfFiveMinutes(ts) AS t, country, count() AS n, uniq(user_id) AS u "
    "FROM events WHERE event_type = 'page_view' AND ts >= '{start}' AND ts < '{end}' "
    "GROUP BY t, country ORDER BY t, country"
)


def page_views(start: int = BASE_MS, end: int = END_MS) -> str:
    return PAGE_VIEWS.format(start=_utc(start), end=_utc(end))


def reference(events: list[dict], step: int = FIVE_MINUTES) -> dict[tuple[int, str], tuple]:
    """(bucket, country) -> (page views, distinct user_id), by hand."""
    users: dict[tuple[int, str], set[str]] = defaultdict(set)
    views: dict[tuple[int, str], int] = defaultdict(int)
    for event in events:
        if event["event_type"] == "page_view" and BASE_MS <= event["ts"] < END_MS:
            key = (event["ts"] // step * step, event["country"])
            views[key] += 1
            users[key].add(event["user_id"])
    return {key: (views[key], len(users[key])) for key in views}


def serving_reference(env: Env, start: int, end: int) -> dict[tuple[int, str], tuple]:
    """(bucket, country) -> (views, users) merged from the serving store."""
    metric = env.processors[0].metrics_by_name["page_views_by_country"]
    groups = defaultdict(list)
    for state in env.serving.windows(metric.name, start, end):
        groups[(state.window_start // FIVE_MINUTES * FIVE_MINUTES, state.dims[0])].append(state)
    out = {}
    for key, members in groups.items():
        values = finalize(metric, *merge_values(metric, members))
        out[key] = (values["views"], values["users"])
    return out


def rows_by_key(body: dict[str, Any]) -> dict[tuple[int, str], tuple]:
    return {(_ms_iso(r[0]), r[1]): (r[2], r[3]) for r in body["rows"]}


def _ms_iso(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def test_live_buckets_come_from_the_serving_store(env: Env) -> None:
    loaded = int(len(env.events) * 0.6)
    body = env.sql(page_views())
    assert body["served_from"] == "rollup_5m+serving", body["live_windows"]
    assert body["live_windows"].startswith("merged"), body["live_windows"]
    assert body["live_buckets"] > 0
    live_from = _ms_iso(body["live_from"])
    assert BASE_MS < live_from < END_MS
    got = rows_by_key(body)
    live = {k: v for k, v in got.items() if k[0] >= live_from}
    finished = {k: v for k, v in got.items() if k[0] < live_from}
    assert live and finished
    assert len({k[0] for k in live}) == body["live_buckets"]
    # Live buckets: the serving store's values, and every event (the loader
    # has not stored the last 40 %): count and (below 2048) uniq are exact.
    assert live == serving_reference(env, live_from, END_MS)
    everything = reference(env.events)
    assert live == {k: v for k, v in everything.items() if k[0] >= live_from}
    # Finished buckets: the rollup, i.e. the loaded events only.
    assert finished == {k: v for k, v in reference(env.events[:loaded]).items() if k[0] < live_from}
    # The merge matters: the rollup alone misses events in the live buckets.
    rollup_only = reference(env.events[:loaded])
    assert any(rollup_only.get(k, (0, 0))[0] < v[0] for k, v in live.items())
    # The order asked for holds over the union.
    keys = [(_ms_iso(r[0]), r[1]) for r in body["rows"]]
    assert keys == sorted(keys)


def test_hour_buckets_order_limit_and_fully_live_range(env: Env) -> None:
    body = env.sql(page_views())
    live_from = _ms_iso(body["live_from"])
    hourly = env.sql(
        "SELECT toStartOfHour(ts) AS h, count() AS n FROM events WHERE event_type = 'page_view' "
        f"AND ts >= '{_utc(BASE_MS)}' AND ts < '{_utc(END_MS)}' GROUP BY h "
        "ORDER BY n DESC, h LIMIT 2"
    )
    # The hour holding live_from mixes finished and live windows: it comes
    # from the rollup; later hours from the serving store.
    assert _ms_iso(hourly["live_from"]) % 3_600_000 == 0
    assert _ms_iso(hourly["live_from"]) >= live_from
    views = defaultdict(int)
    for (bucket, _), (n, _) in reference(env.events).items():
        views[bucket // 3_600_000 * 3_600_000] += n
    loaded = int(len(env.events) * 0.6)
    loaded_views = defaultdict(int)
    for (bucket, _), (n, _) in reference(env.events[:loaded]).items():
        loaded_views[bucket // 3_600_000 * 3_600_000] += n
    split = _ms_iso(hourly["live_from"])
    expected = {h: (views[h] if h >= split else loaded_views[h]) for h in views}
    ranked = sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    assert [(_ms_iso(r[0]), r[1]) for r in hourly["rows"]] == ranked
    # No time bucket, the range wholly in held windows: all from serving.
    by_country = env.sql(
        "SELECT country, count() AS n, uniq(user_id) AS u FROM events "
        f"WHERE event_type = 'page_view' AND ts >= '{_utc(live_from)}' "
        f"AND ts < '{_utc(END_MS)}' AND country IN ('DE', 'FR', 'US') "
        "GROUP BY country ORDER BY country"
    )
    assert by_country["served_from"] == "serving"
    want: dict[str, tuple[int, set[str]]] = {}
    for event in env.events:
        if (
            event["event_type"] == "page_view"
            and live_from <= event["ts"] < END_MS
            and event["country"] in ("DE", "FR", "US")
        ):
            n, users = want.setdefault(event["country"], (0, set()))
            want[event["country"]] = (n + 1, users | {event["user_id"]})
    assert by_country["rows"] == [[c, n, len(u)] for c, (n, u) in sorted(want.items())]


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        (
            "SELECT toStartOfFiveMinutes(ts) AS t, count() AS n FROM events "
            "WHERE event_type = 'page_view' AND ts >= '{start}' AND ts < '{end}' "
            "GROUP BY t HAVING count() > 3 ORDER BY t",
            "HAVING",
        ),
        (
            "SELECT toStartOfFiveMinutes(ts) AS t, count() * 2 AS n FROM events "
            "WHERE event_type = 'page_view' AND ts >= '{start}' AND ts < '{end}' "
            "GROUP BY t ORDER BY t",
            "expression over aggregates",
        ),
        (
            "SELECT country, count() AS n FROM events WHERE event_type = 'page_view' "
            "AND ts >= '{start}' AND ts < '{end}' GROUP BY country ORDER BY country",
            "without a time bucket",
        ),
    ],
)
def test_unsupported_shapes_keep_the_rollup_answer(env: Env, sql: str, reason: str) -> None:
    text = sql.format(start=_utc(BASE_MS), end=_utc(END_MS))
    body = env.sql(text)
    assert body["served_from"] == "rollup_5m"
    assert body["live_windows"].startswith("not merged:") and reason in body["live_windows"]
    assert body["live_buckets"] == 0
    route = env.pipeline.query.router.route(sandbox.check(text))
    _, rows = env.pipeline.store.query_rows(route.sql)
    assert len(body["rows"]) == len(rows) and body["rows"][0][1] == rows[0][1]
    explained = env.sql(text, explain=True)
    assert explained["explain"]["live_windows"]["merged"] is False
    assert reason in explained["explain"]["live_windows"]["note"]


def test_explain_shows_the_decision(env: Env) -> None:
    explained = env.sql(page_views(), explain=True)
    assert explained["executed"] is False
    assert explained["served_from"] == "rollup_5m+serving"
    live = explained["explain"]["live_windows"]
    assert live["merged"] is True and live["live_window_states"] > 0
    assert "window_start < toDateTime('" in live["rollup_sql"]
    assert live["live_from"] == env.sql(page_views())["live_from"]
    raw = env.sql("SELECT path, count() FROM events GROUP BY path", explain=True)
    assert raw["explain"]["live_windows"]["note"].startswith("not merged")


def test_answers_with_live_buckets_are_not_cached_long(env: Env) -> None:
    body = env.sql(page_views())
    live_from = _ms_iso(body["live_from"])
    watermark = _ms_iso(body["complete_until"].split(".")[0] + "Z")
    # Complete (end before the watermark) yet from the serving store: the
    # open-range TTL (0 s here) applies, not the 600 s one.
    end = min(live_from + 30 * 60_000, watermark // FIVE_MINUTES * FIVE_MINUTES)
    assert end > live_from
    complete_live = page_views(live_from, end).replace(" AS n,", " AS views,")
    first = env.sql(complete_live)
    assert first["open_windows"] is False and first["live_buckets"] > 0
    assert env.sql(complete_live)["cache"] == "miss"
    # A complete rollup-only answer is cached as before.
    early = page_views(BASE_MS, BASE_MS + 30 * 60_000).replace(" AS n,", " AS views,")
    assert env.sql(early)["live_buckets"] == 0
    assert env.sql(early)["cache"] == "hit"


def test_ungrouped_aggregate_over_held_windows(env: Env) -> None:
    live_from = _ms_iso(env.sql(page_views())["live_from"])
    body = env.sql(
        "SELECT count() AS n, uniq(distinct_id) AS u, sum(revenue) AS r, avg(revenue) AS a "
        f"FROM events WHERE revenue > 0 AND ts >= '{_utc(live_from)}' AND ts < '{_utc(END_MS)}'"
    )
    assert body["served_from"] == "serving", body["live_windows"]
    chosen = [
        e["revenue"] for e in env.events if e["revenue"] > 0 and live_from <= e["ts"] < END_MS
    ]
    buyers = {
        e["distinct_id"] for e in env.events if e["revenue"] > 0 and live_from <= e["ts"] < END_MS
    }
    [[n, u, r, a]] = body["rows"]
    assert (n, u) == (len(chosen), len(buyers))
    assert r == pytest.approx(sum(chosen), rel=1e-12)
    assert a == pytest.approx(sum(chosen) / len(chosen), rel=1e-12)


def _merger(env: Env, serving: Any) -> LiveMerger:
    service = env.pipeline.query
    return LiveMerger(service.router, lambda: serving, 4, service.live.retention_ms)


def test_overlapping_shards_and_a_dead_serving_store_are_not_merged(env: Env) -> None:
    service = env.pipeline.query
    route = service.router.route(sandbox.check(page_views()))
    # A copy of the serving store plus the progress of a stale shard that
    # owned every partition: its windows would double count.
    copy = MemoryServingStore()
    copy.put_windows(env.serving.windows("page_views_by_country", 0, 2**62))
    for shard, watermarks in env.serving.progress().items():
        copy.set_progress(shard, watermarks)
    assert _merger(env, copy).plan(route, service._query_rows).merged  # type: ignore[union-attr]
    copy.set_progress(
        "p9" if "all" in env.serving.progress() else "all", {"page_views_by_country": 1}
    )
    plan = _merger(env, copy).plan(route, service._query_rows)
    assert plan is not None and not plan.merged and "exactly once" in plan.note
    # Nothing listens on this port: the rollup answer stands.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = RedisServingStore(f"redis://127.0.0.1:{port}/0", prefix="dead:")
    plan = _merger(env, dead).plan(route, service._query_rows)
    assert plan is not None and plan.note.startswith("not merged: serving store unavailable")
    dead.close()


def test_capped_windows_stay_on_the_rollup(env: Env) -> None:
    """A shard whose window hit processor.max_groups publishes
    ``<metric>#capped_until``: buckets up to it come from the rollup."""
    service = env.pipeline.query
    route = service.router.route(sandbox.check(page_views()))
    copy = MemoryServingStore()
    copy.put_windows(env.serving.windows("page_views_by_country", 0, 2**62))
    progress = env.serving.progress()
    for shard, watermarks in progress.items():
        copy.set_progress(shard, watermarks)
    before = _merger(env, copy).plan(route, service._query_rows)
    assert before is not None and before.merged and before.split_ms is not None
    capped_until = before.split_ms + 4 * FIVE_MINUTES
    shard = sorted(progress)[0]
    copy.set_progress(
        shard, {**progress[shard], "page_views_by_country#capped_until": capped_until}
    )
    after = _merger(env, copy).plan(route, service._query_rows)
    assert after is not None and after.merged
    assert after.split_ms == capped_until
    assert min(s.window_start for s in after.states) >= capped_until


def test_after_the_loader_catches_up_equals_raw(env: Env) -> None:
    """Runs last for each backend: it stores the rest of the log."""
    _drain_loader(env.pipeline)
    router = env.pipeline.query.router
    queries = [
        page_views().replace(" AS u ", " AS users "),
        "SELECT toStartOfFifteenMinutes(ts) AS q, country, currency, sum(revenue) AS r, "
        "count() AS o, uniq(distinct_id) AS b FROM events WHERE revenue > 0 "
        f"AND ts >= '{_utc(BASE_MS)}' AND ts < '{_utc(END_MS)}' "
        "GROUP BY q, country, currency ORDER BY q, country, currency",
    ]
    for text in queries:
        body = env.sql(text)
        assert "+serving" in body["served_from"], body["live_windows"]
        _, raw = env.pipeline.store.query_rows(router.raw(sandbox.check(text)).sql)
        assert len(body["rows"]) == len(raw), text
        for got, want in zip(body["rows"], raw, strict=True):
            keys = list(got[: len(got) - (2 if "page_view" in text else 3)])
            assert _ms_iso(keys[0]) == _ms(want[0])
            assert keys[1:] == list(want[1 : len(keys)])
            values, expected = got[len(keys) :], want[len(keys) :]
            if "page_view" in text:
                assert values[0] == expected[0]  # count: exact
                assert values[1] == pytest.approx(expected[1], rel=0.02, abs=1)  # uniq
            else:
                assert values[0] == pytest.approx(expected[0], rel=1e-9)  # sum
                assert values[1] == expected[1]
                assert values[2] == pytest.approx(expected[2], rel=0.02, abs=1)


def _count_by_country(env: Env, start: int) -> tuple[str, dict[tuple[int, str], int]]:
    """GET /v1/metrics/count of page views per 5 minutes and country over
    [start, END_MS): (served_from, (bucket, country) -> events)."""
    response = env.client.get(
        "/v1/metrics/count",
        params={
            "granularity": "5m",
            "group_by": "country",
            "event_type": "page_view",
            "from": _utc(start),
            "to": _utc(END_MS),
        },
        headers=env.headers,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    rows = {(_ms_iso(r["time"]), r["country"]): r["events"] for r in body["rows"]}
    return body["served_from"], rows


def test_metrics_count_by_country_over_live_buckets(env: Env) -> None:
    """GET /v1/metrics/count grouped by a dimension over a range with live
    buckets, and over a range only live windows answer."""
    served_from, got = _count_by_country(env, BASE_MS)
    assert "serving" in served_from, served_from
    live_from = _ms_iso(env.sql(page_views())["live_from"])
    everything = reference(env.events)
    expected = {k: v[0] for k, v in everything.items() if k[0] >= live_from}
    assert {k: v for k, v in got.items() if k[0] >= live_from} == expected
    # A range that only live windows answer (no rollup rows at all).
    served_from, got = _count_by_country(env, live_from)
    assert served_from == "serving", served_from
    assert got == expected


def test_empty_rollup_part_keeps_the_column_names(env: Env) -> None:
    """A merged answer whose rollup part has no rows still names its columns
    (the rollup query's empty result carries none): `strata serve` answered
    GET /v1/metrics/count with 500 when a day's stored part was empty."""
    sql = page_views().replace(
        "event_type = 'page_view'", "event_type = 'page_view' AND country = 'ZZ'"
    )
    body = env.sql(sql)
    assert body["served_from"] == "rollup_5m+serving", body
    assert body["rows"] == []
    assert body["columns"] == ["t", "country", "n", "u"]
