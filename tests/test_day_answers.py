"""Finalized per-day answers (decision 096) on a real embedded log, loader
and chDB store: exact against the rollup states and a Python reference,
never finalized ahead of the loader, recomputed after late data, and
backfilled by a restarted process."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.testclient import TestClient
from tests.fixtures_lake import config_for, make_events, produce
from tests.fixtures_query import finalizer_for

from strata.events import EventRecord
from strata.query import sandbox
from strata.query.api import CoreAPI, core_routes
from strata.query.day_answers import day_of
from strata.server.pipeline import Pipeline

DAY_MS = 86_400_000
ADMIN = "adm_day_answers"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def base_day(days_ago: int) -> int:
    now = int(datetime.now(UTC).timestamp() * 1000)
    return now - now % DAY_MS - days_ago * DAY_MS


class Env:
    """A loading pipeline whose finalizer sees a watermark set by the test
    (the processor's input), with the real log end offsets and loader."""

    def __init__(self, tmp: Path, cache_ttl: str = "0s") -> None:
        self.config = config_for(
            tmp,
            **{
                "auth.admin_tokens": [ADMIN],
                "query.cache_ttl": cache_ttl,
                "query.open_range_cache_ttl": "0s",
            },
        )
        self.pipeline = Pipeline.open_loading(self.config)
        self.watermark: int | None = None
        self.finalizer = finalizer_for(self.pipeline, lambda: self.watermark)
        self.pipeline.query.watermark = lambda: self.watermark  # the same for answers' flags
        self.client = TestClient(Starlette(routes=core_routes(CoreAPI(self.pipeline))))

    def produce(self, events: list[EventRecord]) -> None:
        produce(self.pipeline.log, events, self.config.log.partitions)

    def load(self) -> None:
        loader = self.pipeline.loaders["events"]
        while loader.run_once(timeout_s=0.05):
            pass
        assert loader.lag() == 0

    def step(self, times: int = 2) -> None:
        for _ in range(times):  # snapshot, then its completion
            self.finalizer.step()

    def dau(self, start: int, end: int) -> dict[str, Any]:
        response = self.client.get(
            "/v1/metrics/dau",
            params={"from": iso(start), "to": iso(end)},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert response.status_code == 200, response.text
        return response.json()

    def table(self) -> dict[date, tuple[int, int]]:
        """day -> (value, stale) of active_users.users, latest version."""
        _, rows = self.pipeline.store.query_rows(
            "SELECT day, argMax(value, version), argMax(stale, version) FROM day_answers "
            "WHERE metric = 'active_users' AND aggregation = 'users' GROUP BY day"
        )
        return {day: (int(value), int(stale)) for day, value, stale in rows}

    def rollup_merge(self) -> dict[date, int]:
        _, rows = self.pipeline.store.query_rows(
            "SELECT toDate(window_start) AS day, uniqCombinedMerge(users) "
            "FROM rollup_active_users_1d GROUP BY day"
        )
        return {day: int(n) for day, n in rows}

    def close(self) -> None:
        self.pipeline.stop()


def dau_sql(start: int, end: int) -> str:
    def literal(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")

    return (
        f"SELECT toDate(ts) AS day, uniq(distinct_id) AS users FROM events WHERE "
        f"ts >= '{literal(start)}' AND ts < '{literal(end)}' GROUP BY day ORDER BY day"
    )


def reference(events: list[EventRecord]) -> dict[date, int]:
    users: dict[date, set[str]] = defaultdict(set)
    for event in events:
        users[day_of(event.ts)].add(event.distinct_id)
    return {day: len(u) for day, u in users.items()}


def test_finalized_days_exact_gated_by_loader_revised_and_backfilled(tmp_path: Path) -> None:
    base = base_day(8)
    env = Env(tmp_path)
    events = [
        e
        for k in range(3)
        for e in make_events(600, start_ms=base + k * DAY_MS, users=120 + 40 * k, seed=k)
    ]
    env.produce(events)
    env.load()

    # Nothing is final before the watermark passes a day's end.
    env.step()
    assert env.table() == {}

    env.watermark = base + 3 * DAY_MS + 60_000
    env.step()
    table = env.table()
    merged, ref = env.rollup_merge(), reference(events)
    days = [day_of(base + k * DAY_MS) for k in range(3)]
    assert sorted(table) == days
    for day in days:
        # Exactly the rollup's merged states; uniqCombined is exact at these
        # cardinalities (docs/query.md: its error starts in the thousands).
        assert table[day] == (merged[day], 0)
        assert merged[day] == ref[day]
    assert env.finalizer.frontier == day_of(base + 3 * DAY_MS)

    body = env.dau(base, base + 4 * DAY_MS)
    assert body["served_from"].startswith("day_answers")
    assert body["days_answered"] == 3 and body["days_computed"] == 1
    assert {r["day"]: r["users"] for r in body["rows"]} == {d.isoformat(): ref[d] for d in days}
    assert body["revised"] is False
    assert body["answered_until"] == iso(base + 3 * DAY_MS)
    # The same numbers as the SQL router's rollup route, and SQL asking
    # exactly that over finalized days reads the table (it says so).
    service = env.pipeline.query
    rollup_route = service.router.route(sandbox.check(dau_sql(base, base + 3 * DAY_MS)))
    assert rollup_route.served_from == "rollup_1d"
    _, rollup_rows = env.pipeline.store.query_rows(rollup_route.sql)
    assert {row[0]: int(row[1]) for row in rollup_rows} == {d: table[d][0] for d in days}
    routed = service.sql("admin", dau_sql(base, base + 3 * DAY_MS))
    assert routed.meta["served_from"] == "day_answers"
    assert routed.columns == ["day", "users"] and routed.rows == rollup_rows
    _, explained = service.plan(dau_sql(base, base + 3 * DAY_MS))
    assert explained.served_from == "day_answers" and "day_answers" in explained.sql
    # Past the frontier: the rollup route.
    assert service.sql("admin", dau_sql(base, base + 4 * DAY_MS)).meta["served_from"] != (
        "day_answers"
    )

    # Day 4 is in the log but not loaded: the watermark passing its end is
    # not enough.
    day4 = make_events(300, start_ms=base + 3 * DAY_MS, users=90, seed=7)
    env.produce(day4)
    env.watermark = base + 4 * DAY_MS + 60_000
    env.step()
    assert day_of(base + 3 * DAY_MS) not in env.table()
    assert env.finalizer.frontier == day_of(base + 3 * DAY_MS)
    env.load()
    env.step()
    assert env.table()[day_of(base + 3 * DAY_MS)] == (reference(day4)[day_of(base + 3 * DAY_MS)], 0)

    # Late data into a finalized day, reported (as the processor does) before
    # the loader stored it: the day is read from the rollups, and it is not
    # recomputed until the loader has stored what was in the log then.
    late = make_events(200, start_ms=base + DAY_MS, users=500, seed=11, prefix="late")
    env.produce(late)
    env.pipeline.on_revised(base + DAY_MS + 1000, base + DAY_MS + 300_000)
    env.step()
    assert env.table()[days[1]][1] == 1  # tombstoned, not recomputed
    assert service.day_answer_route(rollup_route) is None  # a stale day in the range
    env.load()
    body = env.dau(base, base + 4 * DAY_MS)
    after = reference([*events, *late])
    assert body["revised"] is True
    assert "rollup" in body["served_from"]
    assert {r["day"]: r["users"] for r in body["rows"]}[days[1].isoformat()] == after[days[1]]
    assert after[days[1]] > ref[days[1]]
    env.step()
    assert env.table()[days[1]] == (after[days[1]], 0)
    assert env.rollup_merge()[days[1]] == after[days[1]]
    body = env.dau(base, base + 4 * DAY_MS)
    assert body["days_answered"] == 4
    assert {r["day"]: r["users"] for r in body["rows"]}[days[1].isoformat()] == after[days[1]]

    # A revision left pending at shutdown survives it (its tombstone), and a
    # restarted process answers from the table at once, then recomputes.
    late2 = make_events(150, start_ms=base, users=400, seed=13, prefix="late2")
    env.produce(late2)
    env.load()
    env.pipeline.on_revised(base, base + 1)
    env.close()

    env = Env(tmp_path)
    body = env.dau(base, base + 4 * DAY_MS)
    assert body["served_from"].startswith("day_answers")
    assert body["days_answered"] == 3  # day 0 is stale: from the rollups
    final = reference([*events, *late, *late2, *day4])
    assert {r["day"]: r["users"] for r in body["rows"]}[days[0].isoformat()] == final[days[0]]
    env.watermark = base + 4 * DAY_MS + 60_000
    env.step()
    assert env.table()[days[0]] == (final[days[0]], 0)
    env.close()


def test_restart_backfills_days_with_no_answers(tmp_path: Path) -> None:
    """Data stored by a process that never finalized (an older version, or
    a crash before the first pass): the next start answers every day."""
    base = base_day(5)
    env = Env(tmp_path)
    events = make_events(400, start_ms=base, span_ms=2 * DAY_MS, users=80, seed=21)
    env.produce(events)
    env.load()
    env.close()

    env = Env(tmp_path, cache_ttl="600s")
    assert env.table() == {}
    body = env.dau(base, base + 2 * DAY_MS)
    assert not body["served_from"].startswith("day_answers")  # per-day cache path
    env.watermark = base + 2 * DAY_MS + 60_000
    env.step()
    ref = reference(events)
    assert {d: v for d, (v, _) in env.table().items()} == ref
    body = env.dau(base, base + 2 * DAY_MS)
    assert body["served_from"] == "day_answers"
    assert body["days_computed"] == 0 and body["cache"] == "miss"
    # A complete range is result-cached like any answer; late data drops it.
    assert env.dau(base, base + DAY_MS)["cache"] == "miss"
    assert env.dau(base, base + DAY_MS)["cache"] == "hit"
    env.pipeline.on_revised(base, base + 1)  # the day is read from the rollups until recomputed
    revised = env.dau(base, base + DAY_MS)
    assert revised["cache"] == "miss" and revised["revised"] is True
    assert revised["days_computed"] == 1 and revised["served_from"] != "day_answers"
    env.step()
    body = env.dau(base, base + 2 * DAY_MS)
    assert {r["day"]: r["users"] for r in body["rows"]} == {
        d.isoformat(): n for d, n in ref.items()
    }
    env.close()

    # `strata delete-user` without a server rewrites the user's days from
    # raw; no loader runs there, so the answers are recomputed at once.
    from strata.lake.cli import _Local
    from strata.lake.gdpr import delete_user

    gone = events[0].distinct_id
    day = day_of(events[0].ts)
    local = _Local(env.config)
    try:
        report = delete_user(
            gone,
            store=local.store,
            lake=local.lake,
            batch=local.job,
            deleted_users=local.deleted_users,
        )
        assert day.isoformat() in report.days_recomputed
        _, rows = local.store.query_rows(
            "SELECT day, argMax(value, version), argMax(stale, version) FROM day_answers "
            "WHERE metric = 'active_users' AND aggregation = 'users' GROUP BY day"
        )
        after = reference([e for e in events if e.distinct_id != gone])
        assert {d: (int(v), int(st)) for d, v, st in rows}[day] == (after[day], 0)
        assert after[day] == ref[day] - 1
    finally:
        local.close()


def test_plans_of_clock_independent_sql_are_kept(tmp_path: Path) -> None:
    env = Env(tmp_path)
    service = env.pipeline.query
    fixed = (
        "SELECT toDate(ts) AS t, count() AS n FROM events "
        "WHERE ts >= '2026-01-01 00:00:00' AND ts < '2026-01-02 00:00:00' GROUP BY t"
    )
    relative = "SELECT count() FROM events WHERE ts >= now() - INTERVAL 1 HOUR"
    first = service.sql("a", fixed)
    assert fixed in service._plans and first.meta["served_from"].startswith("rollup")
    assert service.sql("b", fixed).meta["served_from"] == first.meta["served_from"]
    service.sql("a", relative)
    assert relative not in service._plans  # its range moves with the clock
    env.close()


def test_late_events_outside_held_windows_mark_the_day(tmp_path: Path) -> None:
    """A late event the processor no longer holds reaches only late_events;
    the finalizer follows that table and recomputes the day."""
    base = base_day(6)
    env = Env(tmp_path)
    events = make_events(300, start_ms=base, users=60, seed=31)
    env.produce(events)
    env.load()
    env.watermark = base + DAY_MS + 60_000
    env.step()
    assert env.table()[day_of(base)] == (reference(events)[day_of(base)], 0)

    late = make_events(50, start_ms=base, users=300, seed=32, prefix="gone")
    env.produce(late)
    env.load()
    # The side output row, as the loader stores it from topic "late".
    row = late[0]
    env.pipeline.store.command(
        "INSERT INTO late_events (id, metric, event_id, event_type, distinct_id, ts, "
        "received_at, window_start, window_end, watermark, window_held, emitted_at, "
        "_partition, _offset) VALUES ({id:String}, 'active_users', {eid:String}, 'x', "
        "{did:String}, fromUnixTimestamp64Milli({ts:Int64}), now64(3), "
        "fromUnixTimestamp64Milli({ws:Int64}), fromUnixTimestamp64Milli({we:Int64}), now64(3), "
        "false, now64(3), 0, 0)",
        {
            "id": "l1",
            "eid": row.event_id,
            "did": row.distinct_id,
            "ts": row.ts,
            "ws": row.ts - row.ts % 300_000,
            "we": row.ts - row.ts % 300_000 + 300_000,
        },
    )
    env.step()
    status = env.finalizer.status()
    assert status["days_recomputed"] >= 1
    assert env.table()[day_of(base)] == (reference([*events, *late])[day_of(base)], 0)
    assert env.dau(base, base + DAY_MS)["revised"] is True
    env.close()


def test_rows_loaded_after_a_restart_into_a_final_day_revise_it(tmp_path: Path) -> None:
    """Events of a finalized day that were in the log but not loaded when the
    process stopped: the next process loads them before its finalizer has
    confirmed a frontier. The stored frontier still counts, so the day is
    revised (read from the rollups, then recomputed), never answered from
    the old finalized value."""
    base = base_day(6)
    env = Env(tmp_path)
    events = make_events(400, start_ms=base, users=150, seed=21)
    env.produce(events)
    env.load()
    env.watermark = base + DAY_MS + 60_000
    env.step()
    assert env.table()[day_of(base)] == (reference(events)[day_of(base)], 0)
    extra = make_events(300, start_ms=base, users=100, seed=22, prefix="extra")
    env.produce(extra)  # in the log, not loaded
    env.close()

    env = Env(tmp_path)
    try:
        assert env.pipeline.query.day_answers.local_frontier is None
        env.load()
        expected = reference([*events, *extra])[day_of(base)]
        assert expected > reference(events)[day_of(base)]
        body = env.dau(base, base + DAY_MS)
        assert {r["day"]: r["users"] for r in body["rows"]} == {day_of(base).isoformat(): expected}
        env.watermark = base + DAY_MS + 60_000
        env.step(6)
        assert env.table()[day_of(base)] == (expected, 0)
        body = env.dau(base, base + DAY_MS)
        assert body["served_from"].startswith("day_answers")
        assert {r["day"]: r["users"] for r in body["rows"]} == {day_of(base).isoformat(): expected}
    finally:
        env.close()
