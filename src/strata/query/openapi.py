"""OpenAPI 3.1 description of strata's HTTP API, served at ``/openapi.json``,
and a readable page at ``/docs`` rendered by strata itself from the same
spec (plain HTML and CSS, no script, no CDN). Both are public: they
describe the API, they do not expose data.
"""

from __future__ import annotations

import html
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from strata.query.api import JSON, CoreAPI

_COMPLETENESS = {
    "served_from": {
        "type": "string",
        "description": (
            "Where the rows came from: `rollup_5m`, `rollup_1d`, `raw`, `serving`, "
            "`day_answers` (finalized days), or several joined with `+`, e.g. "
            "`rollup_5m+serving`, `day_answers+rollup_1d`."
        ),
    },
    "complete_until": {
        "type": ["string", "null"],
        "format": "date-time",
        "description": "The watermark: data before it is final.",
    },
    "open_windows": {"type": "boolean", "description": "The range reaches past the watermark."},
    "revised": {"type": "boolean", "description": "Late data revised part of the range."},
    "cache": {"type": "string", "enum": ["hit", "miss"]},
}


def _param(
    name: str, description: str, schema: dict[str, Any] | None = None, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema or {"type": "string"},
    }


_RANGE = [
    _param("from", "Start, ISO-8601 or epoch ms (default: a span before `to`)."),
    _param("to", "End, exclusive, ISO-8601 or epoch ms (default: now)."),
]
_FILTERS = [
    _param(
        "filter.<column>",
        "Equality filter on an event column, e.g. `filter.country=DE`; "
        "`event_type`, `country`, `platform`, `currency` also work without the prefix.",
    ),
]
_GRANULARITY = _param(
    "granularity", "Bucket size.", {"type": "string", "enum": ["5m", "15m", "1h", "1d"]}
)
_GROUP_BY = _param("group_by", "Comma-separated dimensions.")


def _metrics_response(description: str) -> dict[str, Any]:
    return {
        "200": {
            "description": description,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "metric": {"type": "string"},
                            "from": {"type": "string"},
                            "to": {"type": "string"},
                            "rows": {"type": "array"},
                            **_COMPLETENESS,
                        },
                    }
                }
            },
        },
        **_ERRORS,
    }


_ERRORS = {
    "400": {"description": "Bad request; `error` names the field and the reason."},
    "401": {"description": "Missing or unknown token."},
    "403": {"description": "The token lacks the scope."},
    "429": {"description": "Rate limited; see the `Retry-After` header (seconds)."},
}


