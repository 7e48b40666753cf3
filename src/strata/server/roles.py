"""Role commands of the distributed shape: ``strata ingest``, ``strata query-api``
and ``strata archive``.

In the distributed shape (docs/deploy.md) every role is its own command,
reads the same config file, and talks to the others only through the log
(Kafka), the store (ClickHouse) and Redis:

* ``strata ingest``: ingest workers only, no core. It binds the port, starts
  ``--workers`` worker processes that accept on it, and restarts them when
  they die. Each worker serves ``/v1/batch`` and ``/v1/track`` (the same
  ``IngestService`` and group commit as ``strata serve``), ``/healthz``,
  ``/readyz`` and ``/metrics``; every other path answers 404 naming the role
  that serves it. Scale out by running more of them behind a load balancer.
* ``strata query-api``: the loaders and the query API (metrics, SQL,
  dashboard, admin), in one process that owns the store. It is the only
  writer of the streaming tables (one writer per table), so run exactly one
  per store. It does not run the archiver, the processor or the nightly batch:
  those are ``strata archive``, ``strata process`` and ``strata batch``.
* ``strata archive``: the lake archiver alone (log -> Parquet lake, exactly
  once by event_id), one process over every partition of ``events``. On
  SIGTERM it drains what the log already holds, checkpoints and exits.

``strata process`` is defined by its own stage (``strata.processor``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from strata import allocator
from strata.config import Config, ConfigError, load_config
from strata.server.http import BoundedHttpToolsProtocol

log = logging.getLogger("strata.roles")

NOT_HERE = (
    "this is a `strata ingest` node: it serves POST /v1/batch and /v1/track only; "
    "queries, the dashboard and admin routes are served by `strata query-api`"
)


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if getattr(args, "host", None):
        overrides["server.host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["server.port"] = args.port
    if getattr(args, "workers", None) is not None:
        overrides["server.ingest_workers"] = args.workers
    return load_config(args.config, overrides=overrides)


def _listen(config: Config) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.server.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((config.server.host, config.server.port))
    listener.listen(4096)
    return listener


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


# --- strata ingest ------------------------------------------------------------------------------


def run_ingest(args: argparse.Namespace) -> int:
    """Supervise ingest workers on one port until SIGTERM/SIGINT."""
    from strata.log import LogError, open_log
    from strata.server.process import run_dir
    from strata.server.supervisor import Child

    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"strata: {exc}", file=sys.stderr)
        return 2
    config.data_path.mkdir(parents=True, exist_ok=True)
    try:
        open_log(config).close()  # create the topics (idempotent) before any worker appends
    except LogError as exc:
        print(f"strata: ingest: the log is not reachable: {exc}", file=sys.stderr)
        return 1
    # Several roles may share a data directory, so the resolved config is per process.
    resolved = run_dir(config) / f"ingest-{os.getpid()}.json"
    resolved.write_bytes(msgspec.json.encode(config))
    try:
        listener = _listen(config)
    except OSError as exc:
        print(
            f"strata: cannot listen on {config.server.host}:{config.server.port}: {exc}",
            file=sys.stderr,
        )
        return 2
    listener.set_inheritable(True)
    port = listener.getsockname()[1]
    workers_n = config.server.ingest_workers or max(1, os.cpu_count() or 1)
    children = [
        Child(
            f"ingest-{i}",
            [
                sys.executable,
                "-m",
                "strata.server.roles",
                "ingest-worker",
                "--resolved-config",
                str(resolved),
                "--fd",
                str(listener.fileno()),
                "--index",
                str(i),
            ],
            pass_fds=(listener.fileno(),),
        )
        for i in range(workers_n)
    ]
    stop = _stop_on_signals()
    for child in children:
        child.start()
    print(
        f"strata ingest is running at http://{config.server.host}:{port} "
        f"({workers_n} worker(s), log: {config.log.backend})",
        flush=True,
    )
    try:
        while not stop.wait(0.2):
            for child in children:
                if not stop.is_set() and not child.alive():
                    child.restarts += 1
                    print(f"strata: {child.name} exited; restarting", file=sys.stderr, flush=True)
                    time.sleep(min(5.0, 0.2 * child.restarts))
                    child.start()
    finally:
        for child in children:
            child.signal(signal.SIGTERM)
        for child in children:
            child.wait(15)
        listener.close()
        resolved.unlink(missing_ok=True)
    return 0


def ingest_app(service: Any, metrics_dir: Path) -> Starlette:
    """The ingest-only app: ingest routes, health, metrics, and a 404 for the rest."""
    from strata.ingest.app import ingest_routes
    from strata.server.worker import EXTRA_INGEST_ROUTES
    from strata.telemetry import REGISTRY, load_snapshots

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "role": "ingest"})

    async def metrics(request: Request) -> Response:
        # Any worker answers for all workers of this node (their snapshots).
        merged = REGISTRY.merged_with(load_snapshots(metrics_dir))
        return PlainTextResponse(merged.render(), media_type="text/plain; version=0.0.4")

    async def elsewhere(request: Request) -> Response:
        return JSONResponse({"error": NOT_HERE}, status_code=404)

    routes: list[BaseRoute] = list(ingest_routes(service))
    for factory in EXTRA_INGEST_ROUTES:
        routes.extend(factory(service))
    routes += [
        Route("/healthz", healthz),
        Route("/readyz", healthz),
        Route("/metrics", metrics),
        Route(
            "/{path:path}",
            elsewhere,
            methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"],
        ),
    ]
    return Starlette(routes=routes)


def ingest_worker_main(argv: list[str]) -> None:
    """One ingest worker process of ``strata ingest``."""
    from strata.server.process import run_dir
    from strata.server.worker import serve_ingest_worker

    def make_app(service: Any, config: Config) -> tuple[Any, Path]:
        metrics_dir = run_dir(config) / f"ingest-{os.getppid()}"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        return ingest_app(service, metrics_dir), metrics_dir

    serve_ingest_worker(argv, prog="strata-ingest-worker", make_app=make_app)


# --- strata query-api ---------------------------------------------------------------------------


def open_query_pipeline(config: Config) -> Any:
    """The core's ``Pipeline`` with the loaders and the query layer only: no
    archiver and no nightly batch (their own roles run those)."""
    from strata.server.pipeline import Pipeline

    return Pipeline.open_loading(config)


def run_query_api(args: argparse.Namespace) -> int:
    """Load the log into the store and serve the query API until SIGTERM."""
    import uvicorn

    from strata.logs import setup_logging
    from strata.server.core import build_app

    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"strata: {exc}", file=sys.stderr)
        return 2
    setup_logging("query-api")
    allocator.setup(config)  # before any thread starts (decision 095)
    config.data_path.mkdir(parents=True, exist_ok=True)
    try:
        listener = _listen(config)
    except OSError as exc:
        print(
            f"strata: cannot listen on {config.server.host}:{config.server.port}: {exc}",
            file=sys.stderr,
        )
        return 2
    pipeline = open_query_pipeline(config)
    pipeline.start()
    port = listener.getsockname()[1]
    app = build_app(pipeline)  # its lifespan stops the pipeline (drains the loaders)
    allocator.freeze_startup_heap(config, "query-api")
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            http=BoundedHttpToolsProtocol,
            limit_concurrency=2000,
            timeout_graceful_shutdown=10,
        )
    )
    print(
        f"strata query-api is running at http://{config.server.host}:{port} "
        f"(store: {config.store.backend}, log: {config.log.backend})",
        flush=True,
    )
    server.run(sockets=[listener])
    return 0


# --- strata archive ----------------------------------------------------------------------------


def run_archive(args: argparse.Namespace) -> int:
    """Archive the log into the lake until SIGTERM/SIGINT, then drain and exit 0
    (``--drain``: archive what the log holds now and exit). 2 on a config error,
    1 when the log or the lake cannot be opened."""
    from strata.lake.archiver import Archiver
    from strata.log import LogError, open_log
    from strata.logs import setup_logging

    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"strata: {exc}", file=sys.stderr)
        return 2
    setup_logging("archive")
    allocator.setup(config)  # before any thread starts (decision 095)
    config.data_path.mkdir(parents=True, exist_ok=True)
    stop = _stop_on_signals()
    try:
        log_ = open_log(config)
    except LogError as exc:
        print(f"strata: archive: the log is not reachable: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            archiver = Archiver.from_config(config, log_)
        except (OSError, ValueError, ConfigError) as exc:
            print(f"strata: archive: cannot open the lake: {exc}", file=sys.stderr)
            return 1
        try:
            if args.drain:
                archived = archiver.drain()
                print(f"strata archive: drained {archived} record(s)", flush=True)
                return 0
            print(
                f"strata archive is running (lake: {config.lake.path or config.data_path / 'lake'}, "
                f"log: {config.log.backend})",
                flush=True,
            )
            archiver.run(stop)  # returns after draining once stop is set
            return 0
        finally:
            archiver.close()
    finally:
        log_.close()


# --- command line ---------------------------------------------------------------------------------


def add_role_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``ingest``, ``query-api`` and ``archive`` to the ``strata`` command line."""
    p = sub.add_parser("ingest", help="distributed shape: run ingest workers only (no core)")
    common(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    p.set_defaults(func=run_ingest)

    p = sub.add_parser(
        "query-api", help="distributed shape: run the loaders and the query API (owns the store)"
    )
    common(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=run_query_api)

    p = sub.add_parser(
        "archive", help="distributed shape: run the lake archiver alone (log -> Parquet lake)"
    )
    common(p)
    p.add_argument("--drain", action="store_true", help="archive what the log holds now, then exit")
    p.set_defaults(func=run_archive)


if __name__ == "__main__":
    if sys.argv[1:2] == ["ingest-worker"]:
        ingest_worker_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m strata.server.roles ingest-worker --resolved-config ...")
