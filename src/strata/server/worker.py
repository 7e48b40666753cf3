"""An ingest worker process of `strata serve`.

It serves ``/v1/batch`` and ``/v1/track`` itself (appending to the log with
its own group commit) and forwards every other request to the core process
over its Unix socket, so all of strata sits behind one base URL. Several
workers accept on the same listening socket; the kernel spreads connections.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from strata import allocator
from strata.auth import Keyring
from strata.config import Config
from strata.ingest.app import IngestService, ingest_routes
from strata.ingest.committer import GroupCommitter
from strata.log import open_log
from strata.logs import setup_logging
from strata.server.http import BoundedHttpToolsProtocol
from strata.server.process import core_socket, die_with_parent, read_resolved_config, run_dir
from strata.telemetry import REGISTRY

log = logging.getLogger("strata.worker")

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}

# Other stages add ingest-side routes here: functions (service) -> routes.
EXTRA_INGEST_ROUTES: list = []


class CoreProxy:
    def __init__(self, socket_path: str) -> None:
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=socket_path),
            base_url="http://core",
            timeout=httpx.Timeout(120.0, connect=5.0),
        )

    async def forward(self, request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        headers.append(("x-forwarded-for", request.client.host if request.client else ""))
        # The raw (still percent-encoded) path: the decoded one may hold
        # characters no URL can carry (a %0B in a path parameter).
        path = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        try:
            upstream = await self.client.request(
                request.method,
                path,
                params=request.url.query,
                headers=headers,
                content=await request.body(),
            )
        except httpx.InvalidURL as exc:
            return JSONResponse({"error": f"path: {exc}"}, status_code=400)
        except httpx.HTTPError as exc:
            log.warning("core unreachable: %s", exc)
            return JSONResponse(
                {"error": "core process unavailable; retry shortly"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        response_headers = {
            k: v
            for k, v in upstream.headers.items()
            if k.lower() not in HOP_BY_HOP | {"content-encoding"}
        }
        return Response(
            upstream.content, status_code=upstream.status_code, headers=response_headers
        )


def build_app(service: IngestService, proxy: CoreProxy) -> Starlette:
    routes: list[BaseRoute] = list(ingest_routes(service))
    for factory in EXTRA_INGEST_ROUTES:
        routes.extend(factory(service))
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    routes.append(Route("/{path:path}", proxy.forward, methods=methods))
    return Starlette(routes=routes)


def _snapshot_loop(path: os.PathLike[str], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            REGISTRY.write_snapshot(path)  # type: ignore[arg-type]
        except OSError:
            log.warning("could not write metrics snapshot", exc_info=True)


def serve_ingest_worker(
    argv: list[str] | None,
    *,
    prog: str,
    make_app: Callable[[IngestService, Config], tuple[Starlette, Path]],
) -> None:
    """Run one ingest worker process: parse its arguments, open the log, the
    group committer and the service, and serve ``make_app``'s app (which also
    names the worker's metrics snapshot file) on the inherited socket.
    `strata serve` and `strata ingest` differ only in ``make_app``."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--resolved-config", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent()
    setup_logging(f"ingest-{args.index}")
    config = read_resolved_config(args.resolved_config)
    allocator.setup(config)  # before any thread starts (decision 095)
    log_ = open_log(config, create_topics=False)
    committer = GroupCommitter(log_)
    service = IngestService(config, committer, Keyring(config), log=log_)
    app, metrics_dir = make_app(service, config)
    stop = threading.Event()
    threading.Thread(
        target=_snapshot_loop,
        args=(metrics_dir / f"metrics-ingest-{args.index}.json", stop),
        daemon=True,
    ).start()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            loop="auto",
            http=BoundedHttpToolsProtocol,  # bounded request head (strata.server.http)
            timeout_keep_alive=30,
            limit_concurrency=2000,
            h11_max_incomplete_event_size=64 * 1024,
            timeout_graceful_shutdown=10,
        )
    )
    try:
        asyncio.run(server.serve(sockets=[socket.socket(fileno=args.fd)]))
    finally:
        stop.set()
        committer.close()
        log_.close()


def main(argv: list[str] | None = None) -> None:
    def make_app(service: IngestService, config: Config) -> tuple[Starlette, Path]:
        proxy = CoreProxy(str(core_socket(config)))
        return build_app(service, proxy), run_dir(config)

    serve_ingest_worker(argv, prog="strata-worker", make_app=make_app)


if __name__ == "__main__":
    main()
