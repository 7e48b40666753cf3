"""The fast normalizer produces exactly what the straightforward one did.

``ReferenceNormalizer`` below is the per-event implementation that
``strata.events.Normalizer`` replaced (decode into ``EventIn``, build an
``EventRecord``, encode it), kept as the specification. One change was
made to it with the fast path, marked CHANGED: invalid UTF-8 inside a
string used to escape as a UnicodeDecodeError (HTTP 500); it is now a
rejection of that event. For the same
input, the same ``received_at``/``sent_at`` and the same random bytes for
missing event ids, both must give the same log records byte for byte, the
same partitions and the same rejections (index and message), over a corpus
of awkward events and over generated batches.
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.events import (
    EVENT_FIELDS,
    EventIn,
    EventRecord,
    NormalizedEvent,
    Normalizer,
    RejectedEvent,
    _validation_message,
    invalid_utf8_message,
    utf8_error,
    partition_for,
    to_epoch_ms,
)

RECEIVED = 1_790_000_000_000  # 2026-09-21T14:13:20Z
HOUR = 3_600_000


class ReferenceNormalizer:
    """The per-event normalizer as it was before the fast path (the spec)."""

    _decoder = msgspec.json.Decoder(EventIn)
    _encoder = msgspec.json.Encoder()

    def __init__(
        self,
        *,
        partitions: int,
        max_future_skew_ms: int,
        max_event_age_ms: int,
        max_event_bytes: int = 64 * 1024,
        hot_keys: Sequence[str] = (),
        salt_buckets: int = 1,
    ) -> None:
        self.partitions = partitions
        self.max_future_skew_ms = max_future_skew_ms
        self.max_event_age_ms = max_event_age_ms
        self.max_event_bytes = max_event_bytes
        self.hot_keys = frozenset(hot_keys)
        self.salt_buckets = salt_buckets

    def normalize(
        self,
        raw_events: Sequence[bytes | msgspec.Raw],
        *,
        sent_at_ms: int | None,
        received_at_ms: int,
    ) -> tuple[list[tuple[int, bytes, EventRecord]], list[RejectedEvent]]:
        accepted: list[tuple[int, bytes, EventRecord]] = []
        rejected: list[RejectedEvent] = []
        skew = 0 if sent_at_ms is None else received_at_ms - sent_at_ms
        oldest = received_at_ms - self.max_event_age_ms
        newest = received_at_ms + self.max_future_skew_ms
        fresh_ids = os.urandom(16 * len(raw_events)).hex()
        for index, raw in enumerate(raw_events):
            if len(raw) > self.max_event_bytes:
                rejected.append(
                    RejectedEvent(index, f"event: larger than {self.max_event_bytes} bytes")
                )
                continue
            try:
                event = self._decoder.decode(raw)
            except msgspec.ValidationError as exc:
                rejected.append(RejectedEvent(index, _validation_message(exc)))
                continue
            except msgspec.DecodeError as exc:
                bad = utf8_error(raw)  # CHANGED: msgspec >= 0.23 reports UTF-8 here
                rejected.append(
                    RejectedEvent(
                        index,
                        invalid_utf8_message(bad) if bad else f"event: invalid JSON: {exc}",
                    )
                )
                continue
            except UnicodeDecodeError as exc:  # CHANGED: was unhandled (HTTP 500)
                rejected.append(RejectedEvent(index, invalid_utf8_message(exc)))
                continue
            user_id = "" if event.user_id is None else str(event.user_id)
            anonymous_id = event.anonymous_id or ""
            distinct_id = user_id or anonymous_id
            if not distinct_id:
                rejected.append(
                    RejectedEvent(index, "user_id: one of user_id or anonymous_id is required")
                )
                continue
            properties = bytes(event.properties).strip()
            if not properties or properties == b"null":
                properties_text = "{}"
            elif properties[:1] != b"{":
                rejected.append(RejectedEvent(index, "properties: expected an object"))
                continue
            else:
                try:
                    properties_text = properties.decode()
                except UnicodeDecodeError as exc:  # CHANGED: was unhandled (HTTP 500)
                    rejected.append(RejectedEvent(index, invalid_utf8_message(exc)))
                    continue
            if event.timestamp is None:
                ts = received_at_ms
            else:
                ts = to_epoch_ms(event.timestamp) + skew
                if ts > newest:
                    ts = received_at_ms
                elif ts < oldest:
                    rejected.append(
                        RejectedEvent(index, "timestamp: older than ingest.max_event_age")
                    )
                    continue
            event_id = event.event_id or fresh_ids[32 * index : 32 * index + 32]
            revenue = event.revenue
            if revenue is not None and revenue != revenue:  # NaN
                rejected.append(RejectedEvent(index, "revenue: must be a finite number"))
                continue
            record = EventRecord(
                event_id=event_id,
                event_type=event.event_type,
                user_id=user_id,
                anonymous_id=anonymous_id,
                distinct_id=distinct_id,
                session_id=event.session_id or "",
                ts=ts,
                received_at=received_at_ms,
                country=event.country or "",
                platform=event.platform or "",
                os=event.os or "",
                app_version=event.app_version or "",
                path=event.path or "",
                referrer=event.referrer or "",
                revenue=revenue or 0.0,
                currency=event.currency or "",
                properties=properties_text,
            )
            partition = partition_for(
                distinct_id, event_id, self.partitions, self.hot_keys, self.salt_buckets
            )
            accepted.append((partition, self._encoder.encode(record), record))
        return accepted, rejected


SETTINGS: dict[str, Any] = {
    "partitions": 8,
    "max_future_skew_ms": HOUR,
    "max_event_age_ms": 7 * 24 * HOUR,
    "max_event_bytes": 2048,
    "hot_keys": ("hot", "u1"),
    "salt_buckets": 4,
}


@pytest.fixture(autouse=True)
def same_random_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both normalizers draw os.urandom once per call: give them equal bytes."""
    monkeypatch.setattr(os, "urandom", lambda n: bytes(i % 251 for i in range(n)))


