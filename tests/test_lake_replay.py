"""Replay: over a range that is already right it changes nothing; after the
rollups of a range are corrupted it repairs them, from the log (Kappa) and
from the lake (Lambda)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures_lake import DAY_MS, LakeEnv, day_start_ms, make_events, today_minus
from strata.lake.batch import BatchError
from strata.lake.replay import days_between, replay


@pytest.fixture
def env(tmp_path: Path) -> Iterator[LakeEnv]:
    lake_env = LakeEnv(tmp_path)
    for index, day in enumerate((today_minus(3), today_minus(2))):
        lake_env.produce(make_events(1500, start_ms=day_start_ms(day), seed=60 + index))
    # Client retries later in the log: replay from the log must not count them.
    lake_env.produce(make_events(1500, start_ms=day_start_ms(today_minus(2)), seed=61)[:100])
    lake_env.load()
    lake_env.archive()
    yield lake_env
    lake_env.close()


def _corrupt(env: LakeEnv, day: str) -> None:
    """A streaming bug for two hours: the day's events counted twice there."""
    start = day_start_ms(day) + 6 * 3_600_000
    for metric in env.store.metrics:
        for granularity in ("5m", "1d"):
            from strata.store.ddl import GRANULARITIES

            bucket = GRANULARITIES[granularity][0]
            dims = "".join(f", {d}" for d in metric.dimensions)
            states = ", ".join(a.state_expression for a in metric.aggregations)
            env.store.command(
                f"INSERT INTO {metric.rollup_table(granularity)} "
                f"SELECT {bucket} AS window_start{dims}, {states} FROM events "
                f"WHERE ({metric.qualified_filter_sql('events')}) "
                f"AND ts >= fromUnixTimestamp64Milli({{a:Int64}}) "
                f"AND ts < fromUnixTimestamp64Milli({{b:Int64}}) GROUP BY window_start{dims}",
                {"a": start, "b": start + 2 * 3_600_000},
            )


@pytest.mark.parametrize("source", ["log", "lake"])
def test_replay_of_a_correct_range_changes_nothing(env: LakeEnv, source: str) -> None:
    before = env.all_rollups()
    start = day_start_ms(today_minus(3))
    used, rows = replay(env.job, start, start + 2 * DAY_MS, source=source)
    assert used == source
    assert {r.day.isoformat() for r in rows} == {today_minus(3), today_minus(2)}
    assert env.all_rollups() == before
    assert all(r.difference == 0 and r.changed_windows == 0 for r in rows)


@pytest.mark.parametrize("source", ["log", "lake"])
def test_replay_repairs_corrupted_rollups(env: LakeEnv, source: str) -> None:
    before = env.all_rollups()
    day = today_minus(2)
    _corrupt(env, day)
    assert env.all_rollups() != before
    start = day_start_ms(day) + 6 * 3_600_000
    used, rows = replay(env.job, start, start + 2 * 3_600_000, source=source)
    assert used == source
    assert env.all_rollups() == before
    events = next(r for r in rows if r.metric == "events_by_type" and r.aggregation == "events")
    assert events.difference < 0 and events.changed_windows > 0


def test_replay_for_one_metric_touches_only_that_metric(env: LakeEnv) -> None:
    before = env.all_rollups()
    day = today_minus(2)
    _corrupt(env, day)
    corrupted = env.all_rollups()
    start = day_start_ms(day)
    replay(env.job, start, start + DAY_MS, source="lake", metrics=["active_users"])
    after = env.all_rollups()
    for name in after:
        expected = before if name.startswith("active_users") else corrupted
        assert after[name] == expected[name], name


def test_bad_ranges_are_refused(env: LakeEnv) -> None:
    with pytest.raises(BatchError, match="--to"):
        days_between(1000, 1000)
    with pytest.raises(BatchError, match="unknown metric"):
        replay(env.job, 0, DAY_MS, source="lake", metrics=["nope"])
