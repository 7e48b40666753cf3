"""Heavy lanes (decision 103, audit 5 bug 1): one user's long raw query runs
on an extra client of the store, so other users' rollup-routed SQL and the
events loader are not held behind it.

Real chDB and a real loading pipeline (log + loader threads, Pipeline.start),
the SQL API through its HTTP routes. The long query runs until it is killed
(KILL QUERY through the main client), so "still running" is a fact checked
by its thread being alive with no answer, never by a clock."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from tests.fixtures_query import DAY_MS, base_day_ms, load, make_rows

from strata.config import ConfigError, load_config
from strata.events import Normalizer, now_ms
from strata.query.api import CoreAPI, core_routes
from strata.server.pipeline import Pipeline
from strata.store import HeavyLanesBusy, Store, StoreError

# Long enough that only KILL ends the slow queries below (the test kills them).
MAX_EXECUTION_S = 600
# Every row of events x events x events: billions of hashes for 2,000 rows.
SLOW_SQL = (
    "SELECT count() AS n FROM events AS a CROSS JOIN events AS b CROSS JOIN events AS c "
    "WHERE cityHash64(a.event_id, b.event_id, c.event_id) % 7 = 3 AND a.event_id != '{marker}'"
)
# Waiting for a condition that must happen (a query to show up, a row to be
# loaded): generous, and failing only when it never happens.
PATIENCE_S = 120.0
FUNNEL = {"steps": [{"event_type": "page_view"}, {"event_type": "purchase"}], "window": "1d"}


class Env:
    def __init__(
        self, pipeline: Pipeline, client: TestClient, rows: list[dict[str, Any]], base: int,
        tokens: dict[str, str],
    ) -> None:
        self.pipeline = pipeline
        self.client = client
        self.rows = rows
        self.base = base
        self.tokens = tokens

    @property
    def store(self) -> Store:
        return self.pipeline.store

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def sql(self, user: str, sql: str) -> Any:
        return self.client.post("/v1/sql", json={"sql": sql}, headers=self.headers(user))

    def running(self, marker: str) -> int:
        """Queries carrying ``marker`` that the engine runs now (asked on the main client)."""
        _, rows = self.store.query_rows(
            "SELECT count() FROM system.processes WHERE query LIKE {pattern:String} "
            "AND query NOT LIKE '%system.processes%' AND query NOT LIKE 'KILL%'",
            {"pattern": f"%{marker}%"},
        )
        return int(rows[0][0])

    def kill(self, marker: str) -> None:
        self.store.command(
            "KILL QUERY WHERE query LIKE {pattern:String} AND query NOT LIKE 'KILL%' SYNC",
            {"pattern": f"%{marker}%"},
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    config = load_config(
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("heavy_lanes")),
            "log.partitions": 2,
            "log.fsync": "never",
            "query.heavy_lanes": 2,
            "query.sql_max_execution_s": float(MAX_EXECUTION_S),
            # Rollup-routed answers must come from the store, not from memory.
            "query.rollup_tier": False,
        },
        environ={},
    )
    pipeline = Pipeline.open_loading(config)
    tokens = {user: pipeline.keyring.create_token(user, ["metrics", "sql"]) for user in ("ana", "bea")}
    base = base_day_ms(12)
    rows = make_rows(2000, start_ms=base, span_ms=4 * DAY_MS, users=50, seed=7)
    load(pipeline.store, rows, "heavy-lanes-1")
    pipeline.start()
    app = Starlette(routes=core_routes(CoreAPI(pipeline)))
    try:
        with TestClient(app) as client:
            yield Env(pipeline, client, rows, base, tokens)
    finally:
        pipeline.stop()


class Background:
    """One request in a thread of its own; ``response`` is None until it returns."""

    def __init__(self, env: Env, user: str, sql: str) -> None:
        self.response: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(env, user, sql), daemon=True)
        self.thread.start()

    def _run(self, env: Env, user: str, sql: str) -> None:
        try:
            self.response = env.sql(user, sql)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and self.response is None and self.error is None


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def start_slow(env: Env, user: str, marker: str) -> Background:
    """A's query, proven to run on the engine before this returns."""
    slow = Background(env, user, SLOW_SQL.format(marker=marker))
    wait_until(lambda: env.running(marker) == 1 or not slow.running, f"{marker} starts")
    assert slow.running, (slow.response and slow.response.text, slow.error)
    return slow


def finish_killed(env: Env, marker: str, slow: Background) -> None:
    """Kill the slow query and check it ended by the kill (it never finished)."""
    env.kill(marker)
    slow.thread.join(PATIENCE_S)
    assert not slow.thread.is_alive() and slow.error is None
    assert slow.response.status_code == 400
    assert "cancel" in slow.response.json()["error"].lower()