def compare(
    raw_events: Sequence[bytes | msgspec.Raw],
    *,
    sent_at_ms: int | None = None,
    received_at_ms: int = RECEIVED,
    normalizer: Normalizer | None = None,
) -> None:
    fast = normalizer or Normalizer(**SETTINGS)
    reference = ReferenceNormalizer(**SETTINGS)
    got, got_rejected = fast.normalize(
        raw_events, sent_at_ms=sent_at_ms, received_at_ms=received_at_ms
    )
    want, want_rejected = reference.normalize(
        raw_events, sent_at_ms=sent_at_ms, received_at_ms=received_at_ms
    )
    assert got_rejected == want_rejected
    assert [(p, v) for p, v, _ in got] == [(p, v) for p, v, _ in want]
    for (_, value, event), (_, _, record) in zip(got, want, strict=True):
        assert {f: getattr(event, f) for f in EVENT_FIELDS} == msgspec.structs.asdict(record)
        assert msgspec.json.decode(value, type=EventRecord) == record


def corpus() -> Iterator[Any]:
    base = {"event_type": "page_view", "user_id": "u7"}
    yield base
    yield {
        **base,
        "event_id": "e-1",
        "country": "DE",
        "platform": "web",
        "os": "Linux",
        "app_version": "1.0",
        "path": "/p?q=1",
        "referrer": "x.org",
        "session_id": "s",
        "revenue": 9.99,
        "currency": "EUR",
        "properties": {"plan": "pro", "n": [1, {"a": None}]},
    }
    # unicode, escapes, control characters, surrogate pairs
    yield {
        **base,
        "user_id": "ünï✓",
        "country": "🇩🇪",
        "path": '/a"b\\c\n\t\u0001',
        "properties": {"ключ": "значение", "emoji": "😀", "esc": '"\\/\b\f\n\r\t'},
    }
    yield {**base, "properties": {"deep": [[[[{"x": [1.5e300, -0.0, 1e-320]}]]]]}}
    # identities
    yield {"event_type": "a", "anonymous_id": "anon"}
    yield {"event_type": "a", "user_id": "", "anonymous_id": "anon"}
    yield {"event_type": "a", "user_id": None, "anonymous_id": "anon"}
    yield {"event_type": "a", "user_id": 12345}
    yield {"event_type": "a", "user_id": 0}
    yield {"event_type": "a", "user_id": -7}
    yield {"event_type": "a", "user_id": 2**63 - 1}
    yield {"event_type": "a", "user_id": 2**64 + 1}
    yield {"event_type": "a", "user_id": 1.5}
    yield {"event_type": "a", "user_id": True}
    yield {"event_type": "a"}
    yield {"event_type": "a", "user_id": None, "anonymous_id": None}
    yield {"event_type": "a", "anonymous_id": ""}
    yield {"event_type": "a", "user_id": "u" * 256}
    yield {"event_type": "a", "user_id": "u" * 257}
    yield {"event_type": "a", "user_id": "hot", "event_id": "h1"}
    yield {"event_type": "a", "user_id": "hot"}
    yield {"event_type": "a", "anonymous_id": "u1", "event_id": "h2"}
    # event_type and event_id
    yield {"user_id": "u"}
    yield {"event_type": "", "user_id": "u"}
    yield {"event_type": "t" * 200, "user_id": "u"}
    yield {"event_type": "t" * 201, "user_id": "u"}
    yield {"event_type": None, "user_id": "u"}
    yield {"event_type": ["a"], "user_id": "u"}
    yield {**base, "event_id": ""}
    yield {**base, "event_id": None}
    yield {**base, "event_id": 5}
    yield {**base, "event_id": "dup"}
    yield {**base, "event_id": "dup"}
    # every nullable field null, and wrongly typed
    for field in (
        "session_id",
        "country",
        "platform",
        "os",
        "app_version",
        "path",
        "referrer",
        "currency",
        "revenue",
        "timestamp",
        "properties",
    ):
        yield {**base, field: None}
        yield {**base, field: 1 if field not in ("revenue", "timestamp") else "x"}
        yield {**base, field: {"nested": True}}
    yield {**base, "country": "c" * 256}
    yield {**base, "country": "c" * 257}
    yield {**base, "path": "p" * 2048}
    yield {**base, "path": "p" * 2049}
    yield {**base, "properties": [1, 2]}
    yield {**base, "properties": "{}"}
    yield {**base, "properties": {}}
    yield {**base, "properties": 3}
    # revenue
    for revenue in (0, 0.0, -0.0, 5, -5, 1e308, 2**70, 1e-320, 0.1 + 0.2):
        yield {**base, "revenue": revenue}
    # timestamps: epoch ms, ISO with and without offset, too old, far ahead
    for timestamp in (
        RECEIVED,
        RECEIVED - HOUR,
        RECEIVED + HOUR,
        RECEIVED + HOUR + 1,
        RECEIVED - 7 * 24 * HOUR,
        RECEIVED - 7 * 24 * HOUR - 1,
        0,
        -1,
        2**62,
        "2026-09-21T14:13:20Z",
        "2026-09-21T14:13:20.123456Z",
        "2026-09-21T14:13:20",
        "2026-09-21T16:13:20+02:00",
        "2026-09-21T10:13:20.5-04:00",
        "2026-09-21",
        "2026-13-40T00:00:00Z",
        "yesterday",
        1.5,
        True,
        [RECEIVED],
    ):
        yield {**base, "timestamp": timestamp}
    # fields that are not client fields are ignored, whatever they hold
    yield {
        **base,
        "ts": "garbage",
        "distinct_id": ["x"],
        "received_at": {"a": 1},
        "timestamp": RECEIVED - 5,
        "extra": None,
        "schema_version": 3,
        "type": "track",
    }
    yield {**base, "ts": 123, "distinct_id": "someone-else", "received_at": -1}
    # not an object at all
    yield ["event_type", "a"]
    yield "page_view"
    yield 42
    yield None


