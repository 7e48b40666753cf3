"""State-size limits of the processor: ``processor.max_groups`` caps the
(window, dimension values) groups held live, and revised ranges are pruned
together with their windows (docs/semantics.md, "State size")."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pytest
from tests.fixtures_processor import fill_log

from strata.config import ConfigError, MetricConfig, load_config
from strata.loader.loader import Loader
from strata.loader.sinks import EVENTS_SINK, SINKS
from strata.log import open_log
from strata.metrics import compile_metric
from strata.processor.engine import WindowEngine, decode_snapshot, encode_snapshot
from strata.processor.runner import Processor
from strata.serving.base import ServingStore
from strata.serving.memory import MemoryServingStore
from strata.store import Store
from strata.telemetry import REGISTRY

MIN = 60_000
DAY = 86_400_000
BASE = (int(time.time() * 1000) // DAY - 1) * DAY  # yesterday: inside every TTL
BY_PATH = MetricConfig(
    name="views_by_path",
    filter="event_type = 'page_view'",
    dimensions=["path"],
    aggregations={"views": "count()", "users": "uniq(user_id)"},
    window="1m",
    out_of_orderness="0s",
)


def rows_for(count: int, paths: int, start_ms: int, span_ms: int, seed: int) -> list[dict]:
    """``count`` page views over ``paths`` distinct paths in ``span_ms``."""
    out = []
    for i in range(count):
        ts = start_ms + span_ms * i // count
        out.append(
            {
                "event_id": f"{seed}-{i}",
                "event_type": "page_view",
                "user_id": f"u{(i * 7 + seed) % 13}",
                "anonymous_id": "",
                "distinct_id": f"u{(i * 7 + seed) % 13}",
                "session_id": "",
                "ts": ts,
                "received_at": ts,
                "country": "DE",
                "platform": "web",
                "os": "",
                "app_version": "",
                "path": f"/p/{(i * 31 + seed) % paths}",
                "referrer": "",
                "revenue": 0.0,
                "currency": "",
                "properties": "{}",
            }
        )
    return out


def make_engine(max_groups: int, retention_ms: int = 2 * MIN) -> WindowEngine:
    return WindowEngine(
        [compile_metric(BY_PATH)],
        partitions=[0],
        idle_timeout_ms=10**12,
        retention_ms=retention_ms,
        now_ms=0,
        max_groups=max_groups,
    )


def held_counts(engine: WindowEngine) -> dict[tuple[int, tuple[str, ...]], int]:
    return {(s.window_start, tuple(s.dims)): s.count for s in engine.all_states()}


def test_groups_beyond_the_limit_are_not_held_and_held_groups_stay_exact() -> None:
    limit = 60
    engine = make_engine(limit)
    truth: Counter[tuple[int, tuple[str, ...]]] = Counter()
    fed = 0
    peak = 0
    # 30 one-minute windows, 200 distinct paths each: 6,000 groups in all.
    for minute in range(30):
        rows = rows_for(1000, 200, minute * MIN, MIN, seed=minute)
        for i in range(0, len(rows), 250):  # several batches per window
            part = rows[i : i + 250]
            engine.process(0, pa.Table.from_pylist(part, schema=EVENTS_SINK.schema), 0)
            fed += len(part)
            peak = max(peak, engine.groups_held)
            assert engine.groups_held <= limit
            assert engine.groups_held == sum(m["groups"] for m in engine.status().values())
        for row in rows:
            truth[(row["ts"] // MIN * MIN, (row["path"],))] += 1
    assert peak == limit
    held = held_counts(engine)
    # Every group that is held has all of its events: no partial counts.
    for key, count in held.items():
        assert count == truth[key], key
    # Windows were evicted as the watermark moved (retention 2 min), so new
    # windows got groups again; the rest is counted as over the limit.
    assert engine.over_limit_events > 0
    assert engine.over_limit_events < fed
    status = engine.status()["views_by_path"]
    assert status["capped_windows"] >= 1
    assert status["held_windows"] <= 4


def test_the_limit_survives_a_checkpoint() -> None:
    engine = make_engine(40, retention_ms=60 * MIN)
    rows = rows_for(600, 100, 0, MIN, seed=1)
    engine.process(0, pa.Table.from_pylist(rows[:300], schema=EVENTS_SINK.schema), 0)
    restored = make_engine(40, retention_ms=60 * MIN)
    restored.restore(decode_snapshot(encode_snapshot(engine.snapshot())))
    assert restored.groups_held == engine.groups_held == 40
    assert restored.over_limit_events == engine.over_limit_events
    rest = pa.Table.from_pylist(rows[300:], schema=EVENTS_SINK.schema)
    engine.process(0, rest, 0)
    restored.process(0, rest, 0)
    assert held_counts(restored) == held_counts(engine)
    assert restored.over_limit_events == engine.over_limit_events
    # A path first seen after the cap is not held, even though it is new.
    late_path = rows_for(1, 1, 30_000, 1, seed=5)
    late_path[0]["path"] = "/new"
    engine.process(0, pa.Table.from_pylist(late_path, schema=EVENTS_SINK.schema), 0)
    assert (0, ("/new",)) not in held_counts(engine)


def test_revised_ranges_are_pruned_with_their_windows_and_checkpointed() -> None:
    engine = make_engine(0, retention_ms=2 * MIN)
    on_time = rows_for(10, 2, 0, 10_000, seed=1)
    engine.process(0, pa.Table.from_pylist(on_time, schema=EVENTS_SINK.schema), 0)
    ahead = rows_for(1, 1, MIN + 5_000, 1, seed=2)  # watermark past the first window
    engine.process(0, pa.Table.from_pylist(ahead, schema=EVENTS_SINK.schema), 0)
    late = rows_for(1, 2, 20_000, 1, seed=3)
    step = engine.process(0, pa.Table.from_pylist(late, schema=EVENTS_SINK.schema), 0)
    assert step.revised == [("views_by_path", 0, MIN)]
    assert engine.status()["views_by_path"]["revised_ranges"] == 1
    restored = make_engine(0, retention_ms=2 * MIN)
    restored.restore(decode_snapshot(encode_snapshot(engine.snapshot())))
    assert restored.status()["views_by_path"]["revised_ranges"] == 1
    # Once the window leaves retention, its revised range goes with it.
    far = rows_for(1, 1, 4 * MIN, 1, seed=4)
    pruned = []
    for e in (engine, restored):
        step = e.process(0, pa.Table.from_pylist(far, schema=EVENTS_SINK.schema), 0)
        pruned.append(step.pruned_revised)
        assert e.status()["views_by_path"]["revised_ranges"] == 0
    assert pruned[0] == pruned[1] == [("views_by_path", 0, MIN)]


def test_max_groups_must_not_be_negative(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="processor.max_groups"):
        load_config(overrides={"data_dir": str(tmp_path), "processor.max_groups": -1})


def test_the_processor_reports_the_limit_in_status_and_metrics(tmp_path: Any) -> None:
    config = load_config(
        overrides={
            "data_dir": str(tmp_path),
            "log.partitions": 2,
            "log.fsync": "never",
            "processor.max_groups": 50,
            "processor.max_batch_events": 500,
            "metrics": [
                {
                    "name": BY_PATH.name,
                    "filter": BY_PATH.filter,
                    "dimensions": BY_PATH.dimensions,
                    "aggregations": BY_PATH.aggregations,
                    "window": BY_PATH.window,
                    "out_of_orderness": BY_PATH.out_of_orderness,
                }
            ],
        }
    )
    rows = [r for m in range(5) for r in rows_for(400, 150, m * MIN, MIN, seed=m)]
    fill_log(config, rows)
    log = open_log(config)
    processor = Processor(config, log, MemoryServingStore())
    try:
        while processor.lag():
            processor.run_once(wait_s=0)
            assert processor.status()["groups"] <= 50
        processor.flush()
        status = processor.status()
        assert status["max_groups"] == 50
        assert status["over_limit_events"] > 0
        exposed = REGISTRY.render().splitlines()
        shard = f'{{shard="{processor.shard}"}}'
        assert f"strata_processor_groups{shard} {status['groups']}" in exposed
        assert (
            f"strata_processor_over_limit_events_total{shard} {status['over_limit_events']}"
            in exposed
        )
    finally:
        processor.close()
        log.close()


def test_capped_windows_are_answered_from_the_rollups(tmp_path: Path) -> None:
    """At the limit the live metrics route still counts every event: the
    buckets of capped windows come from the rollups (kept from the raw
    events), the others from the serving store."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from strata.auth import Keyring
    from strata.query.api import CoreAPI
    from strata.server.pipeline import Pipeline
    from strata.serving.api import live_metric_routes

    five = dict(
        name="views_by_path_5m",
        filter=BY_PATH.filter,
        dimensions=BY_PATH.dimensions,
        aggregations=BY_PATH.aggregations,
        window="5m",
        out_of_orderness="0s",
    )
    config = load_config(
        overrides={
            "data_dir": str(tmp_path),
            "log.partitions": 2,
            "log.fsync": "never",
            "processor.max_groups": 200,
            "processor.max_batch_events": 400,
            "auth.admin_tokens": ["at_limits_test"],
            "metrics": [five],
        }
    )
    # Six 5-minute windows: 40 paths in the first four, 400 in the last two.
    rows = [
        r
        for w in range(6)
        for r in rows_for(800, 40 if w < 4 else 400, BASE + w * 5 * MIN, 5 * MIN, seed=w)
    ]
    fill_log(config, rows)
    log = open_log(config)
    serving = MemoryServingStore()
    processor = Processor(config, log, serving)
    store = Store.open(config)
    try:
        while processor.lag():
            processor.run_once(wait_s=0)
        processor.flush()
        assert processor.status()["over_limit_events"] > 0
        capped = [w for w in serving.progress().values() if "views_by_path_5m#capped_until" in w]
        assert capped
        for topic in ("events",):
            loader = Loader(
                log, store, SINKS[topic], tmp_path / "loader" / topic, dedup_horizon_ms=DAY
            )
            while loader.run_once(timeout_s=0):
                pass
            loader.close()
        pipeline = Pipeline(config=config, log=log, store=store, keyring=Keyring(config))
        pipeline.components["processor"] = processor
        client = TestClient(Starlette(routes=live_metric_routes(CoreAPI(pipeline))))
        body = client.get(
            "/v1/metrics/views_by_path_5m",
            params={"from": str(BASE), "to": str(BASE + 30 * MIN), "granularity": "5m"},
            headers={"Authorization": "Bearer at_limits_test"},
        ).json()
        # The serving store lacks the capped windows' refused groups ...
        live = serving.windows("views_by_path_5m", BASE + 20 * MIN, BASE + 30 * MIN)
        assert sum(state.count for state in live) < 1600
        # ... so every bucket up to the last capped window comes from the rollups.
        assert body["served_from"] == "rollup_5m", body
        by_bucket = {row["time"]: row["views"] for row in body["rows"]}
        assert sorted(by_bucket.values()) == [800] * 6
    finally:
        processor.close()
        store.close()
        log.close()


