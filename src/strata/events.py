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
from typing import Annotated, Any

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


class NormalizedEvent(msgspec.Struct, kw_only=True, gc=False):
    """An accepted event as ``Normalizer`` hands it on: the attributes of
    ``EventRecord``, and ``_record_encoder.encode`` of it is byte for byte
    the ``EventRecord`` JSON (``timestamp`` is ``UNSET`` by then, so it is
    left out).

    It is also the decode target of a client event, so that accepting an
    event costs one decode, a few attribute stores and one encode, with no
    second object. That is why the fields are ``EventIn``'s, with
    ``EventIn``'s types (a test checks it: the validation messages are the
    same), laid out in ``EventRecord``'s order. ``distinct_id``, ``ts`` and
    ``received_at`` are not client fields: a client value for them is
    decoded as ``Raw`` (any JSON, as an unknown field would be skipped) and
    always overwritten. Not GC-tracked: it holds only strings and numbers."""

    event_id: ID | None = ""
    event_type: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    user_id: ID | int | None = ""
    anonymous_id: ID | None = ""
    distinct_id: msgspec.Raw = msgspec.Raw(b"")
    session_id: Dim | None = ""
    ts: msgspec.Raw = msgspec.Raw(b"")
    received_at: msgspec.Raw = msgspec.Raw(b"")
    country: Dim | None = ""
    platform: Dim | None = ""
    os: Dim | None = ""
    app_version: Dim | None = ""
    path: Annotated[str, msgspec.Meta(max_length=2048)] | None = ""
    referrer: Annotated[str, msgspec.Meta(max_length=2048)] | None = ""
    revenue: float | None = 0.0
    currency: Dim | None = ""
    properties: msgspec.Raw = msgspec.Raw(b"")
    timestamp: int | datetime | None = None


_event_decoder = msgspec.json.Decoder(NormalizedEvent)
# The string fields a client may send as null (normalized to "").
_NULLABLE_TEXT = ("anonymous_id", "session_id") + DIMENSIONS
_UNSET = msgspec.UNSET


class NormalizedBatch:
    """The outcome of normalizing one request's events, column-wise.

    ``partitions[i]``, ``values[i]`` and ``events[i]`` describe the i-th
    accepted event (input order): its log partition, its log record value
    (no key) and the ``NormalizedEvent`` that was encoded. ``rejected``
    holds one entry per rejected event, by input index, in input order."""

    __slots__ = ("partitions", "values", "events", "rejected")

    def __init__(self) -> None:
        self.partitions: list[int] = []
        self.values: list[bytes] = []
        self.events: list[NormalizedEvent] = []
        self.rejected: list[RejectedEvent] = []