RAW_CORPUS: list[bytes] = [
    b'{"event_type": "a", "user_id": "u", "user_id": "v"}',  # duplicate key
    b'{"event_type": "a", "event_type": "b", "user_id": "u"}',
    b'{"event_type":"a","user_id":"u","properties":  {"a" : 1}  }',
    b'{"event_type": "a", "user_id": "u", "ts": tru}',
    b'{"event_type": "a", "user_id": "u", "distinct_id": [1, }',
    b'{"event_type": "a", "user_id": "u"',
    b'{"event_type": "a", "user_id": "u"} trailing',
    b"",
    b"   ",
    b'{"event_type": "a", "user_id": "u\\ud800"}',  # lone surrogate escape
    b'{"event_type": "a", "user_id": "\xff\xfe"}',  # invalid UTF-8
    b'{"event_type": "a", "user_id": "u", "properties": {"k": "\xc3("}}',
    b'{"event_type": "a", "user_id": "u", "ignored": "\xff"}',
    b'{"event_type": "a", "user_id": "u", "revenue": 1e400}',
    b'{"event_type": "a", "user_id": "u", "revenue": NaN}',
    b'{"event_type": "a", "user_id": "u", "revenue": 1E2}',
    b'{"event_type": "a", "user_id": "u", "timestamp": 1790000000000.0}',
    b'{"event_type": "a", "user_id": 1e3}',
    b'{"event_type": "a", "user_id": "u", "properties": {"n": null}, "country": null}',
    b'{"event_type": "a", "user_id": "u", "path": "/nullable", "referrer": "null"}',
    b'{"event_type": "a", "user_id": "u", "x": "' + b"y" * 3000 + b'"}',  # over 2048 bytes
]


