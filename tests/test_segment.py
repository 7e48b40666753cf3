"""Segment compatibility: the official `segment-analytics-python` package,
unchanged, with its host pointed at strata (through a proxy that answers
429 a few times, so its retries are exercised too)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import segment.analytics as analytics
from tests.conftest import WRITE_KEY
from tests.fixtures_sdk import ScriptedServer, wait_loaded

from strata.ingest.segment import MappingError, map_message


def test_mapping_of_one_message() -> None:
    kind, mapped = map_message(
        {"type": "page", "name": "Home", "anonymousId": "a1", "messageId": "m1",
         "timestamp": "2024-05-01T10:00:00Z", "sentAt": "2024-05-01T10:00:05Z",
         "properties": {"path": "/home", "referrer": "https://x"},
         "context": {"locale": "de-AT", "userAgent": "Mozilla", "os": {"name": "Linux"}}},
        received_at_ms=1_714_557_610_000,  # 10:00:10, so the clock is 5 s behind
    )
    import json

    event = json.loads(mapped)
    assert kind == "event"
    assert event["event_type"] == "page_view" and event["event_id"] == "m1"
    assert event["timestamp"] == 1_714_557_605_000
    assert (event["country"], event["platform"], event["os"]) == ("AT", "web", "Linux")
    assert (event["path"], event["referrer"]) == ("/home", "https://x")
    assert event["properties"]["name"] == "Home"


def test_unsupported_and_malformed_messages_are_refused_by_field() -> None:
    for message, reason in (
        ({"type": "group", "userId": "u", "groupId": "g"}, "type: 'group' is not supported"),
        ({"type": "track", "userId": "u"}, "event: required for track"),
        ({"type": "track", "event": "x"}, "userId: one of userId or anonymousId"),
        ({"type": "track", "event": "x", "userId": "u", "timestamp": "soon"}, "timestamp:"),
        ({"type": "track", "event": "x", "userId": "u", "properties": [1]}, "properties:"),
    ):
        with pytest.raises(MappingError, match=reason.replace("(", r"\(")):
            map_message(message, received_at_ms=0)


def test_segment_python_sends_10k_events_exactly_once(shared_server: Any) -> None:
    proxy = ScriptedServer(upstream=shared_server.url)
    proxy.too_many = 5
    run = uuid.uuid4().hex
    errors: list[Any] = []
    client = analytics.Client(
        write_key=WRITE_KEY, host=proxy.url, gzip=True, max_queue_size=20_000,
        upload_size=250, on_error=lambda error, batch: errors.append(error),
        max_retries=20,
    )
    when = datetime.now(UTC) - timedelta(minutes=5)
    context = {"location": {"country": "FR"}, "os": {"name": "iOS"}, "app": {"version": "3.2.1"},
               "device": {"type": "ios"}}
    sent: dict[str, str] = {}
    for i in range(10_000):
        message_id = f"{run}-{i}"
        user = f"user-{i % 300}"
        if i % 20 == 0:
            client.identify(user, {"email": f"{user}@example.com", "run": run},
                            message_id=message_id, timestamp=when)
            sent[message_id] = "identify"
        elif i % 10 == 1:
            client.page(user, category="docs", name="Pricing", message_id=message_id,
                        properties={"path": "/pricing", "run": run}, context=context,
                        timestamp=when)
            sent[message_id] = "page_view"
        elif i % 10 == 2:
            client.screen(user, name="Settings", message_id=message_id,
                          properties={"run": run}, context=context, timestamp=when)
            sent[message_id] = "screen_view"
        else:
            client.track(user, "Order Completed", {"revenue": 10.5, "currency": "EUR", "run": run},
                         context=context, message_id=message_id, timestamp=when)
            sent[message_id] = "Order Completed"
    client.flush()
    client.shutdown()
    proxy.close()
    assert errors == []
    assert any(r["status"] == 429 for r in proxy.requests)
    wait_loaded(shared_server)
    rows = shared_server.sql(
        "SELECT event_id, event_type, user_id, country, os, app_version, platform, revenue, "
        "currency, path, toUnixTimestamp64Milli(ts) FROM events "
        f"WHERE JSONExtractString(properties, 'run') = '{run}'"
    )["rows"]
    events = {r[0]: r for r in rows}
    assert len(rows) == len(events)  # exactly once
    assert {k: v for k, v in sent.items() if v != "identify"} == {k: r[1] for k, r in events.items()}
    order = events[f"{run}-3"]
    assert order[1:10] == ["Order Completed", "user-3", "FR", "iOS", "3.2.1", "ios", 10.5, "EUR", ""]
    assert events[f"{run}-1"][9] == "/pricing"
    # timestamp + (received_at - sentAt): within seconds of the client's time.
    assert abs(order[10] - int(when.timestamp() * 1000)) < 60_000
    identities = shared_server.sql(
        "SELECT user_id, argMax(traits, ts) FROM identities "
        f"WHERE JSONExtractString(traits, 'run') = '{run}' GROUP BY user_id"
    )["rows"]
    assert len(identities) == 15  # users 0, 20, 40, ... 280 identify
    assert shared_server.scalar(
        f"SELECT count() FROM identities WHERE JSONExtractString(traits, 'run') = '{run}'"
    ) == 500
    assert dict(identities)["user-0"].startswith('{"email":"user-0@example.com"')
