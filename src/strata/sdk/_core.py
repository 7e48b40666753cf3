"""Pieces shared by ``Client`` and ``AsyncClient``: the bounded queue with
its overflow policy, the counters, batch encoding and the retry schedule.

Standard library only (plus httpx in the clients), so ``strata.sdk`` imports
without the server's dependencies.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

OverflowPolicy = Literal["drop_newest", "drop_oldest", "block"]
OVERFLOW_POLICIES: tuple[OverflowPolicy, ...] = ("drop_newest", "drop_oldest", "block")

# Typed common dimensions the server stores as columns (strata.events).
DIMENSIONS = frozenset(
    {"session_id", "country", "platform", "os", "app_version", "path", "referrer",
     "revenue", "currency", "schema_version"}
)


class QueueFull(Exception):
    """``track`` under the ``block`` policy waited ``block_timeout`` seconds
    and the queue is still full; the event was not queued."""


@dataclass
class ClientStats:
    """Counters of one client; each event ends in exactly one of
    ``accepted``, ``quarantined``, ``rejected``, ``dropped`` or ``failed``
    (or is still ``queued``/in flight).

    * ``queued``: events waiting in the queue now.
    * ``accepted`` / ``quarantined``: durable on the server (2xx).
    * ``rejected``: refused by the server, per event, with a reason
      (``last_error``); 4xx other than 429 count the whole batch here.
    * ``dropped``: removed by the overflow policy (never sent).
    * ``failed``: given up after ``max_retry_time`` of retries.
    * ``retries``: re-sends of a batch; ``batches``: batches acknowledged.
    """

    queued: int = 0
    accepted: int = 0
    quarantined: int = 0
    rejected: int = 0
    dropped: int = 0
    failed: int = 0
    retries: int = 0
    batches: int = 0
    last_error: str = ""
    errors: list[str] = field(default_factory=list)


class EventQueue:
    """A bounded FIFO of encoded events with an explicit overflow policy.

    When ``max_size`` events are waiting, ``put`` of one more:

    * ``drop_newest``: drops the new event (``stats.dropped += 1``);
    * ``drop_oldest``: drops the oldest waiting event (``stats.dropped += 1``)
      and queues the new one;
    * ``block``: waits until the sender takes events, at most
      ``block_timeout`` seconds (``None``: forever), then raises ``QueueFull``.

    Events the sender already took (in flight, retrying) do not count
    towards ``max_size``.
    """

    def __init__(self, max_size: int, policy: OverflowPolicy, stats: ClientStats,
                 block_timeout: float | None = None) -> None:
        if policy not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow: expected one of {list(OVERFLOW_POLICIES)}, got {policy!r}")
        if max_size < 1:
            raise ValueError("max_queue_size: must be at least 1")
        self.max_size = max_size
        self.policy = policy
        self.stats = stats
        self.block_timeout = block_timeout
        self.items: deque[tuple[float, dict[str, Any]]] = deque()
        self.cond = threading.Condition()
        self.flush_requested = 0

    def put(self, event: dict[str, Any]) -> bool:
        """Queue ``event``; False if the overflow policy dropped it."""
        with self.cond:
            if len(self.items) >= self.max_size:
                if self.policy == "drop_newest":
                    self.stats.dropped += 1
                    return False
                if self.policy == "drop_oldest":
                    self.items.popleft()
                    self.stats.dropped += 1
                else:
                    ok = self.cond.wait_for(
                        lambda: len(self.items) < self.max_size, self.block_timeout
                    )
                    if not ok:
                        raise QueueFull(f"queue full ({self.max_size} events)")
            self.items.append((time.monotonic(), event))
            self.stats.queued = len(self.items)
            self.cond.notify_all()
            return True

    def take(self, count: int) -> list[dict[str, Any]]:
        with self.cond:
            batch = [self.items.popleft()[1] for _ in range(min(count, len(self.items)))]
            self.stats.queued = len(self.items)
            self.cond.notify_all()
            return batch

    def oldest_age(self) -> float | None:
        return time.monotonic() - self.items[0][0] if self.items else None


def make_event(
    event_type: str,
    *,
    user_id: str | int | None,
    anonymous_id: str | None,
    properties: dict[str, Any] | None,
    timestamp: datetime | int | float | None,
    event_id: str | None,
    dimensions: dict[str, Any],
) -> dict[str, Any]:
    """The wire form of one event; raises ``ValueError`` naming the field."""
    if not isinstance(event_type, str) or not event_type:
        raise ValueError("event_type: a non-empty string is required")
    if user_id is None and not anonymous_id:
        raise ValueError("user_id: one of user_id or anonymous_id is required")
    unknown = set(dimensions) - DIMENSIONS
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown field (put it in properties)")
    if properties is not None and not isinstance(properties, dict):
        raise ValueError("properties: expected a dict")
    if timestamp is None:
        ts = int(time.time() * 1000)
    elif isinstance(timestamp, datetime):
        value = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
        ts = int(value.timestamp() * 1000)
    else:
        ts = int(timestamp)
    event: dict[str, Any] = {
        "event_id": event_id or os.urandom(16).hex(),
        "event_type": event_type,
        "timestamp": ts,
        "properties": properties or {},
    }
    if user_id is not None:
        event["user_id"] = user_id
    if anonymous_id:
        event["anonymous_id"] = anonymous_id
    event.update({k: v for k, v in dimensions.items() if v is not None})
    return event


def encode_batch(events: list[dict[str, Any]], compress: bool) -> tuple[bytes, dict[str, str]]:
    """The request body (``sent_at`` stamped now) and its headers. Called for
    every attempt, so ``sent_at`` is the time of that attempt: the server
    corrects clock skew with ``timestamp + (received_at - sent_at)``."""
    body = json.dumps(
        {"batch": events, "sent_at": int(time.time() * 1000)}, separators=(",", ":"),
        default=str,
    ).encode()
    headers = {"Content-Type": "application/json"}
    if compress:
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return body, headers


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta or HTTP date), capped at 300."""
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), 300.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(when.timestamp() - time.time(), 0.0), 300.0)


def backoff_seconds(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, never below ``Retry-After``."""
    delay = random.uniform(0, min(cap, base * 2**attempt))
    return max(delay, retry_after) if retry_after is not None else delay


def is_retryable(status: int) -> bool:
    return status == 429 or status == 408 or status >= 500


def summarize(payload: Any) -> tuple[int, int, list[str]]:
    """(accepted, quarantined, [rejection reasons]) from a 2xx answer."""
    if not isinstance(payload, dict):
        return 0, 0, []
    rejected = payload.get("rejected") or []
    reasons = [f"event {r.get('index')}: {r.get('error')}" for r in rejected if isinstance(r, dict)]
    return int(payload.get("accepted", 0)), int(payload.get("quarantined", 0)), reasons
