"""The in-memory rollup tier (decision 102) on a real embedded log, loader,
chDB store, finalizer and lake batch job: answers over days this process's
DayFinalizer confirmed final come from memory and equal both the engine's
answer to the routed SQL and a Python reference over the produced events;
late data, a batch recompute, a GDPR delete and a restart never let it
serve a stale number; a process without a local frontier never uses it."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.testclient import TestClient
from tests.fixtures_lake import config_for, make_events, produce
from tests.fixtures_query import CountingStore, finalizer_for

from strata.events import EventRecord
from strata.lake.api import lake_routes
from strata.lake.wiring import register_lake
from strata.query import sandbox
from strata.query.api import CoreAPI, core_routes
from strata.query.day_answers import day_of
from strata.query.service import QueryService
from strata.server.pipeline import Pipeline

DAY_MS = 86_400_000
FIVE_MINUTES_MS = 300_000
ADMIN = "adm_rollup_tier"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}

Reference = dict[tuple[int, str], int]


def base_day(days_ago: int) -> int:
    now = int(datetime.now(UTC).timestamp() * 1000)
    return now - now % DAY_MS - days_ago * DAY_MS


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def literal(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def page_views_sql(start: int, end: int) -> str:
    """Page views by country per 5 minutes: routed to rollup_page_views_by_country_5m."""
    return (
        "SELECT toStartOfFiveMinutes(ts) AS t, country, count() AS views FROM events "
        f"WHERE event_type = 'page_view' AND ts >= '{literal(start)}' AND ts < '{literal(end)}' "
        "GROUP BY t, country ORDER BY t, country"
    )


def reference(events: list[EventRecord], start: int, end: int) -> Reference:
    """(bucket start ms, country) -> page views, by hand."""
    out: dict[tuple[int, str], int] = defaultdict(int)
    for event in events:
        if event.event_type == "page_view" and start <= event.ts < end:
            out[(event.ts - event.ts % FIVE_MINUTES_MS, event.country)] += 1
    return dict(out)


def as_ms(value: Any) -> int:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert isinstance(value, datetime), value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def keyed(rows: list[Any]) -> Reference:
    out: Reference = {}
    for t, country, views in rows:
        key = (as_ms(t), str(country))
        assert key not in out, f"duplicate group {key}"
        out[key] = int(views)
    return out


class Env:
    """A loading pipeline wired as `strata serve`'s core (lake, batch job
    with ``on_revised``), store calls counted, and a DayFinalizer driven by
    a watermark the test sets (the processor's input)."""

    def __init__(self, tmp: Path, **overrides: Any) -> None:
        self.config = config_for(
            tmp,
            **{
                "auth.admin_tokens": [ADMIN],
                "query.cache_ttl": "0s",
                "query.open_range_cache_ttl": "0s",
                "query.complete_day_cache_ttl": "0s",
                **overrides,
            },
        )
        self.pipeline = Pipeline.open_loading(self.config)
        register_lake(self.pipeline)  # as `strata serve` does: job.on_revised = pipeline.on_revised
        self.real_store = self.pipeline.store
        # Every query the query layer sends (the tier's included) is counted;
        # the loaders keep the real store.
        self.counting = CountingStore(self.real_store)
        self.pipeline.store = self.counting  # type: ignore[assignment]
        self.watermark: int | None = None
        self.finalizer = finalizer_for(self.pipeline, lambda: self.watermark)
        self.pipeline.query.watermark = lambda: self.watermark
        app = Starlette(routes=[*core_routes(CoreAPI(self.pipeline)), *lake_routes(self.pipeline)])
        self.client = TestClient(app)

    @property
    def service(self) -> QueryService:
        service: QueryService = self.pipeline.query
        return service

    def produce(self, events: list[EventRecord]) -> None:
        produce(self.pipeline.log, events, self.config.log.partitions)

    def load(self) -> None:
        loader = self.pipeline.loaders["events"]
        while loader.run_once(timeout_s=0.05):
            pass
        assert loader.lag() == 0

    def archive(self) -> None:
        self.pipeline.components["archiver"].drain()

    def step(self, times: int = 2) -> None:
        for _ in range(times):  # snapshot, then its completion
            self.finalizer.step()

    def sql(self, text: str) -> dict[str, Any]:
        response = self.client.post("/v1/sql", json={"sql": text}, headers=HEADERS)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def explain(self, text: str) -> dict[str, Any]:
        response = self.client.post("/v1/sql", json={"sql": text, "explain": True}, headers=HEADERS)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def admin(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post(path, json=body, headers=HEADERS)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def engine(self, text: str) -> list[tuple[Any, ...]]:
        """The engine's answer to the routed SQL (the rollup route), read
        directly from the store."""
        route = self.service.router.route(sandbox.check(text))
        assert route.served_from == "rollup_5m", route.reason
        _, rows = self.real_store.query_rows(route.sql)
        return rows

    def check(self, text: str, expected: Reference) -> dict[str, Any]:
        """Ask over HTTP and in-process; both equal the engine's answer to
        the routed SQL and ``expected``. Returns the HTTP body."""
        body = self.sql(text)
        assert body["columns"] == ["t", "country", "views"]
        engine_rows = self.engine(text)
        assert keyed(body["rows"]) == keyed(engine_rows) == expected
        # Exactly the engine's rows, types and order included.
        assert self.service.sql("admin", text).rows == engine_rows
        return body

    def tier_rows(self, start: int) -> int:
        """Rows of one day of rollup_page_views_by_country_5m (FINAL)."""
        return int(
            self.real_store.scalar(
                "SELECT count() FROM rollup_page_views_by_country_5m FINAL "
                f"WHERE window_start >= '{literal(start)}' "
                f"AND window_start < '{literal(start + DAY_MS)}'"
            )
        )

    def close(self) -> None:
        self.pipeline.stop()


def three_days(env: Env, base: int) -> list[EventRecord]:
    events = [
        e for k in range(3) for e in make_events(900, start_ms=base + k * DAY_MS, users=80, seed=k)
    ]
    env.produce(events)
    env.load()
    return events


def page_views(n: int, start_ms: int, seed: int, prefix: str) -> list[EventRecord]:
    """The page_view events among ``n`` generated ones (300 users)."""
    return [
        e
        for e in make_events(n, start_ms=start_ms, users=300, seed=seed, prefix=prefix)
        if e.event_type == "page_view"
    ]


def held_day(env: Env, base: int) -> tuple[list[EventRecord], int, str]:
    """Three loaded days, finalized; day 2's page views answered from memory.
    Returns (events, day 2's start, the page-views SQL over day 2)."""
    events = three_days(env, base)
    finalize(env, base)
    day = base + DAY_MS
    text = page_views_sql(day, day + DAY_MS)
    assert env.check(text, reference(events, day, day + DAY_MS))["rollup_tier"] == "memory"
    return events, day, text


def finalize(env: Env, base: int, days: int = 3) -> None:
    env.watermark = base + days * DAY_MS + 60_000
    env.step()
    assert env.finalizer.frontier == day_of(base + days * DAY_MS)
    assert env.service.day_answers.local_frontier == day_of(base + days * DAY_MS)


def test_final_day_served_from_memory_exact_and_without_store_queries(tmp_path: Path) -> None:
    base = base_day(8)
    env = Env(tmp_path)
    try:
        events = three_days(env, base)
        day = base + DAY_MS
        text = page_views_sql(day, day + DAY_MS)
        expected = reference(events, day, day + DAY_MS)
        assert sum(expected.values()) > 100

        # Before the finalizer confirmed the day: the engine answers.
        assert env.check(text, expected)["rollup_tier"] is None
        assert env.service.tier.held()["days"] == 0

        finalize(env, base)
        queries = env.counting.queries
        body = env.sql(text)
        assert body["rollup_tier"] == "memory"
        assert env.counting.queries > queries  # the day was read once (the counter sees the tier)
        assert body["served_from"] == "rollup_5m" and body["cache"] == "miss"
        assert env.check(text, expected)["rollup_tier"] == "memory"
        held = env.service.tier.held()
        assert held["days"] == 1 and held["rows"] == env.tier_rows(day)

        # A repeat: still memory, and not one query reaches the store.
        queries = env.counting.queries
        assert env.sql(text)["rollup_tier"] == "memory"
        result = env.service.sql("admin", text)
        assert result.meta.get("rollup_tier") == "memory"
        assert env.counting.queries == queries
        assert keyed(result.rows) == expected

        # A sub-day range and a coarser bucket from the same held day; a
        # filtered country; each equal to the engine's answer.
        half = page_views_sql(day + 6 * 3_600_000, day + 18 * 3_600_000)
        assert (
            env.check(half, reference(events, day + 6 * 3_600_000, day + 18 * 3_600_000))[
                "rollup_tier"
            ]
            == "memory"
        )
        hourly = (
            "SELECT toStartOfHour(ts) AS h, count() AS views FROM events "
            f"WHERE event_type = 'page_view' AND country = 'DE' AND ts >= '{literal(day)}' "
            f"AND ts < '{literal(day + DAY_MS)}' GROUP BY h ORDER BY views DESC, h LIMIT 5"
        )
        body = env.sql(hourly)
        assert body["rollup_tier"] == "memory"
        by_hour: dict[int, int] = defaultdict(int)
        for e in events:
            if e.event_type == "page_view" and e.country == "DE" and day <= e.ts < day + DAY_MS:
                by_hour[e.ts - e.ts % 3_600_000] += 1
        top = sorted(by_hour.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        assert [(as_ms(h), n) for h, n in body["rows"]] == top
        route = env.service.router.route(sandbox.check(hourly))
        assert env.service.sql("admin", hourly).rows == env.real_store.query_rows(route.sql)[1]
    finally:
        env.close()


def test_late_data_is_never_hidden_by_the_tier(tmp_path: Path) -> None:
    base = base_day(8)
    env = Env(tmp_path)
    try:
        events, day, text = held_day(env, base)

        # Late page views into the final, held day, reported (as the
        # processor does) before the loader stored them.
        late = page_views(80, day, 41, "late")
        assert late
        env.produce(late)
        env.pipeline.on_revised(min(e.ts for e in late), max(e.ts for e in late) + 1)
        assert env.service.tier.held()["days"] == 0  # dropped
        before = reference(events, day, day + DAY_MS)
        body = env.check(text, before)  # not loaded yet: the engine's answer is still this
        assert body["rollup_tier"] is None and body["revised"] is True
        # The finalizer must not recompute the day before the loader stored
        # what was in the log when it was marked.
        env.step()
        assert env.check(text, before)["rollup_tier"] is None

        env.load()
        after = reference([*events, *late], day, day + DAY_MS)
        three = page_views_sql(base, base + 3 * DAY_MS)
        body = env.check(three, reference([*events, *late], base, base + 3 * DAY_MS))
        assert body["rollup_tier"] is None  # one stale day in the range is enough
        assert sum(after.values()) == sum(before.values()) + len(late)
        assert env.check(text, after)["rollup_tier"] is None  # stale: the engine answers
        env.step()
        assert day_of(day) not in env.service.day_answers.stale_days()
        assert env.check(text, after)["rollup_tier"] == "memory"  # re-read, with the late rows
        assert (
            env.check(three, reference([*events, *late], base, base + 3 * DAY_MS))["rollup_tier"]
            == "memory"
        )
        # The other final days were never dropped from memory.
        other = page_views_sql(base, base + DAY_MS)
        assert env.check(other, reference(events, base, base + DAY_MS))["rollup_tier"] == "memory"

        # A late event the processor no longer holds reaches only late_events:
        # the finalizer's scan marks the day (through pipeline.on_revised).
        gone = page_views(60, base, 42, "gone")
        env.produce(gone)
        env.load()
        row = gone[0]
        env.real_store.command(
            "INSERT INTO late_events (id, metric, event_id, event_type, distinct_id, ts, "
            "received_at, window_start, window_end, watermark, window_held, emitted_at, "
            "_partition, _offset) VALUES ({id:String}, 'page_views_by_country', {eid:String}, "
            "'page_view', {did:String}, fromUnixTimestamp64Milli({ts:Int64}), now64(3), "
            "fromUnixTimestamp64Milli({ws:Int64}), fromUnixTimestamp64Milli({we:Int64}), "
            "now64(3), false, now64(3), 0, 0)",
            {
                "id": "l1",
                "eid": row.event_id,
                "did": row.distinct_id,
                "ts": row.ts,
                "ws": row.ts - row.ts % FIVE_MINUTES_MS,
                "we": row.ts - row.ts % FIVE_MINUTES_MS + FIVE_MINUTES_MS,
            },
        )
        first = reference([*events, *gone], base, base + DAY_MS)
        env.finalizer.scan_late()
        assert day_of(base) in env.service.day_answers.stale_days()
        assert env.check(other, first)["rollup_tier"] is None
        env.step()
        assert env.check(other, first)["rollup_tier"] == "memory"
    finally:
        env.close()


def test_late_rows_are_never_served_stale_before_late_events_is_scanned(tmp_path: Path) -> None:
    """Late events for windows the processor no longer holds (older than
    processor.final_retention, e.g. a mobile client uploading yesterday's
    events) reach on_revised only through late_events, which the finalizer
    scans every few seconds; the events loader stores the rows themselves
    (and so changes the rollups) on its own schedule. From the moment the
    rows are stored, the engine counts them: the tier must not answer
    without them."""
    base = base_day(8)
    env = Env(tmp_path)
    try:
        events, day, text = held_day(env, base)

        upload = page_views(80, day, 71, "upload")
        env.produce(upload)
        env.load()  # the events loader stored them; no late_events row yet
        expected = reference([*events, *upload], day, day + DAY_MS)
        assert keyed(env.engine(text)) == expected  # the engine counts them
        body = env.sql(text)
        assert keyed(body["rows"]) == expected, f"stale answer, rollup_tier={body['rollup_tier']}"
        env.step()
        assert env.check(text, expected)["rollup_tier"] == "memory"
    finally:
        env.close()


def test_query_api_pipeline_without_a_processor_never_serves_late_rows_stale(
    tmp_path: Path,
) -> None:
    """`strata query-api` (and `strata serve` with processor.embedded =
    false) open the loading pipeline, whose own DayFinalizer runs on the
    loader's watermark: the tier is active there on a chDB store. No
    processor in the process reports late data, and events the processor
    elsewhere does not count as late never reach late_events: rows the
    loader stores into a final day must still never be answered stale."""
    from strata.server.roles import open_query_pipeline

    base = base_day(8)
    config = config_for(
        tmp_path,
        **{
            "auth.admin_tokens": [ADMIN],
            "query.cache_ttl": "0s",
            "query.open_range_cache_ttl": "0s",
        },
    )
    pipeline = open_query_pipeline(config)
    try:
        assert "processor" not in pipeline.components
        finalizer = pipeline.components["day_answers"]
        client = TestClient(Starlette(routes=core_routes(CoreAPI(pipeline))))
        events = [
            e
            for k in range(3)
            for e in make_events(900, start_ms=base + k * DAY_MS, users=80, seed=k)
        ]
        # Later events move the loader's watermark past the three days.
        events += make_events(200, start_ms=base + 3 * DAY_MS, span_ms=3_600_000, seed=9)
        produce(pipeline.log, events, config.log.partitions)
        loader = pipeline.loaders["events"]

        def load() -> None:
            while loader.run_once(timeout_s=0.05):
                pass

        def ask(text: str) -> dict[str, Any]:
            response = client.post("/v1/sql", json={"sql": text}, headers=HEADERS)
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body

        load()
        for _ in range(2):
            finalizer.step()
        assert pipeline.query.day_answers.local_frontier == day_of(base + 3 * DAY_MS)
        day = base + DAY_MS
        text = page_views_sql(day, day + DAY_MS)
        body = ask(text)
        assert body["rollup_tier"] == "memory"  # the tier is active in this shape
        assert keyed(body["rows"]) == reference(events, day, day + DAY_MS)

        upload = page_views(80, day, 72, "upload")
        produce(pipeline.log, upload, config.log.partitions)
        load()
        expected = reference([*events, *upload], day, day + DAY_MS)
        for _ in range(3):
            finalizer.step()
            body = ask(text)
            assert keyed(body["rows"]) == expected, (
                f"stale answer, rollup_tier={body['rollup_tier']}"
            )
    finally:
        pipeline.stop()


def test_days_from_the_frontier_on_are_never_held(tmp_path: Path) -> None:
    """Rows of a day that is not final yet keep arriving without any
    revision report (they are on time): the tier must not hold that day."""
    base = base_day(8)
    env = Env(tmp_path)
    try:
        events = three_days(env, base)
        finalize(env, base)
        open_day = base + 3 * DAY_MS  # the frontier itself
        first = make_events(400, start_ms=open_day, users=80, seed=61)
        env.produce(first)
        env.load()
        text = page_views_sql(open_day, open_day + DAY_MS)
        assert env.check(text, reference(first, open_day, open_day + DAY_MS))["rollup_tier"] is None
        more = make_events(400, start_ms=open_day, users=80, seed=62, prefix="more")
        env.produce(more)
        env.load()
        both = reference([*first, *more], open_day, open_day + DAY_MS)
        assert env.check(text, both)["rollup_tier"] is None
        # A range ending at the frontier is final; one step past it is not.
        last = page_views_sql(base + 2 * DAY_MS, open_day)
        assert (
            env.check(last, reference(events, base + 2 * DAY_MS, open_day))["rollup_tier"]
            == "memory"
        )
        across = page_views_sql(base + 2 * DAY_MS, open_day + FIVE_MINUTES_MS)
        upto = open_day + FIVE_MINUTES_MS
        body = env.check(across, reference([*events, *first, *more], base + 2 * DAY_MS, upto))
        assert body["rollup_tier"] is None
        assert all(day < day_of(open_day) for _, day in env.service.tier._days)
        # Once the watermark passes its end (and the loader stored it), it is final.
        env.watermark = open_day + DAY_MS + 60_000
        env.step()
        assert env.check(text, both)["rollup_tier"] == "memory"
    finally:
        env.close()


def test_gdpr_delete_and_batch_recompute_through_the_admin_api(tmp_path: Path) -> None:
    base = base_day(8)
    env = Env(tmp_path)
    try:
        events = three_days(env, base)
        env.archive()
        finalize(env, base)
        day = base + DAY_MS
        text = page_views_sql(day, day + DAY_MS)
        expected = reference(events, day, day + DAY_MS)
        assert env.check(text, expected)["rollup_tier"] == "memory"

        # A batch recompute that changes nothing: the same, exact answer.
        report = env.admin("/v1/admin/batch", {"date": day_of(day).isoformat()})["report"]
        assert report and all(r["difference"] == 0 for r in report)
        assert env.check(text, expected)["rollup_tier"] is None  # revised, not recomputed yet
        env.step()
        assert env.check(text, expected)["rollup_tier"] == "memory"

        # GDPR delete of a user with page views that day.
        user = next(
            e.user_id
            for e in events
            if e.event_type == "page_view" and e.user_id and day <= e.ts < day + DAY_MS
        )
        kept = [e for e in events if e.user_id != user and e.distinct_id != user]
        without = reference(kept, day, day + DAY_MS)
        assert sum(without.values()) < sum(expected.values())
        deleted = env.admin("/v1/admin/delete-user", {"user_id": user})
        assert day_of(day).isoformat() in deleted["days_recomputed"]
        body = env.check(text, without)  # served from memory or not, without the user
        assert body["rollup_tier"] is None
        env.step()
        assert env.check(text, without)["rollup_tier"] == "memory"
        for k in (0, 2):  # the user's other days too
            start = base + k * DAY_MS
            env.check(page_views_sql(start, start + DAY_MS), reference(kept, start, start + DAY_MS))

        # A replay of the day from the log (which still holds the user's
        # records, masked on every read path): exact, without the user.
        replayed = env.admin(
            "/v1/admin/replay",
            {"from": iso(day), "to": iso(day + DAY_MS), "source": "log"},
        )
        assert replayed["source"] == "log"
        assert env.check(text, without)["rollup_tier"] is None
        env.step()
        assert env.check(text, without)["rollup_tier"] == "memory"

        # The BatchJob as `strata serve` holds it (the nightly batch).
        job = env.pipeline.components["lake_scheduler"].job
        assert job.on_revised == env.pipeline.on_revised
        job.recompute_day(day_of(day))
        assert env.check(text, without)["rollup_tier"] is None
        env.step()
        assert env.check(text, without)["rollup_tier"] == "memory"
    finally:
        env.close()


def test_restart_serves_from_memory_only_after_the_first_completed_snapshot(
    tmp_path: Path,
) -> None:
    base = base_day(8)
    env = Env(tmp_path)
    try:
        events, day, text = held_day(env, base)
        # A revision left pending at shutdown: stored, marked, not recomputed.
        late = page_views(60, base, 51, "late")
        env.produce(late)
        env.load()
        env.pipeline.on_revised(base, base + 1)
        # Late page views of day 2 in the log, reported, not loaded at shutdown.
        pending = page_views(60, base + 2 * DAY_MS, 52, "p")
        env.produce(pending)
        env.pipeline.on_revised(base + 2 * DAY_MS, base + 2 * DAY_MS + 1)
    finally:
        env.close()

    env = Env(tmp_path)
    try:
        everything = [*events, *late, *pending]
        assert env.service.day_answers.frontier() == day_of(base + 3 * DAY_MS)  # stored
        assert env.service.day_answers.local_frontier is None
        loaded = [*events, *late]
        for k in range(3):
            start = base + k * DAY_MS
            expected = reference(loaded, start, start + DAY_MS)
            body = env.check(page_views_sql(start, start + DAY_MS), expected)
            assert body["rollup_tier"] is None
        # The first snapshot cannot complete while the loader is behind the log.
        env.step(1)
        assert env.finalizer.done_seq == 0
        assert env.service.day_answers.local_frontier is None
        assert env.check(text, reference(loaded, day, day + DAY_MS))["rollup_tier"] is None
        assert env.service.tier.held()["days"] == 0

        env.load()
        env.step(1)
        assert env.finalizer.done_seq > 0
        assert env.service.day_answers.local_frontier == day_of(base + 3 * DAY_MS)
        # Loading the pending rows revised day 2 again (Pipeline.on_rows_stored,
        # against the stored frontier): recomputed after the next snapshot.
        assert day_of(base + 2 * DAY_MS) in env.service.day_answers.stale_days()
        env.step()
        assert env.service.day_answers.stale_days() == {}
        for k in range(3):
            start = base + k * DAY_MS
            body = env.check(
                page_views_sql(start, start + DAY_MS), reference(everything, start, start + DAY_MS)
            )
            assert body["rollup_tier"] == "memory"
        assert sum(reference(pending, base, base + 3 * DAY_MS).values()) == len(pending) > 0
    finally:
        env.close()


def test_a_process_without_a_local_frontier_never_uses_the_tier(tmp_path: Path) -> None:
    base = base_day(8)
    env = Env(tmp_path)
    try:
        events = three_days(env, base)
        finalize(env, base)
        day = base + DAY_MS
        text = page_views_sql(day, day + DAY_MS)
        expected = reference(events, day, day + DAY_MS)
        assert env.check(text, expected)["rollup_tier"] == "memory"

        # `strata query-api` of the distributed shape: a QueryService on the
        # same store, no finalizer in its process.
        other = QueryService(env.config, lambda: env.real_store, lambda: env.watermark)
        try:
            assert other.day_answers.frontier() == day_of(base + 3 * DAY_MS)
            for _ in range(2):
                result = other.sql("admin", text)
                assert "rollup_tier" not in result.meta
                assert keyed(result.rows) == expected
                assert result.rows == env.engine(text)
            assert other.tier.held()["days"] == 0 and other.tier.stats["answered"] == 0
            _, route = other.plan(text)
            assert route.tier is not None and route.tier.startswith("not used:")
            assert "no local DayFinalizer frontier" in route.tier
        finally:
            other.close()
    finally:
        env.close()


def test_explain_says_whether_the_tier_is_used(tmp_path: Path) -> None:
    base = base_day(8)
    env = Env(tmp_path)
    try:
        three_days(env, base)
        finalize(env, base)
        day = base + DAY_MS
        used = env.explain(page_views_sql(day, day + DAY_MS))
        assert used["executed"] is False
        assert used["explain"]["rollup_tier"].startswith("used: ")
        today = base_day(0)
        reaching = page_views_sql(base + 2 * DAY_MS, today + 3_600_000)
        body = env.explain(reaching)
        assert body["served_from"].startswith("rollup"), body
        note = body["explain"]["rollup_tier"]
        assert note.startswith("not used: ") and "past the finalized days" in note, note
        # Explaining loads nothing.
        assert env.service.tier.held()["days"] == 0
    finally:
        env.close()


def test_eviction_keeps_the_row_budget_and_answers_exact(tmp_path: Path) -> None:
    base = base_day(8)
    # The budget: the larger day's rollup rows (one row per window and country).
    events = [
        e for k in range(3) for e in make_events(900, start_ms=base + k * DAY_MS, users=80, seed=k)
    ]
    per_day = [len(reference(events, base + k * DAY_MS, base + (k + 1) * DAY_MS)) for k in range(3)]
    budget = max(per_day[0], per_day[1])
    env = Env(tmp_path, **{"query.rollup_tier_max_rows": budget})
    try:
        env.produce(events)
        env.load()
        assert [env.tier_rows(base + k * DAY_MS) for k in range(3)] == per_day
        finalize(env, base)
        tier = env.service.tier
        for _ in range(2):
            for k in (0, 1):
                start = base + k * DAY_MS
                body = env.check(
                    page_views_sql(start, start + DAY_MS), reference(events, start, start + DAY_MS)
                )
                assert body["rollup_tier"] == "memory"
                held = tier.held()
                assert held["rows"] <= budget
                assert held["days"] == 1 and held["rows"] == per_day[k]
        assert tier.held()["days_evicted"] >= 3
        # A range of two days needs more than the budget holds at once: it
        # is still answered exactly (from memory or by the engine).
        two = page_views_sql(base, base + 2 * DAY_MS)
        env.check(two, reference(events, base, base + 2 * DAY_MS))
        assert tier.held()["rows"] <= budget
        # A budget smaller than a day: nothing is held, the engine answers.
        tier.clear()
        tier.max_rows = min(per_day) - 1
        for k in range(3):
            start = base + k * DAY_MS
            body = env.check(
                page_views_sql(start, start + DAY_MS), reference(events, start, start + DAY_MS)
            )
            assert body["rollup_tier"] is None
        assert tier.held()["rows"] == 0
    finally:
        env.close()


def test_a_stored_old_row_revises_only_its_own_day(tmp_path: Path) -> None:
    """A micro-batch that mixes one event of an old final day with events of
    now (a client with a bad clock, a late upload) revises that day alone:
    the other held days stay in memory."""
    base = base_day(8)
    env = Env(tmp_path)
    try:
        events = three_days(env, base)
        finalize(env, base)
        for k in range(3):
            start = base + k * DAY_MS
            body = env.check(page_views_sql(start, start + DAY_MS), reference(events, start, start + DAY_MS))
            assert body["rollup_tier"] == "memory"
        assert env.service.tier.held()["days"] >= 3
        old = page_views(40, base, 81, "old")[:1]
        now = [
            e
            for e in make_events(40, start_ms=base_day(0), users=300, seed=82, prefix="now")
        ]
        env.produce([*old, *now])
        env.load()
        stale = env.service.day_answers.stale_days()
        assert set(stale) == {day_of(base)}, stale
        everything = [*events, *old]
        first = env.check(page_views_sql(base, base + DAY_MS), reference(everything, base, base + DAY_MS))
        assert first["rollup_tier"] is None  # revised, not recomputed yet
        for k in (1, 2):
            start = base + k * DAY_MS
            body = env.check(page_views_sql(start, start + DAY_MS), reference(everything, start, start + DAY_MS))
            assert body["rollup_tier"] == "memory"
    finally:
        env.close()