def produce(env: Env, event_id: str) -> None:
    config = env.pipeline.config
    normalizer = Normalizer(
        partitions=config.log.partitions, max_future_skew_ms=600_000, max_event_age_ms=86_400_000
    )
    raw = [msgspec.json.encode({"event_type": "signup", "user_id": "late-u", "event_id": event_id})]
    accepted, _ = normalizer.normalize(raw, sent_at_ms=None, received_at_ms=now_ms())
    assert len(accepted) == 1
    producer = env.pipeline.log.producer()
    for partition, value, _ in accepted:
        producer.produce("events", partition, None, value)
    producer.flush()


def stored(env: Env, event_id: str) -> bool:
    _, rows = env.store.query_rows(
        "SELECT count() FROM events WHERE event_id = {id:String}", {"id": event_id}
    )
    return int(rows[0][0]) == 1


# -- the audit's scenario ---------------------------------------------------------------
def test_rollup_query_and_loading_proceed_while_another_users_heavy_query_runs(env: Env) -> None:
    marker = f"lane-{uuid.uuid4().hex[:8]}"
    slow = start_slow(env, "ana", marker)
    try:
        # (a) bea's uncached rollup-routed query is answered by the store.
        start, end = env.base, env.base + 2 * DAY_MS
        sql = (
            "SELECT toStartOfHour(ts) AS h, count() AS n FROM events "
            f"WHERE ts >= '{iso(start)}' AND ts < '{iso(end)}' GROUP BY h ORDER BY h"
        )
        answer = env.sql("bea", sql)
        assert slow.running, "ana's query ended before bea was answered"
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["served_from"] in ("rollup_5m", "rollup_1d"), body["served_from"]
        expected: dict[int, int] = {}
        for r in env.rows:
            if start <= r["ts"] < end:
                hour = r["ts"] - r["ts"] % 3_600_000
                expected[hour] = expected.get(hour, 0) + 1
        assert sum(n for _, n in body["rows"]) == sum(expected.values())
        assert len(body["rows"]) == len(expected)

        # (b) an event produced to the log is loaded and visible in the store.
        event_id = f"during-{marker}"
        produce(env, event_id)
        wait_until(lambda: stored(env, event_id) or not slow.running, "the event is stored")
        assert slow.running, "ana's query ended before the event was loaded"
        assert stored(env, event_id)
        assert env.running(marker) == 1
        assert env.store.lanes_status()["busy"] == 1
    finally:
        finish_killed(env, marker, slow)
    assert env.store.lanes_status()["busy"] == 0


def test_all_lanes_busy_is_429_with_retry_after_and_lanes_are_reused(env: Env) -> None:
    service = env.pipeline.query
    service.heavy_lane_wait_s = 0.2
    first, second = (f"lane-{uuid.uuid4().hex[:8]}" for _ in range(2))
    opened = env.store.lanes_status()["opened"]
    slow = [start_slow(env, "ana", first)]
    try:
        slow.append(start_slow(env, "ana", second))
        assert env.store.lanes_status()["busy"] == 2
        # bea has both of her own heavy slots free; the store's lanes are not.
        refused = env.sql("bea", "SELECT count() AS n FROM events WHERE event_id LIKE 'e7-1%'")
        assert all(s.running for s in slow)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert "heavy-query lanes" in error and "query.heavy_lanes" in error
        # A funnel (a heavy template of the metrics API) is refused the same way.
        funnel = env.client.post("/v1/metrics/funnel", json=FUNNEL, headers=env.headers("bea"))
        assert funnel.status_code == 429, funnel.text
        assert int(funnel.headers["retry-after"]) >= 1
        assert "heavy-query lanes" in funnel.json()["error"]
        # Rollup-routed queries still run on the main client meanwhile.
        rollup = env.sql("bea", "SELECT event_type, count() AS n FROM events GROUP BY event_type")
        assert rollup.status_code == 200 and rollup.json()["served_from"].startswith("rollup")
        assert all(s.running for s in slow)
    finally:
        finish_killed(env, first, slow[0])
        if len(slow) > 1:
            finish_killed(env, second, slow[1])
    # Both lanes were freed by the kills and serve again with the same clients.
    status = env.store.lanes_status()
    assert status["busy"] == 0 and opened <= status["opened"] <= 2
    served = env.sql("bea", "SELECT count() AS n FROM events WHERE event_id LIKE 'e7-1%'")
    assert served.status_code == 200, served.text
    assert served.json()["served_from"] == "raw"
    assert served.json()["rows"] == [[sum(1 for r in env.rows if r["event_id"].startswith("e7-1"))]]
    funnel = env.client.post("/v1/metrics/funnel", json=FUNNEL, headers=env.headers("bea"))
    assert funnel.status_code == 200, funnel.text
    assert funnel.json()["rows"][0]["steps"][0]["users"] > 0
    assert env.store.lanes_status()["opened"] == status["opened"] <= 2
    assert env.store.lanes_status()["queries"] >= status["queries"] + 2


