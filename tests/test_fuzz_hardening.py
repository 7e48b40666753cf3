"""Hostile input, generated: schemathesis against the served OpenAPI
description, hypothesis on the config loader and on corrupted log segments.

The ingest API and the SQL endpoint have their own hypothesis fuzzers
(tests/test_ingest_api.py ``test_fuzz_*``, tests/test_query_sandbox.py
``test_fuzz_*``). Example counts are kept small for CI; docs/reliability.md
gives the command for a long run (``STRATA_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import ADMIN_TOKEN, WRITE_KEY, StrataServer

from strata.config import ConfigError, load_config
from strata.log.base import LogError
from strata.log.embedded import EmbeddedLog

EXAMPLES = int(os.environ.get("STRATA_FUZZ_EXAMPLES", "25"))


# -- the HTTP API, from its own OpenAPI description --------------------------------------
@pytest.fixture(scope="module")
def api_schema(shared_server: StrataServer) -> Any:
    return schemathesis.openapi.from_url(f"{shared_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")
ACCEPTED: list[int] = []  # events the fuzzer got accepted, for the data check below


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case: Any, shared_server: StrataServer) -> None:
    """Every operation, generated bodies/parameters (valid and not), with the
    key its scope needs: never a 5xx, never a connection drop."""
    path = case.operation.path
    token = WRITE_KEY if path in ("/v1/batch", "/v1/track") else ADMIN_TOKEN
    response = case.call(base_url=shared_server.url,
                         headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert response.status_code < 500, (case.operation.label, response.status_code, response.text)
    if path in ("/v1/batch", "/v1/track") and response.status_code == 200:
        body = response.json()
        ACCEPTED.append(int(body.get("accepted", 1)))


def test_rejected_requests_stored_nothing(shared_server: StrataServer) -> None:
    """Runs after the fuzzer (same module, file order): the raw table holds
    exactly the events of the accepted requests."""
    shared_server.wait_caught_up()
    stored = shared_server.sql("SELECT count() FROM events WHERE event_type != ''")["rows"][0][0]
    assert stored == sum(ACCEPTED)


# -- the config loader ---------------------------------------------------------------------
SECTIONS = ["server", "ingest", "log", "store", "loader", "processor", "serving", "lake",
            "query", "auth", "schemas", "dashboard", "bogus"]
FIELDS = ["port", "partitions", "retention", "max_bytes", "fsync", "backend", "path",
          "cache_ttl", "write_keys", "max_body_bytes", "segment_bytes", "early_firing_interval",
          "rate_limit_per_minute", "user_limits", "hot_user_ids", "refresh_interval", "nope"]
scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["5m", "0s", "-1d", "7d", "always", "memory", "redis", "kafka", "1e9", ""]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=4)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(value, "nan" if value != value
                                                               else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


documents = st.dictionaries(
    st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(FIELDS), values, max_size=4),
    max_size=4,
)


def _render(document: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, fields in document.items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {_toml_value(value)}" for name, value in fields.items()]
    return "\n".join(lines) + "\n"


def _load(text: str | None, environ: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = None
        if text is not None:
            path = Path(tmp) / "strata.toml"
            path.write_text(text)
        try:
            load_config(path, overrides={"data_dir": tmp}, environ=environ)
        except ConfigError:
            pass


@settings(max_examples=EXAMPLES * 8, deadline=None)
@given(documents)
def test_config_files_fail_only_with_config_error(document: dict[str, dict[str, Any]]) -> None:
    _load(_render(document), {})


@settings(max_examples=EXAMPLES * 4, deadline=None)
@given(st.text(alphabet=string.printable, max_size=200))
def test_arbitrary_text_fails_only_with_config_error(text: str) -> None:
    _load(text, {})


@settings(max_examples=EXAMPLES * 8, deadline=None)
@given(st.dictionaries(
    st.builds(lambda s, f: f"STRATA_{s.upper()}__{f.upper()}", st.sampled_from(SECTIONS),
              st.sampled_from(FIELDS)),
    st.text(alphabet=string.printable, max_size=20), max_size=4,
))
def test_environment_overrides_fail_only_with_config_error(environ: dict[str, str]) -> None:
    _load(None, environ)


# -- the log reader on corrupted segments ----------------------------------------------------
def _write_log(path: Path) -> dict[int, bytes]:
    log = EmbeddedLog(path, fsync="never", segment_bytes=2048)
    log.create_topic("t", 1)
    producer = log.producer()
    written: dict[int, bytes] = {}
    offset = 0
    for batch in range(12):
        values = [b"batch-%d-record-%d-" % (batch, i) + b"x" * (i * 7) for i in range(batch % 5 + 1)]
        producer.produce_many("t", 0, [(None, value) for value in values])
        producer.flush()
        for value in values:
            written[offset] = value
            offset += 1
    log.close()
    return written


damage = st.lists(
    st.tuples(st.sampled_from(["flip", "truncate", "zero"]), st.floats(0, 1), st.integers(0, 255)),
    min_size=1, max_size=4,
)


@settings(max_examples=EXAMPLES * 4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage, st.integers(min_value=0, max_value=10))
def test_corrupted_segments_never_yield_a_bad_record(
    tmp_path_factory: pytest.TempPathFactory, operations: list[tuple[str, float, int]],
    which_segment: int,
) -> None:
    """Flip, zero or cut bytes of a segment file: opening and reading either
    raises LogError (the documented error) or returns records that are
    exactly the ones written at those offsets. Never another exception,
    never a record whose CRC did not match."""
    path = tmp_path_factory.mktemp("corrupt")
    written = _write_log(path)
    segments = sorted((path / "t" / "0").glob("*.seg"))
    segment = segments[which_segment % len(segments)]
    data = bytearray(segment.read_bytes())
    for kind, where, byte in operations:
        if not data:
            break
        position = min(len(data) - 1, int(where * len(data)))
        if kind == "flip":
            data[position] ^= byte or 0xFF
        elif kind == "zero":
            data[position:position + 16] = bytes(len(data[position:position + 16]))
        else:
            del data[position:]
    segment.write_bytes(bytes(data))
    try:
        log = EmbeddedLog(path, fsync="never", segment_bytes=2048)
    except LogError:
        return
    try:
        consumer = log.consumer("fuzz", "t")
        consumer.assign([0])
        consumer.seek(0, log.beginning_offsets("t")[0])
        for _ in range(100):
            records = consumer.poll(1000)
            if not records:
                break
            for record in records:
                assert written.get(record.offset) == record.value, record.offset
    except LogError:
        pass
    finally:
        log.close()


def test_funnel_window_of_the_wrong_type_is_a_400(shared_server: StrataServer) -> None:
    """Found by the schemathesis run: a non-string ``window`` was a 500."""
    for window in ([1], {"a": 1}, None, True):
        response = shared_server.client.post(
            f"{shared_server.url}/v1/metrics/funnel",
            json={"steps": ["a", "b"], "window": window}, headers=shared_server.headers())
        assert response.status_code == 400, (window, response.text)
        assert "window" in response.json()["error"]


def test_engine_types_and_huge_funnel_windows_never_5xx(shared_server: StrataServer) -> None:
    """Found by audit 5 (bugs 5 and 6): IPv4/IPv6 in JSON and a UInt64 above
    2^63 in Arrow were 500s (and the next request on the same connection
    could get a 503 from the worker proxy); huge funnel windows were 500s."""
    url = shared_server.url
    # A user of its own: the schemathesis run above may have emptied the
    # admin's rate-limit bucket.
    created = shared_server.client.post(
        f"{url}/v1/admin/tokens", json={"user": "types-fuzz", "scopes": ["sql", "metrics"]},
        headers=shared_server.headers())
    assert created.status_code == 201, created.text
    headers = shared_server.headers(str(created.json()["token"]))
    queries = [
        "SELECT toIPv4('1.2.3.4') AS ip",
        "SELECT toIPv6('::1') AS ip",
        "SELECT [toIPv4('1.2.3.4')] AS ips, map('k', toIPv6('::1')) AS m",
        "SELECT toUInt64(18446744073709551615) AS x",
        "SELECT toUInt128('340282366920938463463374607431768211455') AS x",
        "SELECT toInt256(-1) AS x, toDecimal128(-1.5, 5) AS d, toUUID('00000000-0000-0000-0000-000000000001') AS u",
    ]
    for text in queries:
        for accept in ("application/json", "text/csv", "application/vnd.apache.arrow.stream"):
            response = shared_server.client.post(
                f"{url}/v1/sql", json={"sql": text}, headers={**headers, "Accept": accept})
            assert response.status_code == 200, (text, accept, response.text)
            # The same connection answers the next request normally.
            after = shared_server.client.post(
                f"{url}/v1/sql", json={"sql": "SELECT 1 AS n"},
                headers={**headers, "Accept": "application/vnd.apache.arrow.stream"})
            assert after.status_code == 200, (text, accept, after.text)
    for window in ("10000000d", 9999999999999999999, 1e300, "999999999999d", 1.5, "9" * 400 + "d"):
        response = shared_server.client.post(
            f"{url}/v1/metrics/funnel",
            json={"steps": ["a", "b"], "window": window}, headers=headers)
        assert response.status_code == 400, (window, response.text)
        assert response.json()["error"].startswith("window:"), response.text
