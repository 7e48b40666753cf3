"""The HTTP/1.1 protocol strata's public listeners run: uvicorn's httptools
protocol with a bound on the request head.

uvicorn's ``h11_max_incomplete_event_size`` only applies to its h11
protocol; with httptools (the faster one, picked by ``http="auto"``) the
request line and headers were buffered without limit, so one client could
grow a worker's memory with a huge header. Here the URL plus header names
and values of one request may take at most ``MAX_HEAD_BYTES``; past that the
client gets ``431`` and the connection is closed (docs/security.md).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that answers 431 to a request head over ``MAX_HEAD_BYTES``."""

    _head_bytes = 0
    _head_too_large = False

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            # httptools turns a callback's exception into a parser error,
            # which uvicorn answers with send_400_response (below).
            self._head_too_large = True
            raise ValueError("request head too large")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        message = b"request head too large"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(message)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + message
        )
        self.transport.close()