def test_lanes_survive_errors_and_timeouts(env: Env) -> None:
    store = env.store
    store.query_rows_heavy("SELECT 1")  # at least one lane opened
    before = store.lanes_status()
    with pytest.raises(Exception, match="TIMEOUT_EXCEEDED|Timeout exceeded"):
        store.query_rows_heavy(
            SLOW_SQL.format(marker="timeout"), settings={"max_execution_time": 1}
        )
    with pytest.raises(Exception, match="UNKNOWN_TABLE|Unknown table"):
        store.query_rows_heavy("SELECT count() FROM no_such_table")
    for _ in range(2 * before["lanes"]):
        assert store.query_rows_heavy("SELECT count() FROM events WHERE event_id LIKE 'e7-%'") == (
            ["count()"], [(2000,)]
        )
    after = store.lanes_status()
    assert after["busy"] == 0
    assert after["opened"] <= after["lanes"] == before["lanes"]
    assert after["queries"] == before["queries"] + 2 + 2 * before["lanes"]


def test_lane_results_equal_the_main_clients(env: Env) -> None:
    store = env.store
    queries = [
        ("SELECT event_type, country, count() AS n, sum(revenue) AS r FROM events "
         "GROUP BY event_type, country ORDER BY event_type, country", None),
        ("SELECT event_id, ts, distinct_id, revenue FROM events WHERE ts < {t:DateTime64(3)} "
         "ORDER BY event_id LIMIT 50", {"t": "2100-01-01 00:00:00"}),
        ("SELECT uniqExact(distinct_id) AS u FROM events WHERE event_type = {e:String}",
         {"e": "purchase"}),
        ("SELECT count() AS n FROM events WHERE event_type = 'no-such-type' GROUP BY country", None),
    ]
    for sql, parameters in queries:
        assert store.query_rows_heavy(sql, parameters) == store.query_rows(sql, parameters)
    # Through the API: the raw path's answer equals the main client's.
    sql = "SELECT event_id, revenue FROM events WHERE revenue > 50 ORDER BY event_id"
    answer = env.sql("bea", sql).json()
    assert answer["served_from"] == "raw"
    _, main_rows = store.query_rows(sql)
    assert [tuple(r) for r in answer["rows"]] == main_rows and main_rows


def test_heavy_lanes_setting_is_validated(tmp_path: Any) -> None:
    assert load_config(overrides={"data_dir": str(tmp_path)}, environ={}).query.heavy_lanes == 3
    with pytest.raises(ConfigError, match="query.heavy_lanes"):
        load_config(overrides={"data_dir": str(tmp_path), "query.heavy_lanes": -1}, environ={})


def test_busy_lane_and_close(env: Env) -> None:
    """HeavyLanesBusy when the only lane stays busy; close() closes idle
    lanes and refuses later heavy queries; a store with 0 lanes uses the
    main client."""
    config = env.pipeline.config
    one = Store.open(
        load_config(
            overrides={
                "data_dir": str(config.data_dir),
                "query.heavy_lanes": 1,
                "query.sql_max_execution_s": float(MAX_EXECUTION_S),
            },
            environ={},
        )
    )
    marker = f"lane-{uuid.uuid4().hex[:8]}"
    box: dict[str, Any] = {}

    def slow() -> None:
        try:
            one.query_rows_heavy(SLOW_SQL.format(marker=marker))
        except Exception as exc:  # noqa: BLE001 - checked below
            box["error"] = exc

    thread = threading.Thread(target=slow, daemon=True)
    thread.start()
    try:
        wait_until(lambda: env.running(marker) == 1 or not thread.is_alive(), "the slow query")
        assert thread.is_alive()
        with pytest.raises(HeavyLanesBusy, match="all 1 heavy-query lanes"):
            one.query_rows_heavy("SELECT 1", wait_s=0.1)
        # The main client of the same store is free.
        assert one.query_rows("SELECT 1")[1] == [(1,)]
    finally:
        env.kill(marker)
        thread.join(PATIENCE_S)
    assert "cancel" in str(box["error"]).lower()
    assert one.query_rows_heavy("SELECT 2")[1] == [(2,)]
    assert one.lanes_status() == {"lanes": 1, "busy": 0, "opened": 1, "queries": 2}
    one.close()
    with pytest.raises(StoreError, match="closed"):
        one.query_rows_heavy("SELECT 3")

    zero = Store.open(
        load_config(
            overrides={"data_dir": str(config.data_dir), "query.heavy_lanes": 0}, environ={}
        )
    )
    try:
        assert zero.heavy_lanes == 0
        assert zero.query_rows_heavy("SELECT 4", wait_s=0) == (["4"], [(4,)])
        assert zero.lanes_status()["opened"] == 0
    finally:
        zero.close()