def corpus_bytes() -> list[bytes]:
    encoded = [json.dumps(event).encode() for event in corpus()]
    encoded += [msgspec.json.encode(event) for event in corpus() if event is not None]
    return encoded + RAW_CORPUS


def test_fast_struct_has_the_client_types() -> None:
    """Same field types as EventIn, so msgspec says the same on bad input;
    the record fields in EventRecord's order, so the encoding is the same."""
    fast = typing.get_type_hints(NormalizedEvent, include_extras=True)
    client = typing.get_type_hints(EventIn, include_extras=True)
    assert {name: fast[name] for name in client} == client
    assert NormalizedEvent.__struct_fields__ == (*EVENT_FIELDS, "timestamp")


def test_corpus_one_batch() -> None:
    compare(corpus_bytes())


def test_corpus_each_event_alone_and_as_raw() -> None:
    normalizer = Normalizer(**SETTINGS)  # one instance: its partition cache is exercised
    for raw in corpus_bytes():
        compare([raw], normalizer=normalizer)
    body = b'{"batch": [' + b", ".join(corpus_bytes()[: -len(RAW_CORPUS)]) + b"]}"
    raws = msgspec.json.decode(body, type=dict[str, list[msgspec.Raw]])["batch"]
    compare(raws, normalizer=normalizer)


@pytest.mark.parametrize("sent_at_ms", [RECEIVED - 90_000, RECEIVED + 5_000, RECEIVED - 30 * HOUR])
def test_corpus_with_clock_skew(sent_at_ms: int) -> None:
    compare(corpus_bytes(), sent_at_ms=sent_at_ms)


