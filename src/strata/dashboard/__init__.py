"""The live dashboard: one static page served by the core process.

Routes (added last in ``strata.server.core.build_app``, so ``/`` never
shadows an API route):

* ``GET /``: the page (``static/index.html``). It holds no data, so it needs
  no token; the page signs in with a query token and then calls the
  metrics API, ``/v1/status`` and ``/metrics`` on the same origin.
* ``GET /dashboard/static/...``: the page's JS/CSS and the vendored chart
  library, read from package data (no network, no CDN).
* ``GET /dashboard/config``: the ``[dashboard]`` settings and the
  configured metrics, for a token with the ``metrics`` scope. The page uses
  it as its sign-in check.

Every response carries a Content-Security-Policy that forbids inline and
remote scripts: a second line of defence behind the page's rule that text
from data is inserted with ``textContent`` only (docs/dashboard.md).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from strata.auth import bearer
from strata.config import parse_duration_ms
from strata.query.api import APIError, json_endpoint
from strata.server.pipeline import Pipeline

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        # ECharts sets inline styles on the elements it creates.
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def static_dir() -> Any:
    """The package-data directory holding index.html, app.js and vendor/."""
    return resources.files("strata.dashboard") / "static"


class _SecureStatic:
    """StaticFiles plus the security headers. Assets are revalidated on
    every load (ETag / Last-Modified, answered 304), so an upgraded
    package never pairs a new index.html with an old app.js."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                for name, value in SECURITY_HEADERS.items():
                    headers.append((name.lower().encode(), value.encode()))
                headers.append((b"cache-control", b"no-cache"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def dashboard_config(pipeline: Pipeline) -> dict[str, Any]:
    """What the page needs to know about this deployment."""
    dashboard = pipeline.config.dashboard
    return {
        "refresh_interval_ms": parse_duration_ms(dashboard.refresh_interval),
        "funnel_steps": list(dashboard.funnel_steps),
        "seed_metric": "page_views_by_country",
        "serving_backend": pipeline.config.serving.backend,
        "metrics": [
            {
                "name": m.name,
                "filter": m.filter,
                "dimensions": list(m.dimensions),
                "aggregations": dict(m.aggregations),
                "window": m.window,
            }
            for m in pipeline.config.metrics
        ],
    }


def dashboard_routes(pipeline: Pipeline) -> list[BaseRoute]:
    """The dashboard's routes. Add them after every API route."""
    index_html = (static_dir() / "index.html").read_bytes()

    async def index(request: Request) -> Response:
        return Response(
            index_html,
            media_type="text/html; charset=utf-8",
            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
        )

    async def config(request: Request) -> Any:
        principal = pipeline.keyring.authenticate(bearer(request.headers))
        if principal is None:
            raise APIError(401, "authorization: missing or unknown query token")
        if "metrics" not in principal.scopes:
            raise APIError(403, "authorization: this token lacks the 'metrics' scope")
        return dashboard_config(pipeline)

    files = StaticFiles(packages=[("strata.dashboard", "static")])
    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/dashboard/config", json_endpoint(config), methods=["GET"]),
        Mount("/dashboard/static", app=_SecureStatic(files), name="dashboard-static"),
    ]
