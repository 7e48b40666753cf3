"""The ingest worker's forwarder: HTTP/1.1 to the core process over its Unix socket.

`strata serve`'s ingest workers answer ``/v1/batch`` and ``/v1/track``
themselves and hand every other request to the core process. This module is
that hop, written as a plain ASGI app on asyncio streams: a small pool of
persistent keep-alive connections, the request head written as bytes, the
response head and body read with a minimal HTTP/1.1 parser (the peer is
always strata's own core, uvicorn). It replaced an ``httpx.AsyncClient``
whose per-request cost was most of a cache hit's latency (decision 097).

Contract of :class:`CoreForwarder` (an ASGI app for ``http`` scopes):

* The request goes out with its method, raw (still percent-encoded) path and
  query, its headers minus the hop-by-hop ones, the whole body with a
  ``Content-Length``, and ``X-Forwarded-For: <client host>`` appended. A path
  or query holding a byte no request line may carry (a control character or
  space) is answered 400 here, without contacting the core.
* The core's status and headers come back unchanged except hop-by-hop ones
  (and ``date``/``server``, which the worker's own server sets). The body is
  neither decoded nor re-encoded. A body of known length up to
  ``BUFFER_LIMIT`` is read whole before the answer starts; a larger one, or a
  chunked (streamed) one, is streamed to the client as it arrives, so a
  streaming endpoint keeps streaming.
* If the core cannot be reached, or the connection fails before any byte of
  the response arrived, the client gets 503 with ``Retry-After: 1`` and a JSON
  error. An idempotent request (RFC 9110: GET, HEAD, OPTIONS, PUT, DELETE) is
  first retried once on a fresh connection; others are never re-sent, since
  the core may already have acted on them. A failure after the response began
  to stream aborts the client's connection (its answer is visibly incomplete).
* A connection goes back to the pool only after a complete response the core
  did not mark ``Connection: close``; idle connections older than
  ``IDLE_TIMEOUT`` (under uvicorn's 5 s keep-alive) are dropped, not reused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("strata.worker")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Request and response headers that describe one connection, not the message.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"host",
        # The worker's server already answered the client's 100-continue (the body
        # is read whole before forwarding); the core must not send a 1xx.
        b"expect",
    }
)
# The worker's uvicorn adds its own; the core's would be duplicates.
RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"transfer-encoding",
        b"upgrade",
        b"trailers",
        b"date",
        b"server",
    }
)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

BUFFER_LIMIT = 256 * 1024  # larger bodies (or chunked ones) are streamed
STREAM_PIECE = 64 * 1024
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 120.0  # between two reads of one response, as the httpx client had
IDLE_TIMEOUT = 4.0  # uvicorn (the core) closes idle keep-alive connections after 5 s
MAX_IDLE = 32
MAX_CONNECTIONS = 256

UNAVAILABLE_BODY = json.dumps({"error": "core process unavailable; retry shortly"}).encode()
BAD_TARGET_BODY = json.dumps({"error": "path: holds a character no URL can carry"}).encode()


class CoreUnavailable(Exception):
    """The core could not be reached, or the connection failed before any
    response byte arrived (``retryable``: the request may be re-sent once if
    it is idempotent)."""


class ResponseBroken(Exception):
    """The connection failed after part of the response had arrived."""


class Connection:
    """One keep-alive HTTP/1.1 connection to the core."""

    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def close(self) -> None:
        self.writer.close()

    def usable(self, now: float) -> bool:
        """False if the core closed it (EOF already seen) or it idled too long."""
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and now - self.idle_since < IDLE_TIMEOUT
        )


class ResponseHead:
    __slots__ = ("status", "headers", "length", "chunked", "close")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        chunked: bool,
        close: bool,
    ) -> None:
        self.status = status
        self.headers = headers
        self.length = length
        self.chunked = chunked
        self.close = close


def parse_head(data: bytes) -> ResponseHead:
    """Parse an HTTP/1.1 response head (status line and headers, with the
    final blank line); raises ``ValueError`` if it is malformed."""
    lines = data.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1."):
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    status = int(rest[:3])
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    close = version == b"HTTP/1.0"
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"bad header line {line[:80]!r}")
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif name == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            close = b"close" in tokens or (close and b"keep-alive" not in tokens)
        if name not in RESPONSE_DROP:
            headers.append((name, value))
    if chunked:
        length = None
        headers = [(n, v) for n, v in headers if n != b"content-length"]
    return ResponseHead(status, headers, length, chunked, close)


def request_target(scope: Scope) -> bytes | None:
    """The raw path and query for the request line; None if a byte in them
    cannot be carried by one (a control character or a space). Bytes above
    0x7f are percent-encoded as themselves."""
    path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    query: bytes = scope.get("query_string") or b""
    target = path + b"?" + query if query else path
    if any(byte <= 0x20 or byte == 0x7F for byte in target):
        return None
    if not target.isascii():
        target = b"".join(b"%%%02X" % byte if byte > 0x7F else bytes((byte,)) for byte in target)
    return target


class CoreForwarder:
    """ASGI app forwarding ``http`` requests to the core at ``socket_path``
    (the contract is in this module's docstring)."""

    def __init__(self, socket_path: str, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.socket_path = socket_path
        self.idle: list[Connection] = []
        self.slots = asyncio.Semaphore(max_connections)

    # -- the pool --------------------------------------------------------------------------------
    async def _connect(self) -> Connection:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(
                    self.socket_path, limit=BUFFER_LIMIT
                )
        except (OSError, TimeoutError) as exc:
            raise CoreUnavailable(f"connect {self.socket_path}: {exc!r}") from exc
        return Connection(reader, writer)

    async def _acquire(self) -> Connection:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()  # the most recently used: least likely to be stale
            if connection.usable(now):
                return connection
            connection.close()
        return await self._connect()

    def _release(self, connection: Connection) -> None:
        if len(self.idle) >= MAX_IDLE or connection.writer.is_closing():
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self.idle.append(connection)

    # -- ASGI ------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http", scope["type"]
        target = request_target(scope)
        if target is None:
            await _send_json(send, 400, BAD_TARGET_BODY)
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client went away while sending its body
        method: str = scope["method"]
        head = _request_head(scope, method, target, body)
        async with self.slots:
            for attempt in (1, 2):
                try:
                    await self._exchange(head, body, method, receive, send, fresh=attempt == 2)
                    return
                except CoreUnavailable as exc:
                    if attempt == 1 and method in IDEMPOTENT:
                        log.info("core connection failed before a response (%s); retrying", exc)
                        continue
                    log.warning("core unreachable: %s", exc)
                    await _send_unavailable(send)
                    return

    async def _exchange(
        self, head: bytes, body: bytes, method: str, receive: Receive, send: Send, *, fresh: bool
    ) -> None:
        """One request/response over one connection (a new one if ``fresh``).
        Raises CoreUnavailable if the connection failed before any byte of the
        response arrived; answers (or aborts) the client otherwise."""
        connection = await (self._connect() if fresh else self._acquire())
        reusable = False
        try:
            writer, reader = connection.writer, connection.reader
            try:
                writer.write(head + body if len(body) < STREAM_PIECE else head)
                if len(body) >= STREAM_PIECE:
                    writer.write(body)
                async with asyncio.timeout(READ_TIMEOUT):
                    response = await _read_response_head(reader)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:  # part of a head arrived: the core did answer
                    log.warning("core connection failed mid-response: %r", exc)
                    await _send_unavailable(send)
                    return
                raise CoreUnavailable(repr(exc)) from exc
            except OSError as exc:
                raise CoreUnavailable(repr(exc)) from exc
            except (TimeoutError, ValueError) as exc:
                # A core that does not answer (or answers garbage) is not asked twice.
                log.warning("no usable response head from the core: %r", exc)
                await _send_unavailable(send)
                return
            no_body = method == "HEAD" or response.status in (204, 304)
            if no_body:
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": response.headers,
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                reusable = not response.close
                return
            if response.length is not None and response.length <= BUFFER_LIMIT:
                try:
                    async with asyncio.timeout(READ_TIMEOUT):
                        data = await reader.readexactly(response.length)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    log.warning("core connection failed mid-response: %r", exc)
                    await _send_unavailable(send)
                    return
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": response.headers,
                    }
                )
                await send({"type": "http.response.body", "body": data})
                reusable = not response.close
                return
            reusable = await self._stream(reader, response, receive, send) and not response.close
        finally:
            if reusable:
                self._release(connection)
            else:
                connection.close()

    async def _stream(
        self, reader: asyncio.StreamReader, response: ResponseHead, receive: Receive, send: Send
    ) -> bool:
        """Send the response's body to the client as it arrives; True if it
        was read to its end (the connection is reusable)."""
        await send(
            {"type": "http.response.start", "status": response.status, "headers": response.headers}
        )
        # uvicorn's send() is silent once the client is gone; receive() says so.
        disconnected = asyncio.Event()

        async def watch() -> None:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()

        watcher = asyncio.create_task(watch())
        try:
            if response.chunked:
                pieces = _chunks(reader)
            elif response.length is not None:
                pieces = _counted(reader, response.length)
            else:  # no length, not chunked: the body runs to the end of the connection
                pieces = _until_eof(reader)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(READ_TIMEOUT) as deadline:
                async for piece in pieces:
                    if disconnected.is_set():
                        return False
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    deadline.reschedule(loop.time() + READ_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            # Headers are out: the client's connection is aborted by raising.
            raise ResponseBroken(f"core connection failed mid-response: {exc!r}") from exc
        finally:
            watcher.cancel()
        await send({"type": "http.response.body", "body": b""})
        return response.length is not None or response.chunked


async def _read_response_head(reader: asyncio.StreamReader) -> ResponseHead:
    while True:
        try:
            data = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise ValueError("response head too large") from exc
        response = parse_head(data)
        if response.status >= 200:
            return response
        # 1xx (none expected, since Expect is not forwarded): skip it.


async def _counted(reader: asyncio.StreamReader, length: int) -> Any:
    remaining = length
    while remaining:
        piece = await reader.read(min(remaining, STREAM_PIECE))
        if not piece:
            raise asyncio.IncompleteReadError(b"", remaining)
        remaining -= len(piece)
        yield piece


async def _chunks(reader: asyncio.StreamReader) -> Any:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # Trailers (uvicorn sends none) up to the blank line.
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return
        yield await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("bad chunk terminator")


async def _until_eof(reader: asyncio.StreamReader) -> Any:
    while piece := await reader.read(STREAM_PIECE):
        yield piece


def _request_head(scope: Scope, method: str, target: bytes, body: bytes) -> bytes:
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nhost: core\r\n"]
    for name, value in scope["headers"]:
        if name.lower() not in HOP_BY_HOP:
            parts += [name, b": ", value, b"\r\n"]
    if body or method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
        parts += [b"content-length: ", str(len(body)).encode("ascii"), b"\r\n"]
    client = scope.get("client")
    parts += [b"x-forwarded-for: ", (client[0] if client else "").encode("latin-1"), b"\r\n\r\n"]
    return b"".join(parts)


async def _read_body(receive: Receive) -> bytes | None:
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    pieces = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        pieces.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(pieces)


async def _send_json(
    send: Send, status: int, data: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _send_unavailable(send: Send) -> None:
    await _send_json(send, 503, UNAVAILABLE_BODY, ((b"retry-after", b"1"),))
