"""The core process of `strata serve`: owns the store, runs the loaders (and
the processor, archiver and schedulers), and serves every non-ingest route
on a Unix socket that the ingest workers forward to."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from strata import allocator
from strata.dashboard import dashboard_routes
from strata.lake.api import lake_routes
from strata.logs import setup_logging
from strata.query.api import CoreAPI, core_routes
from strata.server.pipeline import Pipeline
from strata.server.process import core_socket, die_with_parent, read_resolved_config

log = logging.getLogger("strata.core")

# Other stages add routes here: functions (pipeline) -> list of routes.
EXTRA_ROUTES: list = []
EXTRA_ROUTES.append(lake_routes)  # /v1/admin/{delete-user,batch,replay,retention}


def build_app(pipeline: Pipeline) -> Starlette:
    routes: list[BaseRoute] = list(core_routes(CoreAPI(pipeline)))
    from strata.schemas.api import schema_routes

    routes.extend(schema_routes(pipeline))
    for factory in EXTRA_ROUTES:
        routes.extend(factory(pipeline))
    # Last, so that the page's "/" and its assets never shadow an API route.
    routes.extend(dashboard_routes(pipeline))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        log.info("core: stopping, draining loaders")
        pipeline.stop()

    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="strata-core")
    parser.add_argument("--resolved-config", required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    setup_logging("core")
    config = read_resolved_config(args.resolved_config)
    allocator.setup(config)  # before any thread starts (decision 095)
    pipeline = Pipeline.open(config)
    pipeline.start()
    socket_path = core_socket(config)
    if socket_path.exists():
        socket_path.unlink()
    app = build_app(pipeline)
    allocator.freeze_startup_heap(config, "core")
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            uds=str(socket_path),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    )
    log.info("core: serving on %s (pid %d)", socket_path, os.getpid())
    server.run()


if __name__ == "__main__":
    main()
