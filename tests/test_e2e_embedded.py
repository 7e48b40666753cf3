"""Issue 2 acceptance: the embedded pipeline end to end, exactly once."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import httpx
from tests.conftest import WRITE_KEY, StrataServer

from strata.generate import TrafficModel, run


def _check_rollups_match_raw(server: StrataServer) -> None:
    raw = {r[0]: r[1] for r in server.sql(
        "SELECT event_type, count() FROM events GROUP BY event_type")["rows"]}
    for granularity in ("5m", "1d"):
        rollup = {r[0]: r[1] for r in server.sql(
            f"SELECT event_type, countMerge(events) FROM rollup_events_by_type_{granularity} "
            "GROUP BY event_type")["rows"]}
        assert rollup == raw, granularity
    views = server.scalar("SELECT count() FROM events WHERE event_type = 'page_view'")
    seed = server.scalar("SELECT countMerge(views) FROM rollup_page_views_by_country_5m")
    assert seed == views


def test_end_to_end_100k_events_with_retries(server: StrataServer) -> None:
    stats = run(server.url, WRITE_KEY, rate=50_000, duration=0, total_events=100_000,
                batch_size=500, duplicate_share=0.05, concurrency=8, seed=7,
                progress=False, keep_ids=True)
    assert stats.errors == 0
    assert stats.duplicate_batches > 0  # about 5 % of batches were sent twice
    assert stats.accepted == stats.sent_events + 500 * stats.duplicate_batches - stats.rejected
    server.wait_caught_up()
    assert server.scalar("SELECT count() FROM events") == len(stats.acknowledged_ids)
    assert server.scalar("SELECT uniqExact(event_id) FROM events") == len(stats.acknowledged_ids)
    _check_rollups_match_raw(server)
    status = server.status()
    loader = status["consumers"]["loader-events"]
    assert loader["duplicates_dropped"] >= 500 * stats.duplicate_batches
    assert status["watermark"] is not None


class RetryingClient(threading.Thread):
    """Sends fixed batches in order; retries each until it is acknowledged."""

    def __init__(self, url: str, batches: list[list[dict[str, Any]]]) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.batches = batches
        self.acknowledged = 0
        self.attempts = 0

    def run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            for batch in self.batches:
                while True:
                    self.attempts += 1
                    try:
                        response = client.post(f"{self.url}/v1/batch", json={"batch": batch},
                                               headers={"Authorization": f"Bearer {WRITE_KEY}"})
                        if response.status_code == 200:
                            assert response.json()["rejected"] == []
                            self.acknowledged += 1
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.02)


def test_exactly_once_across_kill9(server_factory: Any) -> None:
    server = server_factory(workers=2).start()
    model = TrafficModel(seed=11)
    batches = [model.batch(200) for _ in range(400)]  # 80k events, client-side event_ids
    for batch in batches:
        for event in batch:
            event["timestamp"] = int(time.time() * 1000) - random.randint(0, 60_000)
    client = RetryingClient(server.url, batches)
    client.start()
    rng = random.Random(3)
    kills = 0
    # Crash at random moments *during* ingestion: after a random number of
    # further acknowledged batches (at most 5 x 60 of the 400), then a
    # random delay, so the kill lands mid-request, mid-commit or mid-load.
    while kills < 5:
        target = client.acknowledged + rng.randint(20, 60)
        deadline = time.monotonic() + 120
        while client.acknowledged < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        assert client.is_alive(), "the client finished before five crashes"
        server.kill9()
        kills += 1
        server.start()
    client.join(300)
    assert not client.is_alive()
    assert client.acknowledged == len(batches)
    server.wait_caught_up()
    sent = {e["event_id"] for batch in batches for e in batch}
    rows = server.sql("SELECT event_id FROM events")["rows"]
    stored = [r[0] for r in rows]
    assert len(stored) == len(set(stored)), "an event is stored twice"
    assert set(stored) == sent
    _check_rollups_match_raw(server)