class Normalizer:
    """Turns raw client events into log records (``NormalizedBatch``) and
    rejections with a reason, one per bad event."""

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
        # distinct_id -> partition for keys that are not salted: most events
        # of a batch belong to users seen before, and a dict hit is cheaper
        # than encoding and hashing the key again.
        self._partition_of: dict[str, int] = {}

    def normalize(
        self,
        raw_events: Sequence[bytes | msgspec.Raw],
        *,
        sent_at_ms: int | None,
        received_at_ms: int,
    ) -> tuple[list[tuple[int, bytes, NormalizedEvent]], list[RejectedEvent]]:
        """``normalize_batch`` as ``(partition, record_bytes, event)``
        triples and the rejections."""
        batch = self.normalize_batch(
            raw_events, sent_at_ms=sent_at_ms, received_at_ms=received_at_ms
        )
        accepted = list(zip(batch.partitions, batch.values, batch.events, strict=True))
        return accepted, batch.rejected

    def normalize_batch(
        self,
        raw_events: Sequence[bytes | msgspec.Raw],
        *,
        sent_at_ms: int | None,
        received_at_ms: int,
    ) -> NormalizedBatch:
        """Validate and normalize each event on its own (module docstring).
        Event ids the client left out are random; everything else is a
        function of the input, ``sent_at_ms`` and ``received_at_ms``."""
        batch = NormalizedBatch()
        # Bound methods: the loop runs once per event, so lookups add up.
        add_partition = batch.partitions.append
        add_value = batch.values.append
        add_event = batch.events.append
        rejected = batch.rejected
        skew = 0 if sent_at_ms is None else received_at_ms - sent_at_ms
        oldest = received_at_ms - self.max_event_age_ms
        newest = received_at_ms + self.max_future_skew_ms
        max_event_bytes = self.max_event_bytes
        fresh_ids = os.urandom(16 * len(raw_events)).hex()
        partition_of = self._partition_of
        if len(partition_of) > 100_000:
            partition_of.clear()
        decode = _event_decoder.decode
        encode = _record_encoder.encode
        for index, raw in enumerate(raw_events):
            if len(raw) > max_event_bytes:
                rejected.append(RejectedEvent(index, f"event: larger than {max_event_bytes} bytes"))
                continue
            try:
                event = decode(raw)
            except msgspec.ValidationError as exc:
                rejected.append(RejectedEvent(index, _validation_message(exc)))
                continue
            except msgspec.DecodeError as exc:
                bad = utf8_error(raw)
                rejected.append(
                    RejectedEvent(
                        index,
                        invalid_utf8_message(bad) if bad else f"event: invalid JSON: {exc}",
                    )
                )
                continue
            except UnicodeDecodeError as exc:
                rejected.append(RejectedEvent(index, invalid_utf8_message(exc)))
                continue
            if (  # an explicit null (rare) is stored as ""
                event.anonymous_id is None
                or event.session_id is None
                or event.country is None
                or event.platform is None
                or event.os is None
                or event.app_version is None
                or event.path is None
                or event.referrer is None
                or event.currency is None
            ):
                for name in _NULLABLE_TEXT:
                    if getattr(event, name) is None:
                        setattr(event, name, "")
            user_id = event.user_id
            if user_id.__class__ is not str:
                event.user_id = user_id = "" if user_id is None else str(user_id)
            distinct_id = user_id or event.anonymous_id
            if not distinct_id:
                rejected.append(
                    RejectedEvent(index, "user_id: one of user_id or anonymous_id is required")
                )
                continue
            if not event.properties:
                event.properties = "{}"  # type: ignore[assignment]
            else:
                properties = bytes(event.properties).strip()
                if properties[:1] == b"{":
                    try:
                        event.properties = properties.decode()  # type: ignore[assignment]
                    except UnicodeDecodeError as exc:
                        rejected.append(RejectedEvent(index, invalid_utf8_message(exc)))
                        continue
                elif properties == b"null":
                    event.properties = "{}"  # type: ignore[assignment]
                else:
                    rejected.append(RejectedEvent(index, "properties: expected an object"))
                    continue
            timestamp = event.timestamp
            if timestamp is None:
                ts = received_at_ms
            else:
                ts = to_epoch_ms(timestamp) + skew
                if ts > newest:
                    ts = received_at_ms
                elif ts < oldest:
                    rejected.append(
                        RejectedEvent(index, "timestamp: older than ingest.max_event_age")
                    )
                    continue
            revenue = event.revenue
            if not revenue:  # None, and -0.0 (stored as 0.0)
                event.revenue = 0.0
            elif revenue != revenue:  # NaN
                rejected.append(RejectedEvent(index, "revenue: must be a finite number"))
                continue
            event_id = event.event_id
            if not event_id:
                event.event_id = event_id = fresh_ids[32 * index : 32 * index + 32]
            # The record's values replace the Raw placeholders.
            event.distinct_id = distinct_id  # type: ignore[assignment]
            event.ts = ts  # type: ignore[assignment]
            event.received_at = received_at_ms  # type: ignore[assignment]
            event.timestamp = _UNSET  # type: ignore[assignment]
            partition = partition_of.get(distinct_id)
            if partition is None:
                partition = partition_for(
                    distinct_id, event_id, self.partitions, self.hot_keys, self.salt_buckets
                )
                if distinct_id not in self.hot_keys:
                    partition_of[distinct_id] = partition
            add_partition(partition)
            add_value(encode(event))
            add_event(event)
        return batch


def utf8_error(data: Any) -> UnicodeDecodeError | None:
    """The UTF-8 error of ``data`` (bytes, memoryview or msgspec.Raw), or None.

    msgspec before 0.23 raised UnicodeDecodeError for invalid UTF-8 in a
    string; 0.23 raises a DecodeError ("Invalid UTF-8 encoded string")
    without the reason. Decoding the input again names it the same way on
    every version."""
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc
    return None


def invalid_utf8_message(exc: UnicodeDecodeError) -> str:
    """The rejection reason for an event with invalid UTF-8 in a string.

    msgspec checks UTF-8 only in the strings it decodes, and raises
    UnicodeDecodeError (not a DecodeError) with offsets relative to that
    string: name the problem, not the position."""
    return f"event: invalid JSON: not valid UTF-8 ({exc.reason})"


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
