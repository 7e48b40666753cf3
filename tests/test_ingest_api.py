"""Ingest and SQL API contract: clear 4xx for bad input, nothing stored changes."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import ADMIN_TOKEN, QUERY_TOKEN, WRITE_KEY, StrataServer


def _post(server: StrataServer, body: bytes, headers: dict[str, str] | None = None,
          path: str = "/v1/batch") -> httpx.Response:
    base = {"Authorization": f"Bearer {WRITE_KEY}", "Content-Type": "application/json"}
    return server.client.post(f"{server.url}{path}", content=body, headers={**base, **(headers or {})})


def _stored(server: StrataServer) -> tuple[int, int]:
    server.wait_caught_up()
    status = server.status()
    ends = sum(status["log"]["end_offsets"].values())
    return ends, server.scalar("SELECT count() FROM events")


def test_accepts_and_reports_rejections_per_event(shared_server: StrataServer) -> None:
    response = shared_server.post_batch([
        {"event_type": "page_view", "user_id": "u1", "country": "DE"},
        {"event_type": 5, "user_id": "u2"},
        {"user_id": "u3"},
        {"event_type": "signup"},
        {"event_type": "x", "user_id": "u4", "revenue": "ten"},
        {"event_type": "x", "user_id": "u5", "properties": [1, 2]},
    ])
    assert response.status_code == 200
    body = response.json()
    assert body["accepted"] == 1
    errors = {r["index"]: r["error"] for r in body["rejected"]}
    assert errors[1].startswith("event_type:")
    assert errors[2] == "event_type: required field missing"
    assert errors[3].startswith("user_id:")
    assert errors[4].startswith("revenue:")
    assert errors[5].startswith("properties:")


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (b"{not json", {}, 400, "malformed JSON"),
        (b'{"batch": "nope"}', {}, 400, "batch"),
        (b'{"events": []}', {}, 400, "batch"),
        (b"[]", {}, 400, "body"),
        (b'{"batch": []}', {}, 400, "empty"),
        (json.dumps({"batch": [{"event_type": "a", "user_id": "u"}] * 1001}).encode(), {}, 413, "1000"),
        (b"x" * (6 * 2**20), {}, 413, "larger than"),
        (b"\x1f\x8b\x08\x00garbage-not-gzip", {"Content-Encoding": "gzip"}, 400, "gzip"),
        (gzip.compress(b'{"batch": [{"event_type": "a", "user_id": "u"}]}')[:-8],
         {"Content-Encoding": "gzip"}, 400, "gzip"),
        (gzip.compress(b" " * (6 * 2**20)), {"Content-Encoding": "gzip"}, 413, "after gzip"),
        (b'{"batch": [{"event_type": "a", "user_id": "u"}]}', {"Authorization": ""}, 401, "write key"),
        (b'{"batch": [{"event_type": "a", "user_id": "u"}]}', {"Authorization": "Bearer nope"}, 401, "write key"),
        (b'{"batch": [{"event_type": "a", "user_id": "u"}]}', {"Authorization": f"Bearer {QUERY_TOKEN}"}, 403, "write key"),
        (b'{"batch": [{"event_type": "a", "user_id": "u"}]}', {"Content-Encoding": "br"}, 415, "content-encoding"),
    ],
)
def test_bad_requests_get_clear_4xx_and_store_nothing(
    shared_server: StrataServer, body: bytes, headers: dict[str, str], status: int, needle: str
) -> None:
    before = _stored(shared_server)
    response = _post(shared_server, body, headers)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]
    assert _stored(shared_server) == before


def test_gzip_body_is_accepted(shared_server: StrataServer) -> None:
    body = gzip.compress(json.dumps({"batch": [{"event_type": "gz", "user_id": "u9"}]}).encode())
    response = _post(shared_server, body, {"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "rejected": []}


def test_track_single_event_and_clock_skew(shared_server: StrataServer) -> None:
    # The device clock is one hour behind: sent_at and timestamp both say 11:00
    # while the server receives at about now; the stored ts is shifted by the skew.
    import time

    now_ms = int(time.time() * 1000)
    device = now_ms - 3_600_000
    response = shared_server.client.post(
        f"{shared_server.url}/v1/track",
        json={"event_type": "skewed", "user_id": "skew", "timestamp": device - 5000,
              "sent_at": device, "event_id": "skew-1"},
        headers={"Authorization": f"Bearer {WRITE_KEY}"},
    )
    assert response.status_code == 200, response.text
    shared_server.wait_caught_up()
    row = shared_server.sql(
        "SELECT toUnixTimestamp64Milli(ts), toUnixTimestamp64Milli(received_at) FROM events "
        "WHERE event_id = 'skew-1'")["rows"][0]
    ts, received = row
    assert abs((received - ts) - 5000) < 50
    bad = shared_server.client.post(
        f"{shared_server.url}/v1/track", json={"user_id": "x"},
        headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert bad.status_code == 400
    assert "event_type" in bad.json()["error"]


def test_timestamp_rules(shared_server: StrataServer) -> None:
    import time

    now_ms = int(time.time() * 1000)
    response = shared_server.post_batch([
        {"event_type": "t", "user_id": "u", "event_id": "future-1", "timestamp": now_ms + 86_400_000},
        {"event_type": "t", "user_id": "u", "event_id": "old-1", "timestamp": now_ms - 100 * 86_400_000},
        {"event_type": "t", "user_id": "u", "event_id": "iso-1", "timestamp": "2026-01-01T00:00:00"},
    ])
    body = response.json()
    assert body["accepted"] == 1 or body["accepted"] == 2
    errors = {r["index"]: r["error"] for r in body["rejected"]}
    assert "max_event_age" in errors[1]
    shared_server.wait_caught_up()
    ts, received = shared_server.sql(
        "SELECT toUnixTimestamp64Milli(ts), toUnixTimestamp64Milli(received_at) FROM events "
        "WHERE event_id = 'future-1'")["rows"][0]
    assert ts == received  # clamped


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO events (event_id) VALUES ('x')",
        "DROP TABLE events",
        "ALTER TABLE events DELETE WHERE 1",
        "TRUNCATE TABLE events",
        "CREATE TABLE t (a Int8) ENGINE = Memory",
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:1/', 'CSV', 'a String')",
        "SELECT * FROM numbers(10)",
        "SELECT * FROM system.tables",
        "SELECT name FROM system.settings",
        "SELECT count() FROM events SETTINGS readonly = 0",
        "SET readonly = 0",
        "SELECT 1; DROP TABLE events",
        "SELECT file('/etc/passwd')",
        "SELECT count() FROM events /* */ ; DROP TABLE events",
        "SELECT * FROM sys\u200btem.tables",
        "",
    ],
)
def test_sql_sandbox_rejects(shared_server: StrataServer, sql: str) -> None:
    before = shared_server.scalar("SELECT count() FROM events")
    response = shared_server.client.post(
        f"{shared_server.url}/v1/sql", json={"sql": sql},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("sql:")
    assert shared_server.scalar("SELECT count() FROM events") == before


def test_sql_requires_a_query_token(shared_server: StrataServer) -> None:
    url = f"{shared_server.url}/v1/sql"
    assert shared_server.client.post(url, json={"sql": "SELECT 1"}).status_code == 401
    response = shared_server.client.post(
        url, json={"sql": "SELECT 1"}, headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert response.status_code in (401, 403)
    ok = shared_server.client.post(
        url, json={"sql": "SELECT count() FROM events"},
        headers={"Authorization": f"Bearer {QUERY_TOKEN}"})
    assert ok.status_code == 200
    assert set(ok.json()) >= {"columns", "rows", "served_from", "elapsed_ms"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
events = st.fixed_dictionaries(
    {},
    optional={
        "event_type": st.one_of(st.text(max_size=30), st.integers(), st.none()),
        "user_id": st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.integers())),
        "anonymous_id": st.text(max_size=10),
        "event_id": st.one_of(st.text(max_size=40), st.integers()),
        "timestamp": st.one_of(st.integers(), st.text(max_size=30), st.floats(allow_nan=True)),
        "revenue": st.one_of(st.floats(), st.text(max_size=5), st.integers()),
        "properties": json_values,
        "country": json_values,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    payload=st.one_of(
        st.fixed_dictionaries({"batch": st.lists(events, max_size=5)},
                              optional={"sent_at": st.one_of(st.text(max_size=30), st.integers())}),
        json_values,
    ),
    gzip_it=st.booleans(),
)
def test_fuzz_batch_never_5xx(shared_server: StrataServer, payload: Any, gzip_it: bool) -> None:
    body = json.dumps(payload).encode()
    headers = {}
    if gzip_it:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    response = _post(shared_server, body, headers)
    assert response.status_code < 500, response.text


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=300))
def test_fuzz_raw_bytes_never_5xx(shared_server: StrataServer, raw: bytes) -> None:
    assert _post(shared_server, raw).status_code < 500
    assert _post(shared_server, raw, path="/v1/track").status_code < 500
