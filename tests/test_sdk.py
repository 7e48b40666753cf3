"""The Python SDK: batching, overflow policy, retries (429 storm), exit
flush and the asyncio client, against a live `strata serve`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest
from tests.conftest import WRITE_KEY, StrataServer
from tests.fixtures_sdk import ScriptedServer, wait_loaded

from strata.sdk import AsyncClient, Client, QueueFull


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


def test_sdk_imports_without_server_dependencies() -> None:
    code = (
        "import sys, strata.sdk; "
        "heavy = [m for m in ('chdb', 'pyarrow', 'numpy', 'msgspec', 'clickhouse_connect') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_overflow_drops_and_counts_exactly(scripted: ScriptedServer, policy: str) -> None:
    scripted.gate.clear()  # the first request hangs: the sender is busy
    client = Client(scripted.url, "k", flush_at=10, flush_interval=0.01, max_queue_size=50,
                    overflow=policy)  # type: ignore[arg-type]
    try:
        first = client.track("e", user_id="u")
        scripted.wait_started(1)
        ids = [client.track("e", user_id="u", properties={"i": i}) for i in range(80)]
        assert client.stats.dropped == 30
        assert client.stats.queued == 50
        scripted.gate.set()
        assert client.flush(timeout=60)
    finally:
        client.close()
    kept = ids[:50] if policy == "drop_newest" else ids[30:]
    assert scripted.event_ids() == [first, *kept]
    assert client.stats.accepted == 51
    assert client.stats.failed == 0 and client.stats.rejected == 0


def test_overflow_block_waits_for_room(scripted: ScriptedServer) -> None:
    scripted.gate.clear()
    client = Client(scripted.url, "k", flush_at=10, flush_interval=0.01, max_queue_size=5,
                    overflow="block", block_timeout=0.2)
    try:
        first = client.track("e", user_id="u")
        scripted.wait_started(1)
        ids = [client.track("e", user_id="u") for _ in range(5)]
        with pytest.raises(QueueFull):
            client.track("e", user_id="u")
        client._queue.block_timeout = None
        later: list[str] = []
        blocked = threading.Thread(target=lambda: later.append(client.track("e", user_id="u")))
        blocked.start()
        blocked.join(0.3)
        assert blocked.is_alive()  # it cannot finish before the sender makes room
        scripted.gate.set()
        blocked.join(30)
        assert client.flush(timeout=60)
    finally:
        client.close()
    assert scripted.event_ids() == [first, *ids, *later]
    assert client.stats.dropped == 0 and client.stats.accepted == 7


def test_a_429_storm_is_survived_with_the_same_event_ids(shared_server: StrataServer) -> None:
    proxy = ScriptedServer(upstream=shared_server.url)
    proxy.too_many = 40
    run = uuid.uuid4().hex
    client = Client(proxy.url, WRITE_KEY, flush_at=100, flush_interval=0.05,
                    backoff_base=0.01, backoff_max=0.2)
    try:
        ids = [client.track("storm", user_id=f"u{i % 97}", properties={"run": run})
               for i in range(5000)]
        assert client.flush(timeout=120)
        # Retry-After is honoured: one more 429 that asks for a second.
        proxy.too_many, proxy.retry_after = 1, "1"
        client.track("storm", user_id="late", properties={"run": run})
        assert client.flush(timeout=60)
    finally:
        client.close()
        proxy.close()
    assert client.stats.retries >= 41
    assert client.stats.accepted == 5001 and client.stats.failed == 0
    answered = [r for r in proxy.requests if r["events"][0]["user_id"] == "late"]
    assert [r["status"] for r in answered] == [429, 200]
    assert answered[1]["at"] - answered[0]["at"] >= 0.95
    # Every 429'd batch was re-sent with the same ids.
    throttled = set(proxy.event_ids(429))
    assert throttled and throttled <= set(proxy.event_ids(200))
    wait_loaded(shared_server)
    rows = shared_server.sql(
        f"SELECT count(), uniqExact(event_id) FROM events WHERE JSONExtractString(properties, 'run') = '{run}'"
    )["rows"]
    assert rows == [[5001, 5001]]
    assert set(ids) <= set(proxy.event_ids(200))


def test_exit_flushes_the_queue(shared_server: StrataServer) -> None:
    run = uuid.uuid4().hex
    code = (
        "from strata.sdk import Client\n"
        f"c = Client({shared_server.url!r}, {WRITE_KEY!r}, flush_at=1000, flush_interval=3600)\n"
        f"for i in range(300): c.track('exit_flush', user_id=f'u{{i}}', properties={{'run': {run!r}}})\n"
        "print(c.stats.queued)\n"  # nothing sent yet: only the exit can send them
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "300"
    wait_loaded(shared_server)
    assert shared_server.scalar(
        f"SELECT count() FROM events WHERE JSONExtractString(properties, 'run') = '{run}'"
    ) == 300


def test_async_client(shared_server: StrataServer) -> None:
    run = uuid.uuid4().hex
    proxy = ScriptedServer(upstream=shared_server.url)
    proxy.too_many = 3

    async def main() -> AsyncClient:
        async with AsyncClient(proxy.url, WRITE_KEY, flush_at=50, backoff_base=0.01) as client:
            for i in range(1000):
                await client.track("async", user_id=f"u{i % 10}", properties={"run": run},
                                   country="DE", revenue=1.5)
            assert await client.flush(timeout=60)
        return client

    try:
        client = asyncio.run(main())
    finally:
        proxy.close()
    assert client.stats.accepted == 1000 and client.stats.batches >= 20
    assert client.stats.retries == 3
    wait_loaded(shared_server)
    rows = shared_server.sql(
        "SELECT count(), uniqExact(event_id), any(country), sum(revenue) FROM events "
        f"WHERE JSONExtractString(properties, 'run') = '{run}'"
    )["rows"]
    assert rows == [[1000, 1000, "DE", 1500.0]]


def test_client_side_validation_and_rejections(shared_server: StrataServer) -> None:
    with pytest.raises(ValueError, match="user_id"):
        Client(shared_server.url, WRITE_KEY).track("x")
    with Client(shared_server.url, WRITE_KEY) as client:
        with pytest.raises(ValueError, match="colour"):
            client.track("x", user_id="u", colour="red")
        client.track("x", user_id="u", timestamp=0)  # older than max_event_age
        client.track("x", user_id="u")
        assert client.flush(timeout=60)
    assert client.stats.accepted == 1 and client.stats.rejected == 1
    assert "timestamp" in client.stats.last_error
    bad = Client(shared_server.url, "wrong-key", max_retry_time=5)
    bad.track("x", user_id="u")
    bad.close()
    assert bad.stats.rejected == 1 and "401" in bad.stats.last_error
