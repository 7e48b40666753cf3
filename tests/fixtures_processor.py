"""Fixtures for the processor tests: a fixed log of events."""

from __future__ import annotations

import time

REDIS_SERVER = "/usr/bin/redis-server"


# -- a fixed log of events ------------------------------------------------------------------

# Yesterday 00:00 UTC: inside every TTL of the store.
BASE_MS = (int(time.time() * 1000) // 86_400_000 - 1) * 86_400_000


def make_events(
    count: int, *, seed: int = 7, span_ms: int = 2 * 3_600_000, late_share: float = 0.01
) -> list[dict]:
    """Events in arrival order: time mostly increasing with small disorder,
    plus a share far behind (late for the default 30 s bound)."""
    import random

    rng = random.Random(seed)
    events = []
    for i in range(count):
        ts = BASE_MS + int(span_ms * i / count) - rng.randint(0, 20_000)
        if rng.random() < late_share:
            ts -= rng.randint(60_000, 30 * 60_000)
        user = f"user-{int(rng.paretovariate(1.2)) % 400}"
        kind = rng.choices(["page_view", "click", "purchase", "signup"], [6, 3, 1, 0.3])[0]
        revenue = round(rng.uniform(1, 100), 2) if kind == "purchase" else 0.0
        events.append(
            {
                "event_id": f"ev-{seed}-{i}",
                "event_type": kind,
                "user_id": user if rng.random() < 0.8 else "",
                "anonymous_id": f"anon-{i % 97}",
                "distinct_id": "",
                "session_id": "",
                "ts": ts,
                "received_at": ts + 5,
                "country": rng.choice(["DE", "FR", "US", "BR", "IN"]),
                "platform": rng.choice(["web", "ios"]),
                "os": "",
                "app_version": "",
                "path": "/",
                "referrer": "",
                "revenue": revenue,
                "currency": rng.choice(["EUR", "USD"]) if revenue else "",
                "properties": "{}",
            }
        )
        events[-1]["distinct_id"] = events[-1]["user_id"] or events[-1]["anonymous_id"]
    return events


def fill_log(config, events: list[dict]) -> None:
    """Append ``events`` to topic ``events`` of the config's log, each in the
    partition the ingest API would pick."""
    import msgspec

    from strata.events import partition_for
    from strata.log import open_log

    log = open_log(config)
    producer = log.producer()
    partitions = config.log.partitions
    for i, event in enumerate(events):
        partition = partition_for(event["distinct_id"], event["event_id"], partitions)
        producer.produce("events", partition, None, msgspec.json.encode(event))
        if i % 2000 == 1999:
            producer.flush()
    producer.flush()
    producer.close()
    log.close()


def read_topic(config, topic: str) -> dict[str, dict]:
    """Every record of ``topic``, deduplicated by id (what the loader keeps)."""
    import json

    from strata.log import open_log

    log = open_log(config)
    consumer = log.consumer("test-reader", topic)
    consumer.assign(list(range(log.partitions(topic))))
    out: dict[str, dict] = {}
    while True:
        records = consumer.poll(10_000, timeout_s=0.0)
        if not records:
            break
        for record in records:
            value = json.loads(record.value)
            out.setdefault(value["id"], value)
    consumer.close()
    log.close()
    return out