def build_spec() -> dict[str, Any]:
    """The OpenAPI document (a plain dict)."""
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    paths: dict[str, Any] = {
        "/v1/sql": {
            "post": {
                "summary": "Run a read-only SQL query (ClickHouse dialect)",
                "description": (
                    "Sandboxed (one SELECT over strata tables, no table functions, no SETTINGS). "
                    "The router answers from a rollup when it can (`served_from`). "
                    "`explain: true` returns the routing decision and the rewritten SQL without "
                    "running it. Answers in JSON (default), CSV (`Accept: text/csv`) or Arrow IPC "
                    "(`Accept: application/vnd.apache.arrow.stream`); the non-JSON formats carry "
                    "the completeness facts in `X-Strata-*` headers."
                ),
                "security": secured,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["sql"],
                                "properties": {
                                    "sql": {"type": "string"},
                                    "explain": {"type": "boolean"},
                                },
                            },
                            "example": {
                                "sql": "SELECT toStartOfHour(ts) AS hour, count() FROM events "
                                "WHERE ts >= '2026-01-01 00:00:00' GROUP BY hour"
                            },
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "Columns and rows",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "columns": {"type": "array", "items": {"type": "string"}},
                                        "rows": {"type": "array", "items": {"type": "array"}},
                                        "reason": {"type": "string"},
                                        "rollup_tier": {
                                            "type": ["string", "null"],
                                            "description": (
                                                "`memory` when a rollup route was answered "
                                                "from finalized rollup rows held in memory "
                                                "(decision 102), else null."
                                            ),
                                        },
                                        **_COMPLETENESS,
                                    },
                                }
                            },
                            "text/csv": {},
                            "application/vnd.apache.arrow.stream": {},
                        },
                    },
                    "406": {"description": "No acceptable format in `Accept`."},
                    **_ERRORS,
                },
            }
        },
        "/v1/metrics/count": {
            "get": {
                "summary": "Event counts per bucket",
                "security": secured,
                "parameters": [*_RANGE, _GRANULARITY, _GROUP_BY, *_FILTERS],
                "responses": _metrics_response("Counts per bucket"),
            }
        },
        "/v1/metrics/events": {
            "get": {
                "summary": "Events and users per event type per bucket",
                "description": (
                    "From the `events_by_type` rollup (`served_from` rollup_5m or rollup_1d). "
                    "Parameters other than from, to, granularity and event_type are a 400 "
                    "(filters and group_by: `/v1/metrics/count`)."
                ),
                "security": secured,
                "parameters": [*_RANGE, _GRANULARITY, _param("event_type", "Only this type.")],
                "responses": _metrics_response("Counts per bucket and event type"),
            }
        },
        "/v1/metrics/{name}": {
            "get": {
                "summary": "Any configured metric (`[[metrics]]`): rollups plus live windows",
                "description": (
                    "Finished buckets from the metric's rollup (5m or 1d), the newest ones "
                    "from the serving store when it holds every window of the bucket. "
                    "Filters apply to both sources. An unknown or repeated parameter, or "
                    "a filter or `group_by` on a column that is not a dimension of the "
                    "metric, is a 400 naming the parameter. The names of the other "
                    "`/v1/metrics/...` routes are reserved."
                ),
                "security": secured,
                "parameters": [
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "description": "A configured metric, e.g. `page_views_by_country`.",
                        "schema": {"type": "string"},
                    },
                    *_RANGE,
                    _param(
                        "granularity",
                        "Bucket size (default 1h).",
                        {"type": "string", "enum": ["5m", "1h", "1d"]},
                    ),
                    _param("group_by", "Comma-separated dimensions of the metric."),
                    _param(
                        "filter.<dimension>",
                        "Exact match on a dimension of the metric, e.g. `filter.country=DE`; "
                        "`event_type`, `country`, `platform`, `currency` also work without "
                        "the prefix (when they are dimensions of the metric).",
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "One row per bucket (and group): `time`, the group_by "
                        "dimensions and the metric's aggregations",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "metric": {"type": "string"},
                                        "granularity": {"type": "string"},
                                        "from": {"type": "string"},
                                        "to": {"type": "string"},
                                        "filters": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                        },
                                        "rows": {"type": "array", "items": {"type": "object"}},
                                        **_COMPLETENESS,
                                        "open_windows": {
                                            "type": "boolean",
                                            "description": (
                                                "The range reaches past `complete_until`, or "
                                                "holds a window the serving store has not "
                                                "finalized."
                                            ),
                                        },
                                        "open_window_ranges": {
                                            "type": "array",
                                            "description": (
                                                "Open windows the serving store holds in the "
                                                "range: `{window_start, window_end}`."
                                            ),
                                        },
                                        "revised_ranges": {
                                            "type": "array",
                                            "description": (
                                                "Windows revised by late events that the "
                                                "serving store still holds (`revised` also "
                                                "covers evicted ones)."
                                            ),
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "404": {"description": "Unknown or reserved metric name"},
                    **_ERRORS,
                },
            }
        },
        "/v1/metrics/active-users": {
            "get": {
                "summary": "Active users per day (DAU, rolling WAU/MAU)",
                "security": secured,
                "parameters": [
                    *_RANGE,
                    _param(
                        "window",
                        "Rolling window ending on each day.",
                        {"type": "string", "enum": ["1d", "7d", "30d"]},
                    ),
                    _param(
                        "exact",
                        "uniqExact on the raw events instead of mergeable uniqCombined states.",
                        {"type": "boolean"},
                    ),
                    *_FILTERS,
                ],
                "responses": _metrics_response("One row per day"),
            }
        },
        "/v1/metrics/revenue": {
            "get": {
                "summary": "Revenue, orders and buyers per bucket",
                "security": secured,
                "parameters": [*_RANGE, _GRANULARITY, _GROUP_BY, *_FILTERS],
                "responses": _metrics_response("One row per bucket (and group)"),
            }
        },
        "/v1/metrics/top": {
            "get": {
                "summary": "Top-N values of a dimension",
                "security": secured,
                "parameters": [
                    *_RANGE,
                    _param("dimension", "An event column.", required=True),
                    _param(
                        "measure",
                        "Ranking measure.",
                        {"type": "string", "enum": ["events", "users", "revenue"]},
                    ),
                    _param("n", "How many (1-1000).", {"type": "integer"}),
                    *_FILTERS,
                ],
                "responses": _metrics_response("Values, best first"),
            }
        },
        "/v1/metrics/funnel": {
            "post": {
                "summary": "Ordered funnel with a conversion window, breakdown, time to convert",
                "security": secured,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["steps"],
                                "properties": {
                                    "steps": {
                                        "type": "array",
                                        "minItems": 2,
                                        "items": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                            "description": "Equality conditions on event columns.",
                                        },
                                    },
                                    "window": {"type": "string", "description": "e.g. `30m`, `1d`"},
                                    "from": {"type": "string"},
                                    "to": {"type": "string"},
                                    "breakdown": {"type": "string"},
                                },
                            },
                            "example": {
                                "steps": [
                                    {"event_type": "page_view"},
                                    {"event_type": "signup"},
                                    {"event_type": "purchase"},
                                ],
                                "window": "1d",
                                "breakdown": "country",
                            },
                        }
                    },
                },
                "responses": _metrics_response("Users per step, per breakdown value"),
            }
        },
        "/v1/metrics/retention": {
            "get": {
                "summary": "Retention cohorts by first-event day",
                "security": secured,
                "parameters": [
                    *_RANGE,
                    _param("days", "Day N up to which to count returns.", {"type": "integer"}),
                    _param("start_event", "Cohort by first event of this type."),
                    _param("return_event", "Count returns of this type only."),
                ],
                "responses": _metrics_response("One row per cohort day"),
            }
        },
        "/v1/admin/tokens": {
            "post": {
                "summary": "Create a query token for a user",
                "security": secured,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["user"],
                                "properties": {
                                    "user": {"type": "string"},
                                    "scopes": {
                                        "type": "array",
                                        "items": {
                                            "type": "string",
                                            "enum": ["metrics", "sql", "admin"],
                                        },
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {"201": {"description": "The token (shown once)"}, **_ERRORS},
            },
            "get": {
                "summary": "List query tokens (never the secrets)",
                "security": secured,
                "responses": {"200": {"description": "Users and scopes"}, **_ERRORS},
            },
        },
        "/v1/admin/tokens/{user}": {
            "delete": {
                "summary": "Revoke every token of a user",
                "security": secured,
                "parameters": [
                    {"name": "user", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "How many were revoked"},
                    "404": {"description": "No tokens for that user"},
                    **_ERRORS,
                },
            }
        },
        "/v1/batch": {
            "post": {
                "summary": "Ingest a batch of events (write key)",
                "security": secured,
                "description": 'Segment-shaped body `{"batch": [...], "sent_at": ...}`, '
                "gzip allowed. 2xx only after the batch is durable in the log.",
                "responses": {"200": {"description": "Per-event results"}, **_ERRORS},
            }
        },
        "/v1/track": {
            "post": {
                "summary": "Ingest one event (write key)",
                "security": secured,
                "responses": {"200": {"description": "Accepted"}, **_ERRORS},
            }
        },
        "/v1/status": {
            "get": {
                "summary": "Offsets, lag, watermark",
                "security": secured,
                "responses": {"200": {"description": "Status"}},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {
                    "200": {"description": "Healthy"},
                    "503": {"description": "Unhealthy"},
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness",
                "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Text exposition format"}},
            }
        },
    }
    for alias, window in (("dau", "1d"), ("wau", "7d"), ("mau", "30d")):
        paths[f"/v1/metrics/{alias}"] = {
            "get": {
                "summary": f"{alias.upper()}: active users per day, {window} rolling window",
                "security": secured,
                "parameters": [
                    *_RANGE,
                    _param("exact", "Exact distinct count on raw events.", {"type": "boolean"}),
                    *_FILTERS,
                ],
                "responses": _metrics_response("One row per day"),
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "strata",
            "version": "0.1.0",
            "description": "Self-hostable event analytics: ingest, metrics API, SQL.",
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": dict(sorted(paths.items())),
    }


_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{font-size:1.15rem;margin-top:2rem;border-top:1px solid #ddd;padding-top:1rem}
code,pre{font-family:ui-monospace,monospace;background:#f4f4f4;padding:.1rem .3rem;border-radius:3px}
pre{padding:.6rem;overflow-x:auto}.method{display:inline-block;min-width:4rem;font-weight:700}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .5rem;
text-align:left;vertical-align:top}nav a{margin-right:.8rem}
"""


def render_docs(spec: dict[str, Any]) -> str:
    """The spec as one readable HTML page."""
    esc = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{esc(spec['info']['title'])} API</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(spec['info']['title'])} HTTP API</h1>",
        f"<p>{esc(spec['info']['description'])} Machine-readable: "
        "<a href='/openapi.json'>/openapi.json</a>. Authenticate with "
        "<code>Authorization: Bearer &lt;token&gt;</code>.</p><nav>",
    ]
    for path in spec["paths"]:
        parts.append(f"<a href='#{esc(path)}'>{esc(path)}</a>")
    parts.append("</nav>")
    for path, operations in spec["paths"].items():
        parts.append(f"<h2 id='{esc(path)}'>{esc(path)}</h2>")
        for method, op in operations.items():
            parts.append(
                f"<p><span class=method>{method.upper()}</span> {esc(op.get('summary', ''))}</p>"
            )
            if op.get("description"):
                parts.append(f"<p>{esc(op['description'])}</p>")
            params = op.get("parameters", [])
            if params:
                parts.append("<table><tr><th>parameter</th><th>in</th><th>description</th></tr>")
                for p in params:
                    parts.append(
                        f"<tr><td><code>{esc(p['name'])}</code></td><td>{esc(p['in'])}</td>"
                        f"<td>{esc(p.get('description', ''))}</td></tr>"
                    )
                parts.append("</table>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if body.get("example"):
                import json

                parts.append(f"<pre>{esc(json.dumps(body['example'], indent=2))}</pre>")
            responses = ", ".join(
                f"<code>{esc(code)}</code> {esc(r.get('description', ''))}"
                for code, r in op.get("responses", {}).items()
            )
            parts.append(f"<p>Responses: {responses}</p>")
    parts.append("</body></html>")
    return "".join(parts)


def openapi_routes(api: CoreAPI) -> list[Route]:
    spec = build_spec()
    page = render_docs(spec)

    async def openapi_json(request: Request) -> JSON:
        return JSON(spec)

    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
