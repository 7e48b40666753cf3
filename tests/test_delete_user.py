"""delete-user: the user is gone from every layer, other users' metrics are
unchanged, counts and distinct counts lose exactly the user's contribution,
and the log's copies are masked from every read path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures_lake import LakeEnv, day_start_ms, make_events, today_minus
from strata.lake.gdpr import delete_user

USER = "u3"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[LakeEnv]:
    lake_env = LakeEnv(tmp_path)
    for index, day in enumerate((today_minus(3), today_minus(2))):
        lake_env.produce(make_events(1500, start_ms=day_start_ms(day), seed=90 + index, users=20))
    lake_env.load()
    lake_env.archive()
    yield lake_env
    lake_env.close()


def _per_day(env: LakeEnv, where: str) -> dict[str, tuple[int, int]]:
    _, rows = env.store.query_rows(
        f"SELECT toString(toDate(ts)) AS d, count(), uniqExact(distinct_id) FROM events "
        f"WHERE {where} GROUP BY d ORDER BY d"
    )
    return {d: (int(c), int(u)) for d, c, u in rows}


def _rollup_per_day(env: LakeEnv) -> dict[str, tuple[int, int]]:
    out = {}
    for window_start, users, events in env.rollup("active_users", "1d"):
        out[window_start.date().isoformat()] = (events, users)
    return out


def test_delete_user_removes_the_user_from_every_layer(env: LakeEnv) -> None:
    match = f"user_id = '{USER}' OR distinct_id = '{USER}'"
    others = _per_day(env, f"NOT ({match})")
    mine = _per_day(env, match)
    assert mine and all(c > 0 for c, _ in mine.values())
    assert _rollup_per_day(env) == {
        d: (others[d][0] + mine.get(d, (0, 0))[0], others[d][1] + 1) for d in others
    }
    others_pages = env.store.scalar(
        f"SELECT count() FROM events WHERE event_type = 'page_view' AND NOT ({match})"
    )

    # Side tables with the user: late events (processor) and identities.
    for who in (USER, "u4"):
        env.store.command(
            "INSERT INTO late_events (id, event_id, distinct_id, ts, window_start, received_at) "
            "VALUES ({w:String}, {w:String}, {w:String}, now64(), now64(), now64())",
            {"w": who},
        )
        env.store.command(
            "INSERT INTO identities (event_id, user_id, distinct_id, ts) "
            "VALUES ({w:String}, {w:String}, {w:String}, now64())",
            {"w": who},
        )

    report = delete_user(
        USER, store=env.store, lake=env.lake, batch=env.job, deleted_users=env.deleted_users
    )
    assert report.other_tables == {"identities": 1, "late_events": 1}
    for table in ("late_events", "identities"):
        _, left = env.store.query_rows(f"SELECT distinct_id FROM {table}")
        assert left == [("u4",)]
    assert report.raw_rows == sum(c for c, _ in mine.values())
    assert report.lake_rows == report.raw_rows
    assert sorted(report.days_recomputed) == sorted(mine)

    # Raw table and lake: nothing of the user.
    assert env.store.scalar(f"SELECT count() FROM events WHERE {match}") == 0
    lake_rows = env.lake.read(env.lake.files())
    assert USER not in set(lake_rows.column("user_id").to_pylist())
    assert USER not in set(lake_rows.column("distinct_id").to_pylist())
    assert lake_rows.num_rows == sum(c for c, _ in others.values())
    # Rollups: counts and distinct counts lose exactly the user.
    assert _rollup_per_day(env) == others
    pages = sum(row[2] for row in env.rollup("page_views_by_country", "1d"))
    assert pages == others_pages

    # The log still holds the records: every read path masks them.
    before = env.all_rollups()
    from strata.lake.replay import replay

    start = day_start_ms(today_minus(3))
    replay(env.job, start, start + 2 * 86_400_000, source="log")
    assert env.all_rollups() == before
    # A fresh archiver over the same log (e.g. a new lake) skips them too.
    from strata.lake.archiver import Archiver
    from strata.lake.base import Lake

    config = env.config
    fresh_lake = Lake(str(config.data_path / "lake2"), str(config.data_path / "lake2-cold"))
    fresh = Archiver(
        env.log, fresh_lake, config.data_path / "archiver2",
        deleted_users=env.deleted_users, dedup_horizon_ms=86_400_000,
    )
    fresh.drain()
    fresh.close()
    archived = fresh_lake.read(fresh_lake.files())
    assert USER not in set(archived.column("distinct_id").to_pylist())
    assert archived.num_rows == lake_rows.num_rows


def test_events_sent_after_the_deletion_are_kept(env: LakeEnv) -> None:
    delete_user(USER, store=env.store, lake=env.lake, batch=env.job, deleted_users=env.deleted_users)
    from strata.events import now_ms

    later = make_events(10, start_ms=day_start_ms(today_minus(1)), seed=7, users=1,
                        prefix="after", received_at_ms=now_ms() + 5_000)
    for event in later:
        event.user_id = event.distinct_id = USER
        event.anonymous_id = ""
    env.produce(later)
    env.archive()
    archived = env.lake.read(env.lake.files())
    assert archived.column("distinct_id").to_pylist().count(USER) == 10


def test_admin_api_requires_the_admin_scope(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from fixtures_lake import config_for
    from strata.lake.api import lake_routes
    from strata.server.pipeline import Pipeline

    config = config_for(
        tmp_path, **{"auth.admin_tokens": ["admin-secret"], "auth.query_tokens": ["reader"]}
    )
    pipeline = Pipeline.open(config)
    try:
        client = TestClient(Starlette(routes=lake_routes(pipeline)))
        url = "/v1/admin/delete-user"
        assert client.post(url, json={"user_id": "x"}).status_code == 401
        denied = client.post(url, json={"user_id": "x"}, headers={"Authorization": "Bearer reader"})
        assert denied.status_code == 403
        admin = {"Authorization": "Bearer admin-secret"}
        bad = client.post(url, json={"user": "x"}, headers=admin)
        assert bad.status_code == 400 and "user_id" in bad.json()["error"]
        ok = client.post(url, json={"user_id": "nobody"}, headers=admin)
        assert ok.status_code == 200 and ok.json()["raw_rows"] == 0
        bad_day = client.post("/v1/admin/batch", json={"date": "yesterday"}, headers=admin)
        assert bad_day.status_code == 400 and "date" in bad_day.json()["error"]
    finally:
        pipeline.stop()
