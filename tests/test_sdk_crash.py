"""The SDK against a `strata serve` that is killed with -9 and restarted
mid-stream: 50k tracked events arrive exactly once."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from tests.conftest import WRITE_KEY
from tests.fixtures_sdk import wait_loaded

from strata.sdk import Client


def test_kill9_and_restart_mid_stream_50k_exactly_once(server_factory: Any) -> None:
    server = server_factory("crash", workers=2).start()
    run = uuid.uuid4().hex
    total = 50_000
    # "block": the producer waits instead of dropping while the server is down.
    client = Client(server.url, WRITE_KEY, overflow="block", max_queue_size=5_000,
                    backoff_base=0.05, backoff_max=1.0, max_retry_time=600)
    ids: list[str] = []

    def produce() -> None:
        for i in range(total):
            ids.append(client.track("crash_test", user_id=f"u{i % 1000}",
                                    properties={"run": run, "i": i}))

    producer = threading.Thread(target=produce)
    producer.start()
    deadline_stats = client.stats
    while deadline_stats.accepted < total // 4:
        producer.join(0.05)
        assert producer.is_alive() or deadline_stats.accepted >= total // 4
    server.kill9()
    accepted_at_kill = client.stats.accepted
    server.start()
    producer.join(600)
    assert client.flush(timeout=600)
    client.close()
    assert 0 < accepted_at_kill < total
    assert client.stats.retries > 0  # it really hit the dead server
    assert client.stats.failed == 0 and client.stats.dropped == 0 and client.stats.rejected == 0
    assert client.stats.accepted >= total  # answers lost in the crash were re-sent
    wait_loaded(server, timeout=300)
    rows = server.sql(
        "SELECT count(), uniqExact(event_id), uniqExact(JSONExtractInt(properties, 'i')) "
        f"FROM events WHERE JSONExtractString(properties, 'run') = '{run}'"
    )["rows"]
    assert rows == [[total, total, total]]
    assert len(set(ids)) == total