def test_batch_columns_match_the_triples() -> None:
    normalizer = Normalizer(**SETTINGS)
    raws = corpus_bytes()
    batch = normalizer.normalize_batch(raws, sent_at_ms=None, received_at_ms=RECEIVED)
    accepted, rejected = normalizer.normalize(raws, sent_at_ms=None, received_at_ms=RECEIVED)
    assert batch.rejected == rejected
    assert batch.partitions == [p for p, _, _ in accepted]
    assert batch.values == [v for _, v, _ in accepted]
    assert len(batch.events) == len(accepted) > 50
    assert len(batch.rejected) > 50


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
ISO = st.datetimes().map(lambda d: d.isoformat()) | st.datetimes().map(
    lambda d: d.isoformat() + "Z"
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "event_type": st.sampled_from(["page_view", "signup", ""]) | JSON_VALUES,
    "event_id": st.sampled_from(["e1", "e2", ""]) | st.text(max_size=3) | st.none(),
    "user_id": st.sampled_from(["u1", "hot", "u2", ""]) | st.integers() | st.none() | JSON_VALUES,
    "anonymous_id": st.sampled_from(["a1", ""]) | st.none() | JSON_VALUES,
    "timestamp": st.integers(min_value=RECEIVED - 9 * 24 * HOUR, max_value=RECEIVED + 2 * HOUR)
    | ISO
    | JSON_VALUES,
    "revenue": st.floats(allow_nan=False) | st.integers() | st.none() | JSON_VALUES,
    "properties": st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4) | JSON_VALUES,
    **{
        name: st.text(max_size=4) | st.none() | JSON_VALUES
        for name in (
            "session_id",
            "country",
            "platform",
            "os",
            "app_version",
            "path",
            "referrer",
            "currency",
            "ts",
            "distinct_id",
            "received_at",
            "other",
        )
    },
}


@st.composite
def events(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 20)) == 0:
        return draw(JSON_VALUES)
    names = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), unique=True, max_size=10))
    event = {name: draw(FIELD_VALUES[name]) for name in names}
    if draw(st.booleans()):
        event.setdefault("event_type", "page_view")
        event.setdefault("user_id", "u1")
    return event


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    batch=st.lists(events(), min_size=1, max_size=12),
    skew=st.none() | st.integers(min_value=-2 * HOUR, max_value=2 * HOUR),
)
def test_generated_batches(batch: list[Any], skew: int | None) -> None:
    raws = [json.dumps(event, ensure_ascii=False).encode() for event in batch]
    compare(raws, sent_at_ms=None if skew is None else RECEIVED + skew)


