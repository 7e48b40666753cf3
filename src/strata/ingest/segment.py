"""The Segment HTTP Tracking API, mapped onto strata's event model.

Segment, RudderStack and Jitsu SDKs send messages like::

    {"type": "track", "event": "Order Completed", "userId": "u1",
     "anonymousId": "a1", "messageId": "m1", "timestamp": "2024-...Z",
     "properties": {"revenue": 9.5, "currency": "EUR"},
     "context": {"location": {"country": "DE"}, "os": {"name": "iOS"}, ...}}

``map_message`` turns one into a native strata event (for the normalizer)
or, for ``identify``, into an identity record (log topic ``identities``).
The mapping table is in docs/ingest.md; in short:

=====================================  ===========================================
Segment                                strata
=====================================  ===========================================
``messageId``                          ``event_id`` (kept: retries deduplicate)
``event`` (track)                      ``event_type``
``type: page`` / ``type: screen``      ``event_type`` ``page_view`` / ``screen_view``
``userId`` / ``anonymousId``           ``user_id`` / ``anonymous_id``
``timestamp`` + ``sentAt``             ``ts = timestamp + (received_at - sentAt)``
``context.location.country``           ``country`` (else the region of ``context.locale``)
``context.device.type``                ``platform`` (else ``web`` if ``context.userAgent``)
``context.os.name``                    ``os``
``context.app.version``                ``app_version``
``context.page.path`` / ``.referrer``  ``path`` / ``referrer`` (page: also ``properties``)
``context.sessionId``                  ``session_id``
``properties.revenue`` / ``.currency`` ``revenue`` / ``currency`` (also left in properties)
``properties``                         ``properties`` (page/screen: plus ``name``, ``category``)
``traits`` (identify)                  table ``identities``, ``traits`` as JSON
=====================================  ===========================================
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import msgspec

SUPPORTED = ("track", "page", "screen", "identify")
EVENT_TYPE_FOR = {"page": "page_view", "screen": "screen_view"}

_encoder = msgspec.json.Encoder()


class MappingError(ValueError):
    """The message cannot be mapped; the message names the field."""


def is_segment_message(message: dict[str, Any]) -> bool:
    """Segment messages carry ``type`` (or ``event``) and no ``event_type``."""
    return "event_type" not in message and ("type" in message or "event" in message)


def parse_time_ms(value: Any, field: str) -> int | None:
    """ISO-8601 (Segment's format) or epoch milliseconds -> epoch ms."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise MappingError(f"{field}: expected an ISO-8601 timestamp")
    if isinstance(value, int | float):
        return int(value)
    if not isinstance(value, str):
        raise MappingError(f"{field}: expected an ISO-8601 timestamp")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise MappingError(f"{field}: expected an ISO-8601 timestamp, got {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def map_message(
    message: Any,
    *,
    kind: str | None = None,
    batch_sent_at_ms: int | None = None,
    batch_context: dict[str, Any] | None = None,
    received_at_ms: int,
) -> tuple[str, bytes]:
    """Map one Segment message. ``kind`` is the endpoint's type (``/v1/page``
    implies ``page``) and wins over the message's ``type``. Returns
    ``("event", native_event_json)`` or ``("identify", identity_json)``.
    Raises ``MappingError``. Clock skew is corrected here, per message
    (``sentAt`` of the message, else of the batch), so the normalizer gets
    the corrected ``timestamp`` and no ``sent_at``."""
    if not isinstance(message, dict):
        raise MappingError("message: expected a JSON object")
    kind = kind or message.get("type") or ("track" if "event" in message else None)
    if kind not in SUPPORTED:
        raise MappingError(f"type: {kind!r} is not supported (one of {list(SUPPORTED)})")
    context = {**(batch_context or {}), **_dict(message.get("context"))}
    user_id = _id(message.get("userId"))
    anonymous_id = _id(message.get("anonymousId"))
    if user_id is None and anonymous_id is None:
        raise MappingError("userId: one of userId or anonymousId is required")
    event_id = _id(message.get("messageId"))
    timestamp = parse_time_ms(message.get("timestamp"), "timestamp")
    sent_at = parse_time_ms(message.get("sentAt"), "sentAt")
    sent_at = batch_sent_at_ms if sent_at is None else sent_at
    if timestamp is not None and sent_at is not None:
        timestamp += received_at_ms - sent_at
    if kind == "identify":
        traits = message.get("traits")
        if traits is None:
            traits = _dict(context.get("traits"))
        if not isinstance(traits, dict):
            raise MappingError("traits: expected an object")
        record = {
            "event_id": event_id or os.urandom(16).hex(),
            "user_id": user_id or "",
            "anonymous_id": anonymous_id or "",
            "distinct_id": user_id or anonymous_id,
            "traits": _encoder.encode(traits).decode(),
            "ts": received_at_ms if timestamp is None else timestamp,
            "received_at": received_at_ms,
        }
        return "identify", _encoder.encode(record)

    properties = message.get("properties")
    if properties is None:
        properties = {}
    if not isinstance(properties, dict):
        raise MappingError("properties: expected an object")
    page = _dict(context.get("page"))
    if kind == "track":
        event_type = message.get("event")
        if not isinstance(event_type, str) or not event_type:
            raise MappingError("event: required for track, a non-empty string")
    else:
        event_type = EVENT_TYPE_FOR[kind]
        properties = dict(properties)
        for field in ("name", "category"):
            if message.get(field) is not None and field not in properties:
                properties[field] = message[field]
    location = _dict(context.get("location"))
    country = _text(location.get("country"))
    locale = context.get("locale")
    if not country and isinstance(locale, str) and "-" in locale:
        country = locale.rsplit("-", 1)[1].upper()
    device = _dict(context.get("device"))
    platform = _text(device.get("type")) or ("web" if context.get("userAgent") or page else None)
    revenue = properties.get("revenue")
    if isinstance(revenue, bool) or not isinstance(revenue, int | float):
        revenue = None
    currency = properties.get("currency")
    event: dict[str, Any] = {
        "event_type": event_type,
        "event_id": event_id,
        "user_id": user_id,
        "anonymous_id": anonymous_id,
        "timestamp": timestamp,
        "session_id": _text(context.get("sessionId")),
        "country": country,
        "platform": platform,
        "os": _text(_dict(context.get("os")).get("name")),
        "app_version": _text(_dict(context.get("app")).get("version")),
        "path": _text(properties.get("path") if kind == "page" else None) or _text(page.get("path")),
        "referrer": _text(properties.get("referrer") if kind == "page" else None)
        or _text(page.get("referrer")),
        "revenue": revenue,
        "currency": currency if isinstance(currency, str) else None,
        "properties": properties,
    }
    return "event", _encoder.encode({k: v for k, v in event.items() if v is not None})
