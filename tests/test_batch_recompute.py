"""Batch recompute from the lake (local and S3): equal to the streaming
rollups without late data, a repair with late data, exact and idempotent;
backfill of a newly added metric over the whole lake."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures_lake import (
    DAY_MS,
    LakeEnv,
    create_bucket,
    day_start_ms,
    make_events,
    moto_s3,
    today_minus,
)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LakeEnv]:
    overrides: dict[str, str] = {}
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"batch-{random.randrange(10**9)}"
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        create_bucket(endpoint, bucket)
        overrides = {
            "lake.path": f"s3://{bucket}/hot",
            "lake.cold_path": f"s3://{bucket}/cold",
            "lake.s3_endpoint": endpoint,
        }
    lake_env = LakeEnv(tmp_path, **overrides)
    yield lake_env
    lake_env.close()


def _streamed_day(env: LakeEnv, day: str) -> None:
    env.produce(make_events(2500, start_ms=day_start_ms(day), seed=21))
    env.load()
    env.archive()


def test_without_late_data_batch_equals_streaming(env: LakeEnv) -> None:
    day = today_minus(2)
    _streamed_day(env, day)
    before = env.all_rollups()
    rows = env.job.recompute_day(day)
    assert env.all_rollups() == before
    assert rows and all(r.difference == 0 and r.changed_windows == 0 for r in rows)
    assert all(r.late_events == 0 for r in rows)
    views = next(r for r in rows if r.metric == "events_by_type" and r.aggregation == "events")
    assert views.batch_value == views.streaming_value == 2500
    # Idempotent: running it again changes nothing either.
    env.job.recompute_day(day)
    assert env.all_rollups() == before
    stored = env.store.scalar(
        "SELECT count() FROM reconciliation WHERE day = {d:Date}", {"d": day}
    )
    assert stored == 2 * len(rows)


def test_late_data_beyond_lateness_is_repaired_and_reported(env: LakeEnv) -> None:
    """The live path finalizes a window without the events that arrive after
    it is final. Here the rollups are set back to exactly what they held
    before the late events arrived (what a speed layer that drops late data
    shows); the lake has every event, and the batch repairs the day."""
    day = today_minus(2)
    _streamed_day(env, day)
    on_time = env.all_rollups()
    tables = [f"rollup_{m.name}_{g}" for m in env.store.metrics for g in ("5m", "1d")]
    for table in tables:
        env.store.command(f"CREATE TABLE snapshot_{table} AS {table}")
        env.store.command(f"INSERT INTO snapshot_{table} SELECT * FROM {table}")
    # 300 events of the day, received two days after it ended.
    late = make_events(
        300, start_ms=day_start_ms(day), seed=99, prefix="late",
        received_at_ms=day_start_ms(day) + 3 * DAY_MS,
    )
    env.produce(late)
    env.load()
    env.archive()
    for table in tables:
        # 5-minute rollups are partitioned by day, daily ones by month (decision 080).
        partition_id = day.replace("-", "")[: 6 if table.endswith("_1d") else 8]
        env.store.command(
            f"ALTER TABLE {table} REPLACE PARTITION ID '{partition_id}' FROM snapshot_{table}"
        )
    assert env.all_rollups() == on_time

    rows = env.job.recompute_day(day)
    events = next(r for r in rows if r.metric == "events_by_type" and r.aggregation == "events")
    assert (events.streaming_value, events.batch_value, events.difference) == (2500, 2800, 300)
    assert events.late_events == 300
    assert events.changed_windows > 0
    views = next(r for r in rows if r.metric == "page_views_by_country" and r.aggregation == "views")
    assert views.difference == sum(1 for e in late if e.event_type == "page_view")
    # The repaired rollups equal the raw table's truth for every metric.
    total = env.store.scalar(
        "SELECT count() FROM events WHERE toDate(ts) = {d:Date}", {"d": day}
    )
    assert total == 2800
    assert sum(r[-1] for r in env.rollup("active_users", "5m")) == 2800
    assert sum(r[-1] for r in env.rollup("active_users", "1d")) == 2800


def test_events_not_yet_loaded_are_left_to_the_loader(env: LakeEnv) -> None:
    """The archiver ran ahead of the loader: the batch must not count lake
    rows the loader has not loaded, or the rollups would count them twice."""
    day = today_minus(2)
    _streamed_day(env, day)
    env.produce(make_events(200, start_ms=day_start_ms(day), seed=5, prefix="x"))
    env.archive()  # archived, not loaded
    env.job.recompute_day(day)
    env.load()  # the materialized views add them now, exactly once
    assert sum(r[-1] for r in env.rollup("active_users", "1d")) == 2700
    rows = env.job.recompute_day(day)
    assert [r.as_dict() for r in rows if r.difference] == []


def test_backfill_computes_a_new_metric_over_the_whole_lake(tmp_path: Path) -> None:
    first = LakeEnv(tmp_path)
    days = [today_minus(3), today_minus(2), today_minus(1)]
    for index, day in enumerate(days):
        first.produce(make_events(800, start_ms=day_start_ms(day), seed=40 + index))
    first.load()
    first.archive()
    first.close()

    from strata.config import MetricConfig, default_metrics

    metrics = [m for m in default_metrics()] + [
        MetricConfig(
            name="clicks_by_path",
            filter="event_type = 'click'",
            dimensions=["path"],
            aggregations={"clicks": "count()", "users": "uniq(distinct_id)"},
        )
    ]
    env = LakeEnv(tmp_path, metrics=[_as_dict(m) for m in metrics])
    try:
        assert env.rollup("clicks_by_path", "1d") == []
        rows = env.job.backfill("clicks_by_path")
        assert {r.day.isoformat() for r in rows} == set(days)
        _, expected = env.store.query_rows(
            "SELECT toDate(ts) AS d, count() FROM events WHERE event_type = 'click' "
            "GROUP BY d ORDER BY d"
        )
        daily = env.rollup("clicks_by_path", "1d")
        per_day: dict[object, int] = {}
        for row in daily:
            per_day[row[0].date()] = per_day.get(row[0].date(), 0) + row[2]
        assert sorted(per_day.items()) == [(d, c) for d, c in expected]
        five_minute_total = sum(r[2] for r in env.rollup("clicks_by_path", "5m"))
        assert five_minute_total == sum(c for _, c in expected)
    finally:
        env.close()


def _as_dict(metric: object) -> dict[str, object]:
    import msgspec

    return msgspec.to_builtins(metric)
