"""The processor over a real embedded log, with the loader storing its
outputs in chDB: final window results equal the rollups where no late data
arrived, late events reach `late_events`, and live windows reach the
serving store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.fixtures_processor import fill_log, make_events, read_topic

from strata.config import load_config
from strata.loader.loader import Loader
from strata.loader.sinks import SINKS
from strata.log import open_log
from strata.processor.runner import Processor
from strata.serving.memory import MemoryServingStore
from strata.serving.state import finalize, merge_values
from strata.store import Store
from strata.telemetry import REGISTRY


def drain(processor: Processor) -> None:
    while processor.lag():
        processor.run_once(wait_s=0)
    processor.flush()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("runner")
    config = load_config(
        overrides={
            "data_dir": str(tmp),
            "log.partitions": 4,
            "log.fsync": "never",
            "processor.max_batch_events": 3000,
            "auth.admin_tokens": ["at_processor_test"],
        }
    )
    events = make_events(30_000, late_share=0.01)
    fill_log(config, events)
    log = open_log(config)
    serving = MemoryServingStore()
    late_before = REGISTRY.counter_value("strata_late_events_total")
    processor = Processor(config, log, serving)
    drain(processor)
    late_counted = REGISTRY.counter_value("strata_late_events_total") - late_before
    store = Store.open(config)
    for topic, sink in SINKS.items():
        if topic not in ("events", "window_results", "late"):
            continue
        loader = Loader(log, store, sink, Path(tmp) / "loader" / topic, dedup_horizon_ms=86_400_000)
        while loader.run_once(timeout_s=0):
            pass
        loader.close()
    yield config, store, processor, serving, late_counted
    processor.close()
    store.close()
    log.close()


def test_final_results_equal_the_rollups_for_windows_without_late_data(loaded) -> None:
    config, store, processor, _, _ = loaded
    checked = revised_windows = 0
    for metric in processor.metrics:
        dims = ", ".join(metric.dimensions)
        _, rows = store.query_rows(
            "SELECT toUnixTimestamp64Milli(window_start), dims, aggregates FROM window_results "
            "WHERE metric = {m:String}",
            {"m": metric.name},
        )
        live = {
            (start, tuple(json.loads(d)[x] for x in metric.dimensions)): json.loads(a)
            for start, d, a in rows
        }
        assert live, metric.name
        _, late_rows = store.query_rows(
            "SELECT DISTINCT toUnixTimestamp64Milli(window_start) FROM late_events "
            "WHERE metric = {m:String}",
            {"m": metric.name},
        )
        late_windows = {r[0] for r in late_rows}
        selects = ", ".join(
            f"{a.merge_expression(a.alias)} AS {a.alias}" for a in metric.aggregations
        )
        _, rollup_rows = store.query_rows(
            f"SELECT toUnixTimestamp(window_start) * 1000 AS start{', ' + dims if dims else ''}, "
            f"{selects} FROM {metric.rollup_table('5m')} "
            f"GROUP BY start{', ' + dims if dims else ''}"
        )
        width = len(metric.dimensions)
        rollups = {
            (row[0], tuple(row[1 : 1 + width])): dict(
                zip([a.alias for a in metric.aggregations], row[1 + width :], strict=True)
            )
            for row in rollup_rows
        }
        for key, values in live.items():
            if key[0] in late_windows:
                revised_windows += 1
                continue
            expected = rollups[key]
            for alias, value in values.items():
                assert value == pytest.approx(expected[alias], rel=1e-9), (metric.name, key, alias)
            checked += 1
    assert checked > 100 and revised_windows > 0


def test_late_events_reach_the_side_output_table_and_the_counter(loaded) -> None:
    config, store, processor, serving, late_counted = loaded
    topic = read_topic(config, "late")
    assert len(topic) > 50
    assert store.scalar("SELECT count() FROM late_events") == len(topic)
    assert late_counted == len(topic)  # one record per (event, metric), no replays here

    # Each late event for a held window shows up as a revision of its window,
    # for as long as the window is held (then the range is pruned with it).
    def still_held(record: dict) -> bool:
        metric = processor.metrics_by_name[record["metric"]]
        watermark = processor.engine.watermark_ms(record["metric"])
        done = record["window_end"] + metric.allowed_lateness_ms + processor.retention_ms
        return done > watermark

    held = [r for r in topic.values() if r["window_held"]]
    assert any(still_held(r) for r in held) and not all(still_held(r) for r in held)
    for record in held:
        span = (record["window_start"], record["window_end"])
        revised = serving.revised(record["metric"], *span)
        assert (span in revised) == still_held(record), record


def test_serving_store_holds_open_and_recent_windows(loaded) -> None:
    _, store, processor, serving, _ = loaded
    metric = processor.metrics_by_name["page_views_by_country"]
    states = serving.windows(metric.name, 0, 2**62)
    assert any(not s.final for s in states) and any(s.final for s in states)
    watermark = processor.watermark_ms()
    assert watermark is not None
    for s in states:
        assert s.final == (s.window_end <= processor.engine.watermark_ms(metric.name))
    # Older windows were evicted after final_retention (1 h of event time).
    assert min(s.window_start for s in states) >= watermark - 3_600_000 - 2 * metric.window_ms
    # The open window's live numbers agree with the raw events.
    open_state = next(s for s in states if not s.final)
    count, values = merge_values(metric, [open_state])
    live = finalize(metric, count, values)
    raw = store.scalar(
        "SELECT count() FROM events WHERE event_type = 'page_view' AND country = {c:String} "
        "AND toUnixTimestamp64Milli(ts) >= {a:Int64} AND toUnixTimestamp64Milli(ts) < {b:Int64}",
        {"c": open_state.dims[0], "a": open_state.window_start, "b": open_state.window_end},
    )
    assert live["views"] == raw


def test_status_and_restart_resume_from_checkpoint(loaded) -> None:
    config, _, processor, _, _ = loaded
    status = processor.status()
    assert status["lag_events"] == 0 and status["shard"] == "all"
    assert status["metrics"]["page_views_by_country"]["open_windows"] >= 1
    # A second processor on the same directory resumes at the checkpoint:
    # nothing left to do, same watermark, nothing emitted twice.
    log = open_log(config)
    again = Processor(config, log, MemoryServingStore())
    assert again.lag() == 0 and again.watermark_ms() == processor.watermark_ms()
    before = len(read_topic(config, "window_results"))
    assert again.run_once(wait_s=0) == 0
    assert len(read_topic(config, "window_results")) == before
    again.close()
    log.close()


def test_metrics_route_merges_rollups_and_live_windows(loaded) -> None:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from strata.auth import Keyring
    from strata.query.api import CoreAPI
    from strata.server.pipeline import Pipeline
    from strata.serving.api import live_metric_routes

    config, store, processor, _, _ = loaded
    log = open_log(config)
    pipeline = Pipeline(config=config, log=log, store=store, keyring=Keyring(config))
    pipeline.components["processor"] = processor
    client = TestClient(Starlette(routes=live_metric_routes(CoreAPI(pipeline))))
    auth = {"Authorization": "Bearer at_processor_test"}
    watermark = processor.engine.watermark_ms("page_views_by_country")
    params = {
        "from": str(watermark - 4 * 3_600_000),
        "to": str(watermark + 600_000),
        "granularity": "5m",
        "group_by": "country",
    }
    response = client.get("/v1/metrics/page_views_by_country", params=params, headers=auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {
        "metric",
        "rows",
        "complete_until",
        "open_windows",
        "revised",
        "served_from",
    }
    assert body["served_from"] == "rollup_5m+serving"
    assert body["open_windows"] and body["revised"]
    total = sum(row["views"] for row in body["rows"])
    raw = store.scalar(
        "SELECT count() FROM events WHERE event_type = 'page_view' "
        "AND toUnixTimestamp64Milli(ts) >= {a:Int64} AND toUnixTimestamp64Milli(ts) < {b:Int64}",
        {"a": (watermark - 4 * 3_600_000) // 300_000 * 300_000, "b": watermark + 600_000},
    )
    # Live windows miss only the late events their windows no longer held.
    assert 0.97 * raw <= total <= raw
    hourly = client.get(
        "/v1/metrics/page_views_by_country",
        params={**params, "granularity": "1h", "group_by": ""},
        headers=auth,
    ).json()
    assert all(set(row) == {"time", "views", "users"} for row in hourly["rows"])

    assert client.get("/v1/metrics/nope", headers=auth).status_code == 404
    assert "unknown metric" in client.get("/v1/metrics/nope", headers=auth).json()["error"]
    bad = client.get("/v1/metrics/page_views_by_country", params={"group_by": "os"}, headers=auth)
    assert bad.status_code == 400 and "'os'" in bad.json()["error"]
    assert client.get("/v1/metrics/retention", headers=auth).status_code == 404
    assert client.get("/v1/metrics/page_views_by_country").status_code == 401
    log.close()


def test_processors_splitting_partitions_merge_to_the_single_processor_result(
    tmp_path: Path,
) -> None:
    config = load_config(
        overrides={"data_dir": str(tmp_path), "log.partitions": 4, "log.fsync": "never"}
    )
    fill_log(config, make_events(8_000, seed=3, late_share=0.0))
    log = open_log(config)
    shared = MemoryServingStore()
    shards = [
        Processor(config, log, shared, partitions=[0, 1]),
        Processor(config, log, shared, partitions=[2, 3]),
    ]
    assert [p.shard for p in shards] == ["p0-1", "p2-3"]
    for processor in shards:
        drain(processor)
    single_store = MemoryServingStore()
    single = Processor(config, log, single_store, directory=tmp_path / "single")
    drain(single)
    metric = single.metrics_by_name["page_views_by_country"]
    expected = {
        (s.window_start, tuple(s.dims)): finalize(metric, *merge_values(metric, [s]))
        for s in single_store.windows(metric.name, 0, 2**62)
        if s.final
    }
    merged: dict[tuple[int, tuple[str, ...]], list] = {}
    for s in shared.windows(metric.name, 0, 2**62):
        merged.setdefault((s.window_start, tuple(s.dims)), []).append(s)
    got = {
        key: finalize(metric, *merge_values(metric, states))
        for key, states in merged.items()
        if key in expected and all(s.final for s in states)
    }
    assert len(expected) > 10 and got == expected
    assert set(shared.progress()) == {"p0-1", "p2-3"}
    for processor in [*shards, single]:
        processor.close()
    log.close()


def test_revised_ranges_are_reported_to_the_query_layer_hook(tmp_path: Path) -> None:
    config = load_config(
        overrides={"data_dir": str(tmp_path), "log.partitions": 2, "log.fsync": "never"}
    )
    fill_log(config, make_events(4_000, seed=5, late_share=0.03))
    log = open_log(config)
    serving = MemoryServingStore()
    reported: list[tuple[int, int]] = []
    processor = Processor(config, log, serving, on_revised=lambda a, b: reported.append((a, b)))
    drain(processor)
    recorded = {r for m in processor.metrics for r in serving.revised(m.name, 0, 2**62)}
    assert recorded and recorded <= set(reported)
    # The rest were pruned with their windows, once those left retention.
    newest = max(processor.engine.watermark_ms(m.name) for m in processor.metrics)
    for start, end in set(reported) - recorded:
        assert end + processor.retention_ms <= newest, (start, end)
    processor.close()
    log.close()