@pytest.fixture
def ingest_client(tmp_path: Any) -> Iterator[Any]:
    """The ingest routes in-process over a real embedded log."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from strata.auth import Keyring
    from strata.config import load_config
    from strata.ingest.app import IngestService, ingest_routes
    from strata.ingest.committer import GroupCommitter
    from strata.log import open_log

    config = load_config(
        overrides={"data_dir": str(tmp_path), "auth.write_keys": ["wk"], "log.fsync": "never"},
        environ={},
    )
    log = open_log(config)
    committer = GroupCommitter(log)
    service = IngestService(config, committer, Keyring(config), log=log)
    try:
        with TestClient(Starlette(routes=ingest_routes(service))) as client:
            client.headers["Authorization"] = "Bearer wk"
            client.strata_service = service  # type: ignore[attr-defined]
            yield client
    finally:
        committer.close()
        log.close()


GOOD = b'{"event_type": "a", "user_id": "u"}'


@pytest.mark.parametrize(
    ("path", "body", "status", "answer"),
    [
        # in an event: that event is rejected, the others are accepted
        (
            "/v1/batch",
            b'{"batch": [' + GOOD + b', {"event_type": "a", "user_id": "\xff"}]}',
            200,
            {
                "accepted": 1,
                "rejected": [
                    {
                        "index": 1,
                        "error": "event: invalid JSON: not valid UTF-8 (invalid start byte)",
                    }
                ],
            },
        ),
        (
            "/v1/batch",
            b'{"batch": [{"event_type": "a", "user_id": "u", "properties": '
            b'{"k": "\xc3("}}, ' + GOOD + b"]}",
            200,
            {
                "accepted": 1,
                "rejected": [
                    {
                        "index": 0,
                        "error": "event: invalid JSON: not valid UTF-8 (invalid continuation byte)",
                    }
                ],
            },
        ),
        # not readable as a Segment message, so a native event without event_type
        (
            "/v1/batch",
            b'{"batch": [{"type": "\xff", "userId": "u"}, ' + GOOD + b"]}",
            200,
            {
                "accepted": 1,
                "rejected": [{"index": 0, "error": "event_type: required field missing"}],
            },
        ),
        (
            "/v1/batch",
            b'{"sentAt": "2026-01-01T00:00:00Z", "batch": [{"type": "track", '
            b'"event": "\xff", "userId": "u"}]}',
            200,
            {
                "accepted": 0,
                "rejected": [
                    {
                        "index": 0,
                        "error": "event: invalid JSON: not valid UTF-8 (invalid start byte)",
                    }
                ],
            },
        ),
        # in the request itself: 400 naming the body
        (
            "/v1/batch",
            b'{"batch": [' + GOOD + b'], "context": {"a": "\xff"}}',
            400,
            {"error": "body: malformed JSON: not valid UTF-8 (invalid start byte)"},
        ),
        (
            "/v1/batch",
            b'{"batch": [' + GOOD + b'], "write_key": "\xff"}',
            400,
            {"error": "body: malformed JSON: not valid UTF-8 (invalid start byte)"},
        ),
        (
            "/v1/track",
            b'{"event_type": "a", "\xff": "u"}',
            400,
            {"error": "body: malformed JSON: not valid UTF-8 (invalid start byte)"},
        ),
        (
            "/v1/track",
            b'{"event_type": "a", "user_id": "\xff"}',
            400,
            {"error": "event: invalid JSON: not valid UTF-8 (invalid start byte)"},
        ),
    ],
)
def test_invalid_utf8_is_a_clear_4xx_or_rejection(
    ingest_client: Any, path: str, body: bytes, status: int, answer: dict[str, Any]
) -> None:
    """msgspec reports invalid UTF-8 as UnicodeDecodeError, which used to
    escape as an HTTP 500."""
    response = ingest_client.post(path, content=body)
    assert (response.status_code, response.json()) == (status, answer)


def test_accepted_events_reach_the_log_as_normalized(ingest_client: Any) -> None:
    """What /v1/batch acknowledges is in the log: per partition, in order,
    byte for byte what the reference normalizer makes of the same events at
    the same received_at."""
    from strata.events import record_decoder

    service = ingest_client.strata_service
    events = [
        json.dumps({**event, "event_id": f"id-{index}"}).encode()
        for index, event in enumerate(corpus())
        if isinstance(event, dict)
    ]
    response = ingest_client.post("/v1/batch", content=b'{"batch": [' + b", ".join(events) + b"]}")
    assert response.status_code == 200
    answer = response.json()
    partitions = service.config.log.partitions
    consumer = service._log.consumer("test", "events")
    consumer.assign(list(range(partitions)))
    stored: dict[int, list[bytes]] = {}
    for _ in range(100):
        for record in consumer.poll(1000, timeout_s=0.1):
            stored.setdefault(record.partition, []).append(record.value)
        if sum(map(len, stored.values())) >= answer["accepted"]:
            break
    consumer.close()
    received_at = record_decoder.decode(next(iter(stored.values()))[0]).received_at
    reference = ReferenceNormalizer(
        partitions=partitions,
        max_future_skew_ms=service.normalizer.max_future_skew_ms,
        max_event_age_ms=service.normalizer.max_event_age_ms,
        max_event_bytes=service.normalizer.max_event_bytes,
    )
    accepted, rejected = reference.normalize(events, sent_at_ms=None, received_at_ms=received_at)
    want: dict[int, list[bytes]] = {}
    for partition, value, _ in accepted:
        want.setdefault(partition, []).append(value)
    assert stored == want
    assert answer == {
        "accepted": len(accepted),
        "rejected": [{"index": r.index, "error": r.error} for r in rejected],
    }
    assert len(accepted) > 50 and len(rejected) > 30


def test_keyless_records_are_a_sequence_of_records() -> None:
    from strata.ingest.committer import KeylessRecords

    records = KeylessRecords([b"a", b"b", b"c"])
    assert len(records) == 3
    assert list(records) == [(None, b"a"), (None, b"b"), (None, b"c")]
    assert records[1] == (None, b"b") and records[-1] == (None, b"c")
    assert list(records[1:]) == [(None, b"b"), (None, b"c")]
    assert [value for _, value in records] == [b"a", b"b", b"c"]