@pytest.fixture(params=["memory", "redis"])
def serving_store(request: pytest.FixtureRequest) -> Iterator[ServingStore]:
    if request.param == "memory":
        subject: ServingStore = MemoryServingStore()
    else:
        from strata.serving.redis import RedisServingStore

        url = request.getfixturevalue("redis_url")
        subject = RedisServingStore(url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield subject
    subject.clear()
    subject.close()


def test_the_serving_store_forgets_revised_ranges_before_a_bound(
    serving_store: ServingStore,
) -> None:
    serving_store.add_revised("m", [(0, MIN), (MIN, 2 * MIN), (5 * MIN, 6 * MIN)])
    serving_store.add_revised("other", [(0, MIN)])
    for _ in range(2):  # idempotent
        serving_store.prune_revised("m", MIN)
        assert serving_store.revised("m", 0, 10 * MIN) == [(MIN, 2 * MIN), (5 * MIN, 6 * MIN)]
    assert serving_store.revised("other", 0, 10 * MIN) == [(0, MIN)]


def test_the_processor_prunes_revised_ranges_when_their_windows_leave_retention(
    tmp_path: Path,
) -> None:
    config = load_config(
        overrides={
            "data_dir": str(tmp_path),
            "log.partitions": 1,
            "log.fsync": "never",
            "processor.final_retention": "2m",
            "processor.max_batch_events": 50,
            "metrics": [msgspec.to_builtins(BY_PATH)],
        }
    )
    before = rows_for(90, 3, BASE, 90_000, seed=1)  # up to minute 1.5
    late = rows_for(1, 3, BASE + 10_000, 1, seed=2)  # minute 0: final, still held
    after = rows_for(300, 3, BASE + 90_000, 8 * MIN, seed=3)
    fill_log(config, before + late + after)
    log = open_log(config)
    serving = MemoryServingStore()
    reported: list[tuple[int, int]] = []
    processor = Processor(config, log, serving, on_revised=lambda a, b: reported.append((a, b)))
    try:
        while processor.lag():
            processor.run_once(wait_s=0)
        processor.flush()
        assert reported == [(BASE, BASE + MIN)]
        # The window left retention long ago: its revised range went with it,
        # from the serving store and from the checkpointed engine state.
        assert serving.revised(BY_PATH.name, 0, 2**62) == []
        assert processor.status()["metrics"][BY_PATH.name]["revised_ranges"] == 0
    finally:
        processor.close()
        log.close()
