"""The event model: what clients send, what the log stores, and the rules
that turn one into the other (validation, event time, partitioning).

A client event is validated on its own: a batch never fails because one of
its events is bad. The normalized event (``EventRecord``) is what every
later stage sees; it is encoded as one JSON object per log record.

Event time (docs/semantics.md):

* ``ts = timestamp + (received_at - sent_at)`` when the batch carries
  ``sent_at`` (Segment/PostHog clock-skew correction), else ``timestamp``,
  else ``received_at``. Numeric timestamps are epoch milliseconds; ISO-8601
  strings without an offset are UTC.
* A corrected ``ts`` more than ``ingest.max_future_skew`` ahead of
  ``received_at`` is clamped to ``received_at``.
* A corrected ``ts`` older than ``ingest.max_event_age`` is rejected.

Partitioning: ``partition = crc32(key) % partitions`` where ``key`` is the
``user_id`` (or ``anonymous_id``), so every retry of an event lands in the
partition of its original. A configured hot user_id gets a salt derived from
the ``event_id``: still deterministic, but spread over several partitions.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

import msgspec

ID = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Dim = Annotated[str, msgspec.Meta(max_length=256)]

# Typed common dimensions: top-level fields that become columns.
DIMENSIONS = ("country", "platform", "os", "app_version", "path", "referrer", "currency")


class EventIn(msgspec.Struct, kw_only=True):
    """One event as a client sends it. Unknown fields are ignored."""

    event_type: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    event_id: ID | None = None
    user_id: ID | int | None = None
    anonymous_id: ID | None = None
    session_id: Dim | None = None
    timestamp: int | datetime | None = None
    country: Dim | None = None
    platform: Dim | None = None
    os: Dim | None = None
    app_version: Dim | None = None
    path: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    referrer: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    revenue: float | None = None
    currency: Dim | None = None
    properties: msgspec.Raw = msgspec.Raw(b"")


class BatchIn(msgspec.Struct, kw_only=True):
    """``POST /v1/batch`` body. Events stay raw so each is decoded alone."""

    batch: list[msgspec.Raw]
    sent_at: datetime | int | None = None


class EventRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    """A normalized, accepted event: one log record in topic ``events``."""

    event_id: str
    event_type: str
    user_id: str
    anonymous_id: str
    distinct_id: str
    session_id: str
    ts: int
    received_at: int
    country: str
    platform: str
    os: str
    app_version: str
    path: str
    referrer: str
    revenue: float
    currency: str
    properties: str


EVENT_FIELDS: tuple[str, ...] = EventRecord.__struct_fields__

_event_decoder = msgspec.json.Decoder(EventIn)
_record_encoder = msgspec.json.Encoder()
record_decoder = msgspec.json.Decoder(EventRecord)


class RejectedEvent(msgspec.Struct):
    index: int
    error: str


def to_epoch_ms(value: int | datetime) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp() * 1000)
    return int(value)


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def partition_for(
    distinct_id: str,
    event_id: str,
    partitions: int,
    hot_keys: frozenset[str] = frozenset(),
    salt_buckets: int = 1,
) -> int:
    """The deterministic partition of an event (see the module docstring)."""
    key = distinct_id
    if key in hot_keys and salt_buckets > 1:
        key = f"{key}#{zlib.crc32(event_id.encode()) % salt_buckets}"
    return zlib.crc32(key.encode()) % partitions


class Normalizer:
    """Turns raw client events into ``(partition, record_bytes)`` pairs."""

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
                event = _event_decoder.decode(raw)
            except msgspec.ValidationError as exc:
                rejected.append(RejectedEvent(index, _validation_message(exc)))
                continue
            except msgspec.DecodeError as exc:
                rejected.append(RejectedEvent(index, f"event: invalid JSON: {exc}"))
                continue
            user_id = "" if event.user_id is None else str(event.user_id)
            anonymous_id = event.anonymous_id or ""
            distinct_id = user_id or anonymous_id
            if not distinct_id:
                rejected.append(RejectedEvent(index, "user_id: one of user_id or anonymous_id is required"))
                continue
            properties = bytes(event.properties).strip()
            if not properties or properties == b"null":
                properties_text = "{}"
            elif properties[:1] != b"{":
                rejected.append(RejectedEvent(index, "properties: expected an object"))
                continue
            else:
                properties_text = properties.decode()
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
            accepted.append((partition, _record_encoder.encode(record), record))
        return accepted, rejected


def _validation_message(exc: msgspec.ValidationError) -> str:
    """msgspec says "Expected `str`, got `int` - at `$.event_type`"; we say
    "event_type: expected `str`, got `int`"."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        message, where = text, "$"
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    if message.startswith("Object missing required field"):
        field = message.split("`")[1]
        return f"{path + '.' if path else ''}{field}: required field missing"
    return f"{path or 'event'}: {message[:1].lower()}{message[1:]}"
