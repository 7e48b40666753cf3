"""The ingest worker's forwarder to the core (strata.server.forward).

Two setups, both real servers:

* a real `strata serve` (its workers forward to its core): answers through the
  worker match the core's own answers, large bodies, POST bodies, encoded
  paths, HEAD, many concurrent connections, and a killed core (503, then the
  supervisor's restart and recovery);
* the forwarder behind a real uvicorn on TCP, in front of a real uvicorn (or a
  raw asyncio server) on a Unix socket, for what the core does not do today:
  chunked streaming, a stream broken midway, ``Connection: close``, and a
  connection dropped before any response byte (retried only if idempotent).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from tests.conftest import ADMIN_TOKEN, StrataServer, free_port

from strata.server.forward import CoreForwarder, request_target

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# -- through a real `strata serve` ---------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataServer]:
    server = StrataServer(tmp_path_factory.mktemp("proxy") / "data", workers=2).start()
    response = server.post_batch(
        [{"event_type": "page_view", "user_id": f"u{i}", "country": "DE"} for i in range(3)]
    )
    assert response.status_code == 200, response.text
    server.wait_caught_up()
    yield server
    server.stop()


def core_client(server: StrataServer) -> httpx.Client:
    sock = server.data_dir / "run" / "core.sock"
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://core", timeout=60
    )


def comparable(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k not in ("date", "server")}
    return response.status_code, response.content, headers


def test_answers_match_the_core_socket(served: StrataServer) -> None:
    """The same requests through the worker and straight to the core get the
    same status, body and headers (bar date/server)."""
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/healthz", {}),
        ("GET", "/openapi.json", {}),
        ("GET", "/v1/metrics/no%2Fsuch%20metric", {"headers": AUTH}),
        ("GET", "/v1/metrics/events?from=yesterday", {"headers": AUTH}),
        ("POST", "/v1/sql", {"headers": AUTH, "json": {"sql": "DROP TABLE events"}}),
        ("POST", "/v1/sql", {"headers": AUTH, "content": b"{not json"}),
        ("DELETE", "/v1/status", {"headers": AUTH}),
        ("GET", "/nothing/here", {}),
    ]
    with core_client(served) as core:
        for method, path, kwargs in requests:
            via_worker = served.client.request(method, served.url + path, **kwargs)
            direct = core.request(method, path, **kwargs)
            assert comparable(via_worker) == comparable(direct), (method, path)


def test_percent_encoded_path_reaches_the_core_undecoded(served: StrataServer) -> None:
    # %0B must not break the request line; the core decodes each escape once.
    for raw, decoded in [
        ("a%20b", "a b"),
        ("a%0Bb", "a\x0bb"),
        ("caf%C3%A9", "café"),
        ("100%25", "100%"),
    ]:
        response = served.client.get(f"{served.url}/v1/metrics/{raw}", headers=AUTH)
        assert response.status_code == 404, response.text
        assert repr(decoded) in response.json()["error"]


def testrequest_target() -> None:
    """Raw bytes no request line may carry are refused (400 upstream of it);
    bytes above 0x7f are escaped as themselves."""
    scope = {"path": "/x", "raw_path": b"/caf\xe9", "query_string": b"a=%20&b=\xff"}
    assert request_target(scope) == b"/caf%E9?a=%20&b=%FF"
    assert request_target({**scope, "raw_path": b"/a b"}) is None
    assert request_target({**scope, "query_string": b"a=\x0b"}) is None
    assert request_target({"path": "/d", "raw_path": None, "query_string": b""}) == b"/d"


def test_post_body_is_forwarded_byte_exact(served: StrataServer) -> None:
    literal = 'é✓ \\u00e9 "quoted" ' + "x" * 90_000  # > one 64 KiB write
    sql = f"SELECT '{literal.replace(chr(39), chr(39) * 2)}' AS s, length(s) AS n"
    body = json.dumps({"sql": sql}, ensure_ascii=False).encode()
    response = served.client.post(
        f"{served.url}/v1/sql", content=body, headers={**AUTH, "content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["rows"][0][0] == literal


def test_large_response_body(served: StrataServer) -> None:
    """A CSV answer of several MiB (streamed through, not buffered) arrives whole."""
    sql = "SELECT n, repeat('y', 40) AS pad FROM events ARRAY JOIN range(60000) AS n ORDER BY n"
    response = served.client.post(
        f"{served.url}/v1/sql", json={"sql": sql}, headers={**AUTH, "accept": "text/csv"}
    )
    assert response.status_code == 200, response.text[:500]
    assert int(response.headers["content-length"]) == len(response.content)
    assert len(response.content) > 3 * 1024 * 1024
    lines = response.text.splitlines()
    assert len(lines) == 1 + 3 * 60000  # header, then 60k rows per event
    with core_client(served) as core:
        direct = core.post("/v1/sql", json={"sql": sql}, headers={**AUTH, "accept": "text/csv"})
    assert direct.content == response.content


def test_head_keeps_the_length_and_sends_no_body(served: StrataServer) -> None:
    get = served.client.get(f"{served.url}/healthz")
    head = served.client.head(f"{served.url}/healthz")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    # The keep-alive connection is still in step after the bodiless answer.
    assert served.client.get(f"{served.url}/healthz").content == get.content


def test_ingest_routes_stay_in_the_worker(served: StrataServer) -> None:
    # GET on an ingest path is not an ingest route: forwarded (the core has no such route).
    with core_client(served) as core:
        assert comparable(served.client.get(f"{served.url}/v1/batch")) == comparable(
            core.get("/v1/batch")
        )
    preflight = served.client.options(f"{served.url}/v1/batch")
    assert preflight.status_code in (200, 204)
    assert "access-control-allow-methods" in preflight.headers


def test_many_concurrent_connections(served: StrataServer) -> None:
    async def run() -> list[tuple[int, Any]]:
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def one(i: int) -> tuple[int, Any]:
                if i % 2:
                    response = await client.post(
                        f"{served.url}/v1/sql",
                        headers=AUTH,
                        json={"sql": f"SELECT {i} AS i, count() AS n FROM events"},
                    )
                    return response.status_code, response.json()["rows"][0]
                response = await client.get(f"{served.url}/v1/metrics/m{i}", headers=AUTH)
                return response.status_code, response.json()["error"]

            return await asyncio.gather(*(one(i) for i in range(50)))

    answers = asyncio.run(run())
    for i, (status, answer) in enumerate(answers):
        if i % 2:
            assert (status, answer) == (200, [i, 3])
        else:
            assert status == 404 and f"m{i}" in answer


def test_killed_core_answers_503_then_recovers(server_factory: Any) -> None:
    server = server_factory("killed", workers=1).start()
    assert server.client.get(f"{server.url}/healthz").status_code == 200
    children = json.loads((server.data_dir / "run" / "serve.json").read_text())["children"]
    os.kill(children["core"], signal.SIGKILL)
    seen_503 = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = server.client.get(f"{server.url}/healthz")
        if response.status_code == 503:
            seen_503 = True
            assert response.headers["retry-after"] == "1"
            assert "core process unavailable" in response.json()["error"]
        elif seen_503 and response.status_code == 200:
            break
        else:
            assert response.status_code == 200 and not seen_503, response.text
        time.sleep(0.05)
    assert seen_503, "no 503 while the core was down"
    assert response.status_code == 200, "the core did not come back"
    # The supervisor records the new core once it answers (shortly after the worker saw it).
    while time.monotonic() < deadline:
        restarted = json.loads((server.data_dir / "run" / "serve.json").read_text())["children"]
        if restarted["core"] != children["core"]:
            break
        time.sleep(0.1)
    assert restarted["core"] != children["core"]
    # A POST (not retried) works again too, on the same client connection.
    assert server.sql("SELECT 1 AS one")["rows"] == [[1]]


# -- the forwarder between two real uvicorn servers ----------------------------------------------


class Stack:
    """Upstream (a Starlette app on a Unix socket, or a raw asyncio server)
    and the forwarder on TCP, served by uvicorn on one event loop in a thread."""

    def __init__(self, tmp: Path) -> None:
        self.socket_path = str(tmp / "up.sock")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.release = asyncio.Event()
        self.drops = 0  # requests the raw upstream closed without answering
        self.raw_requests: list[bytes] = []
        self.servers: list[uvicorn.Server] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def upstream_app(self) -> Starlette:
        release = self.release

        async def stream(request: Request) -> StreamingResponse:
            async def body() -> AsyncIterator[bytes]:
                yield b"first\n"
                await release.wait()  # set by the test once "first" reached the client
                for i in range(1000):
                    yield b"%d\n" % i

            return StreamingResponse(body(), media_type="text/plain")

        async def broken(request: Request) -> StreamingResponse:
            async def body() -> AsyncIterator[bytes]:
                yield b"partial\n"
                raise RuntimeError("upstream failed mid-stream")

            return StreamingResponse(body(), media_type="text/plain")

        async def closing(request: Request) -> Response:
            return Response(b"bye", headers={"connection": "close"})

        async def echo(request: Request) -> Response:
            return Response(await request.body(), headers={"x-method": request.method})

        return Starlette(
            routes=[
                Route("/stream", stream),
                Route("/broken", broken),
                Route("/closing", closing),
                Route("/echo", echo, methods=["GET", "POST", "PUT"]),
            ]
        )

    async def _start(self, upstream: str) -> None:
        if upstream == "raw":
            await asyncio.start_unix_server(self._raw_upstream, path=self.socket_path)
        elif upstream == "app":
            up = uvicorn.Server(
                uvicorn.Config(
                    self.upstream_app(), uds=self.socket_path, log_level="warning", lifespan="off"
                )
            )
            self.servers.append(up)
            self.tasks.append(asyncio.ensure_future(up.serve()))
        front = uvicorn.Server(
            uvicorn.Config(
                CoreForwarder(self.socket_path),
                host="127.0.0.1",
                port=self.port,
                log_level="critical",
                lifespan="off",
            )
        )
        self.servers.append(front)
        self.tasks.append(asyncio.ensure_future(front.serve()))
        while not all(s.started for s in self.servers):
            await asyncio.sleep(0.01)

    async def _raw_upstream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Reads each request; drops the connection unanswered on every odd
        request, answers ``ok`` on every even one."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.raw_requests.append(head + await reader.readexactly(length))
                if len(self.raw_requests) % 2:
                    self.drops += 1
                    writer.close()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def start(self, upstream: str = "app") -> Stack:
        """``upstream``: "app" (uvicorn), "raw" (the dropping server) or "none"."""
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(upstream), self.loop).result(60)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            for server in self.servers:
                server.should_exit = True
            await asyncio.wait(self.tasks, timeout=30)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path)
    yield stack
    stack.stop()


def test_chunked_response_streams_through(stack: Stack) -> None:
    stack.start()
    with httpx.Client(timeout=30) as client:
        with client.stream("GET", f"{stack.url}/stream") as response:
            assert response.status_code == 200
            assert response.headers.get("transfer-encoding") == "chunked"
            lines = response.iter_lines()
            # The upstream holds the rest back until the first line arrived
            # here: a buffering forwarder would time out instead.
            assert next(lines) == "first"
            stack.loop.call_soon_threadsafe(stack.release.set)
            rest = list(lines)
        assert rest == [str(i) for i in range(1000)]
        # The connection to the upstream went back to the pool in step.
        assert client.post(f"{stack.url}/echo", content=b"again").content == b"again"


def test_stream_broken_midway_aborts_the_client(stack: Stack) -> None:
    stack.start()
    with httpx.Client(timeout=30) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            with client.stream("GET", f"{stack.url}/broken") as response:
                assert response.status_code == 200
                b"".join(response.iter_bytes())
        assert client.get(f"{stack.url}/echo").status_code == 200


def test_connection_close_from_upstream_is_not_reused(stack: Stack) -> None:
    stack.start()
    with httpx.Client(timeout=30) as client:
        for _ in range(3):
            response = client.get(f"{stack.url}/closing")
            assert (response.status_code, response.content) == (200, b"bye")
            echoed = client.put(f"{stack.url}/echo", content=b"\x00\xff body")
            assert (echoed.content, echoed.headers["x-method"]) == (b"\x00\xff body", "PUT")


def test_dropped_before_answer_retries_only_idempotent(stack: Stack) -> None:
    stack.start("raw")
    with httpx.Client(timeout=30) as client:
        # GET: dropped once, re-sent once on a fresh connection, answered.
        response = client.get(f"{stack.url}/x?q=1")
        assert (response.status_code, response.content) == (200, b"ok")
        assert stack.drops == 1 and len(stack.raw_requests) == 2
        assert stack.raw_requests[0] == stack.raw_requests[1]
        head = stack.raw_requests[0].lower()
        assert head.startswith(b"get /x?q=1 http/1.1\r\n")
        assert b"\r\nx-forwarded-for: 127.0.0.1\r\n" in head
        # POST: dropped, never re-sent: 503 with Retry-After.
        response = client.post(f"{stack.url}/y", content=b"payload")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert len(stack.raw_requests) == 3 and stack.raw_requests[2].endswith(b"\r\n\r\npayload")


def test_unreachable_upstream_is_503(stack: Stack) -> None:
    stack.start("none")
    response = httpx.get(f"{stack.url}/anything", timeout=30)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"error": "core process unavailable; retry shortly"}
