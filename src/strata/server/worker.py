"""An ingest worker process of `strata serve`.

It serves ``/v1/batch`` and ``/v1/track`` itself (appending to the log with
its own group commit) and forwards every other request to the core process
over its Unix socket (``strata.server.forward``: pooled keep-alive
connections), so all of strata sits behind one base URL. Several
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

import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from strata import allocator
from strata.auth import Keyring
from strata.config import Config
from strata.ingest.app import IngestService, ingest_routes
from strata.ingest.committer import GroupCommitter
from strata.log import open_log
from strata.logs import setup_logging
from strata.server.forward import CoreForwarder
from strata.server.http import BoundedHttpToolsProtocol
from strata.server.process import core_socket, die_with_parent, read_resolved_config, run_dir
from strata.telemetry import REGISTRY

log = logging.getLogger("strata.worker")

# Other stages add ingest-side routes here: functions (service) -> routes.
EXTRA_INGEST_ROUTES: list = []

FORWARDED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"})


class WorkerApp:
    """The worker's ASGI app: a request that fully matches one of the worker's
    own routes (ingest) goes to its Starlette app; any other request with a
    forwarded method goes straight to the core forwarder, without Starlette's
    routing and request/response objects on the way (decision 097).

    The Starlette app keeps the catch-all route to the forwarder too, so that
    what it alone decides (405 for other methods, lifespan) is unchanged."""

    def __init__(
        self, app: Starlette, own_routes: list[BaseRoute], forwarder: CoreForwarder
    ) -> None:
        self.app = app
        self.own_routes = own_routes
        self.forwarder = forwarder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in FORWARDED_METHODS:
            for route in self.own_routes:
                if route.matches(scope)[0] is Match.FULL:
                    break
            else:
                await self.forwarder(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(service: IngestService, forwarder: CoreForwarder) -> WorkerApp:
    """The ingest worker of `strata serve`: ingest routes served here, every
    other request forwarded to the core (``strata.server.forward``)."""
    routes: list[BaseRoute] = list(ingest_routes(service))
    for factory in EXTRA_INGEST_ROUTES:
        routes.extend(factory(service))
    own_routes = list(routes)
    routes.append(Route("/{path:path}", forwarder, methods=sorted(FORWARDED_METHODS)))
    return WorkerApp(Starlette(routes=routes), own_routes, forwarder)


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
    make_app: Callable[[IngestService, Config], tuple[ASGIApp, Path]],
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
    allocator.freeze_startup_heap(config, f"ingest-{args.index}")
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
    def make_app(service: IngestService, config: Config) -> tuple[ASGIApp, Path]:
        forwarder = CoreForwarder(str(core_socket(config)))
        return build_app(service, forwarder), run_dir(config)

    serve_ingest_worker(argv, prog="strata-worker", make_app=make_app)


if __name__ == "__main__":
    main()
