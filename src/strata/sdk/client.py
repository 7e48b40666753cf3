"""The Python SDK: ``Client`` (a background thread) and ``AsyncClient``
(an asyncio task), both batching on the client side.

    from strata.sdk import Client

    with Client("http://localhost:8000", "sk_...") as client:
        client.track("signup", user_id="u1", properties={"plan": "pro"})

Contract (docs/ingest.md has the details):

* ``track`` returns at once with the event's ``event_id`` (generated on the
  client); the event is queued. A batch is sent when ``flush_at`` events are
  waiting or the oldest has waited ``flush_interval`` seconds.
* The queue is bounded (``max_queue_size``); the ``overflow`` policy says
  what happens when it is full (``EventQueue``), and ``stats`` counts it.
* Bodies are gzip-compressed and stamped with ``sent_at`` at every attempt.
* Network errors, 408, 429 and 5xx are retried with exponential backoff and
  full jitter (never sooner than ``Retry-After``) for up to
  ``max_retry_time`` seconds, always with the same events and event_ids,
  so the server stores each event exactly once. Other 4xx are not retried.
* ``flush()`` blocks until everything queued before it was answered;
  ``close()`` flushes and stops; so does interpreter exit (``atexit``) and
  leaving the ``with`` block.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import threading
import time
from collections import deque
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from strata.sdk._core import (
    ClientStats,
    EventQueue,
    OverflowPolicy,
    QueueFull,
    backoff_seconds,
    encode_batch,
    is_retryable,
    make_event,
    retry_after_seconds,
    summarize,
)

log = logging.getLogger("strata.sdk")


def _query_mixin() -> type:
    """``strata.sdk.query.QueryMixin`` (``Client.sql`` ...) if installed."""
    try:
        module = importlib.import_module("strata.sdk.query")
    except ImportError:
        return object
    mixin = getattr(module, "QueryMixin", object)
    return mixin if isinstance(mixin, type) else object


class _Settings:
    def __init__(
        self,
        url: str,
        write_key: str,
        *,
        flush_at: int,
        flush_interval: float,
        max_queue_size: int,
        overflow: OverflowPolicy,
        gzip: bool,
        timeout: float,
        max_retry_time: float,
        backoff_base: float,
        backoff_max: float,
    ) -> None:
        if flush_at < 1:
            raise ValueError("flush_at: must be at least 1")
        if flush_interval <= 0:
            raise ValueError("flush_interval: must be positive")
        self.url = url.rstrip("/")
        self.write_key = write_key
        self.flush_at = min(flush_at, 1000)  # the server's default batch limit
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self.overflow = overflow
        self.gzip = gzip
        self.timeout = timeout
        self.max_retry_time = max_retry_time
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max


class Client(_query_mixin()):  # type: ignore[misc]
    """Thread-safe event client with a background sender thread.

    Args:
        url: base URL of strata (``http://host:8000``).
        write_key: a write key (sent as ``Authorization: Bearer``).
        flush_at: send when this many events wait (default 100, max 1000).
        flush_interval: ... or when the oldest waited this long (seconds).
        max_queue_size: bound of the queue (events not yet taken by the sender).
        overflow: ``drop_newest`` (default), ``drop_oldest`` or ``block``.
        block_timeout: longest wait of ``track`` under ``block`` (None: forever).
        gzip: compress request bodies.
        timeout: HTTP timeout per attempt (seconds).
        max_retry_time: give a batch up (``stats.failed``) after retrying
            this long (seconds).
        shutdown_timeout: how long ``close()`` and exit wait for the queue.
        token: optional query token, for the query methods of the mixin.
    """

    def __init__(
        self,
        url: str,
        write_key: str,
        *,
        flush_at: int = 100,
        flush_interval: float = 0.1,
        max_queue_size: int = 10_000,
        overflow: OverflowPolicy = "drop_newest",
        block_timeout: float | None = None,
        gzip: bool = True,
        timeout: float = 10.0,
        max_retry_time: float = 300.0,
        backoff_base: float = 0.1,
        backoff_max: float = 10.0,
        shutdown_timeout: float = 30.0,
        token: str | None = None,
    ) -> None:
        self.settings = _Settings(
            url, write_key, flush_at=flush_at, flush_interval=flush_interval,
            max_queue_size=max_queue_size, overflow=overflow, gzip=gzip, timeout=timeout,
            max_retry_time=max_retry_time, backoff_base=backoff_base, backoff_max=backoff_max,
        )
        self.url = self.settings.url
        self.write_key = write_key
        self.token = token
        self.shutdown_timeout = shutdown_timeout
        self.stats = ClientStats()
        self._queue = EventQueue(max_queue_size, overflow, self.stats, block_timeout)
        self._http = httpx.Client(
            timeout=timeout, headers={"Authorization": f"Bearer {write_key}"}
        )
        self._put = 0  # events queued so far (sequence for flush)
        self._done = 0  # events answered, dropped from the queue or given up
        self._flushes = 0
        self._closed = False
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strata-sdk-sender", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # -- public API ----------------------------------------------------------
    def track(
        self,
        event_type: str,
        *,
        user_id: str | int | None = None,
        anonymous_id: str | None = None,
        properties: dict[str, Any] | None = None,
        timestamp: datetime | int | float | None = None,
        event_id: str | None = None,
        **dimensions: Any,
    ) -> str:
        """Queue one event and return its ``event_id``.

        ``timestamp`` is the event time (datetime, or epoch milliseconds;
        default: now). ``dimensions`` are the typed fields ``country``,
        ``platform``, ``os``, ``app_version``, ``path``, ``referrer``,
        ``session_id``, ``revenue``, ``currency`` and ``schema_version``
        (pin a schema version). Raises ``ValueError`` for a malformed event,
        ``QueueFull`` under ``overflow="block"`` after ``block_timeout``,
        ``RuntimeError`` after ``close()``. A dropped event (overflow) is
        counted in ``stats.dropped``; its id is still returned."""
        if self._closed:
            raise RuntimeError("client is closed")
        event = make_event(
            event_type, user_id=user_id, anonymous_id=anonymous_id, properties=properties,
            timestamp=timestamp, event_id=event_id, dimensions=dimensions,
        )
        with self._queue.cond:
            before = self.stats.dropped
            queued = self._queue.put(event)
            if queued:
                self._put += 1
                # drop_oldest removed a queued event: it is done, never sent.
                self._done += self.stats.dropped - before
        return str(event["event_id"])

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued so far and wait for the answers. Returns
        False if ``timeout`` (seconds) passed first."""
        with self._queue.cond:
            target = self._put
            self._queue.flush_requested += 1
            self._queue.cond.notify_all()
            ok = self._queue.cond.wait_for(lambda: self._done >= target, timeout)
            self._queue.flush_requested -= 1
            return ok

    def close(self, timeout: float | None = None) -> None:
        """Flush (up to ``timeout``, default ``shutdown_timeout``), stop the
        sender and release the connection pool. Idempotent. Events still
        unsent after the timeout are counted in ``stats.failed``."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.flush(self.shutdown_timeout if timeout is None else timeout)
        self._abort.set()
        with self._queue.cond:
            self._queue.cond.notify_all()
        self._thread.join(5.0)
        with self._queue.cond:
            left = self._queue.take(len(self._queue.items))
            self.stats.failed += len(left)
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- sender thread ---------------------------------------------------------
    def _ready(self) -> bool:
        queue = self._queue
        if not queue.items:
            return False
        if len(queue.items) >= self.settings.flush_at or queue.flush_requested or self._closed:
            return True
        age = queue.oldest_age()
        return age is not None and age >= self.settings.flush_interval

    def _run(self) -> None:
        queue = self._queue
        while True:
            with queue.cond:
                while not self._ready():
                    if self._abort.is_set():
                        return
                    age = queue.oldest_age()
                    queue.cond.wait(
                        None if age is None else max(0.001, self.settings.flush_interval - age)
                    )
                batch = queue.take(self.settings.flush_at)
            try:
                self._send(batch)
            except Exception as exc:  # never let the sender die silently
                log.exception("strata sdk: sending a batch failed")
                self.stats.failed += len(batch)
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            with queue.cond:
                self._done += len(batch)
                queue.cond.notify_all()

    def _send(self, batch: list[dict[str, Any]]) -> None:
        settings = self.settings
        started = time.monotonic()
        attempt = 0
        while True:
            body, headers = encode_batch(batch, settings.gzip)
            retry_after = None
            try:
                response = self._http.post(f"{settings.url}/v1/batch", content=body, headers=headers)
                status = response.status_code
            except httpx.HTTPError as exc:
                status, error = 0, f"network: {exc}"
            else:
                if 200 <= status < 300:
                    accepted, quarantined, reasons = summarize(response.json())
                    self.stats.accepted += accepted
                    self.stats.quarantined += quarantined
                    self._record_rejections(reasons)
                    self.stats.batches += 1
                    return
                error = f"HTTP {status}: {response.text[:200]}"
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
            self.stats.last_error = error
            if status and not is_retryable(status):
                self._record_rejections([f"batch of {len(batch)}: {error}"], count=len(batch))
                return
            delay = backoff_seconds(attempt, settings.backoff_base, settings.backoff_max, retry_after)
            if time.monotonic() + delay - started > settings.max_retry_time or self._abort.is_set():
                self.stats.failed += len(batch)
                log.warning("strata sdk: gave up on %d events: %s", len(batch), error)
                return
            attempt += 1
            self.stats.retries += 1
            if self._abort.wait(delay):
                self.stats.failed += len(batch)
                return

    def _record_rejections(self, reasons: list[str], count: int | None = None) -> None:
        if not reasons:
            return
        self.stats.rejected += len(reasons) if count is None else count
        self.stats.last_error = reasons[-1]
        self.stats.errors = (self.stats.errors + reasons)[-100:]


class AsyncClient(_query_mixin()):  # type: ignore[misc]
    """The asyncio variant of ``Client``: same arguments and semantics, with
    ``await client.track(...)``, ``await client.flush()`` and
    ``await client.aclose()`` (or ``async with``). The sender is a task on
    the running loop, started by the first ``track``. Close it before the
    loop ends: an asyncio loop cannot flush from ``atexit``."""

    def __init__(
        self,
        url: str,
        write_key: str,
        *,
        flush_at: int = 100,
        flush_interval: float = 0.1,
        max_queue_size: int = 10_000,
        overflow: OverflowPolicy = "drop_newest",
        block_timeout: float | None = None,
        gzip: bool = True,
        timeout: float = 10.0,
        max_retry_time: float = 300.0,
        backoff_base: float = 0.1,
        backoff_max: float = 10.0,
        shutdown_timeout: float = 30.0,
        token: str | None = None,
    ) -> None:
        self.settings = _Settings(
            url, write_key, flush_at=flush_at, flush_interval=flush_interval,
            max_queue_size=max_queue_size, overflow=overflow, gzip=gzip, timeout=timeout,
            max_retry_time=max_retry_time, backoff_base=backoff_base, backoff_max=backoff_max,
        )
        if overflow not in ("drop_newest", "drop_oldest", "block"):
            raise ValueError(f"overflow: unknown policy {overflow!r}")
        self.url = self.settings.url
        self.write_key = write_key
        self.token = token
        self.block_timeout = block_timeout
        self.shutdown_timeout = shutdown_timeout
        self.stats = ClientStats()
        self._items: deque[tuple[float, dict[str, Any]]] = deque()
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._put = 0
        self._done = 0
        self._flush_requested = 0
        self._closed = False

    def _start(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
            self._http = httpx.AsyncClient(
                timeout=self.settings.timeout,
                headers={"Authorization": f"Bearer {self.write_key}"},
            )
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._changed

    async def track(
        self,
        event_type: str,
        *,
        user_id: str | int | None = None,
        anonymous_id: str | None = None,
        properties: dict[str, Any] | None = None,
        timestamp: datetime | int | float | None = None,
        event_id: str | None = None,
        **dimensions: Any,
    ) -> str:
        """Queue one event; see ``Client.track``. Awaits only under
        ``overflow="block"`` while the queue is full."""
        if self._closed:
            raise RuntimeError("client is closed")
        event = make_event(
            event_type, user_id=user_id, anonymous_id=anonymous_id, properties=properties,
            timestamp=timestamp, event_id=event_id, dimensions=dimensions,
        )
        changed = self._start()
        async with changed:
            if len(self._items) >= self.settings.max_queue_size:
                if self.settings.overflow == "drop_newest":
                    self.stats.dropped += 1
                    return str(event["event_id"])
                if self.settings.overflow == "drop_oldest":
                    self._items.popleft()
                    self.stats.dropped += 1
                    self._done += 1
                else:
                    try:
                        await asyncio.wait_for(
                            changed.wait_for(
                                lambda: len(self._items) < self.settings.max_queue_size
                            ),
                            self.block_timeout,
                        )
                    except TimeoutError as exc:
                        raise QueueFull(
                            f"queue full ({self.settings.max_queue_size} events)"
                        ) from exc
            self._items.append((time.monotonic(), event))
            self._put += 1
            self.stats.queued = len(self._items)
            changed.notify_all()
        return str(event["event_id"])

    async def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued so far and await the answers."""
        changed = self._start()
        async with changed:
            target = self._put
            self._flush_requested += 1
            changed.notify_all()
            try:
                await asyncio.wait_for(changed.wait_for(lambda: self._done >= target), timeout)
                return True
            except TimeoutError:
                return False
            finally:
                self._flush_requested -= 1

    async def aclose(self, timeout: float | None = None) -> None:
        """Flush, stop the sender task and close the connection pool."""
        if self._closed:
            return
        if self._changed is not None:
            await self.flush(self.shutdown_timeout if timeout is None else timeout)
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.stats.failed += len(self._items)
        self._items.clear()
        if self._http is not None:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _ready(self) -> bool:
        if not self._items:
            return False
        if len(self._items) >= self.settings.flush_at or self._flush_requested:
            return True
        return time.monotonic() - self._items[0][0] >= self.settings.flush_interval

    async def _run(self) -> None:
        assert self._changed is not None
        changed = self._changed
        while True:
            async with changed:
                while not self._ready():
                    wait = None
                    if self._items:
                        age = time.monotonic() - self._items[0][0]
                        wait = max(0.001, self.settings.flush_interval - age)
                    try:
                        await asyncio.wait_for(changed.wait(), wait)
                    except TimeoutError:
                        pass
                count = min(self.settings.flush_at, len(self._items))
                batch = [self._items.popleft()[1] for _ in range(count)]
                self.stats.queued = len(self._items)
                changed.notify_all()
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                self.stats.failed += len(batch)
                raise
            except Exception as exc:
                log.exception("strata sdk: sending a batch failed")
                self.stats.failed += len(batch)
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            async with changed:
                self._done += len(batch)
                changed.notify_all()

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        assert self._http is not None
        settings = self.settings
        started = time.monotonic()
        attempt = 0
        while True:
            body, headers = encode_batch(batch, settings.gzip)
            retry_after = None
            try:
                response = await self._http.post(
                    f"{settings.url}/v1/batch", content=body, headers=headers
                )
                status = response.status_code
            except httpx.HTTPError as exc:
                status, error = 0, f"network: {exc}"
            else:
                if 200 <= status < 300:
                    accepted, quarantined, reasons = summarize(response.json())
                    self.stats.accepted += accepted
                    self.stats.quarantined += quarantined
                    if reasons:
                        self.stats.rejected += len(reasons)
                        self.stats.last_error = reasons[-1]
                        self.stats.errors = (self.stats.errors + reasons)[-100:]
                    self.stats.batches += 1
                    return
                error = f"HTTP {status}: {response.text[:200]}"
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
            self.stats.last_error = error
            if status and not is_retryable(status):
                self.stats.rejected += len(batch)
                return
            delay = backoff_seconds(attempt, settings.backoff_base, settings.backoff_max, retry_after)
            if time.monotonic() + delay - started > settings.max_retry_time:
                self.stats.failed += len(batch)
                return
            attempt += 1
            self.stats.retries += 1
            await asyncio.sleep(delay)
