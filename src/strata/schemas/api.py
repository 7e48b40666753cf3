"""Admin routes of the schema registry and the quarantine (core process).

    GET  /v1/schemas                                     subjects
    GET  /v1/schemas/{event_type}                        versions and mode
    POST /v1/schemas/{event_type}                        {"schema": {...}, "mode"?} -> new version
    POST /v1/schemas/{event_type}/check                  {"schema": {...}} -> compatibility problems
    GET  /v1/schemas/{event_type}/versions/{n|latest}    one version
    PUT  /v1/schemas/{event_type}/mode                   {"mode": "FULL"}
    POST /v1/quarantine/replay                           {"event_type"?} -> counts

All need a token with the ``admin`` scope. Errors: 400 (invalid schema or
body, naming the field), 404 (unknown event type or version), 409
(incompatible, with ``problems``: JSON paths and reasons).
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Route

from strata.query.api import JSON, APIError, CoreAPI, json_endpoint
from strata.schemas import quarantine
from strata.schemas.compat import check
from strata.schemas.registry import (
    IncompatibleSchema,
    SchemaError,
    SchemaRegistry,
    UnknownSchema,
    compile_schema,
)
from strata.server.pipeline import Pipeline


class SchemaAPI:
    def __init__(self, pipeline: Pipeline) -> None:
        self.core = CoreAPI(pipeline)
        self.pipeline = pipeline
        self.registry = SchemaRegistry(
            pipeline.config.data_path / "schemas",
            default_mode=pipeline.config.schemas.default_mode,
        )

    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            payload = msgspec.json.decode(await request.body())
        except msgspec.MsgspecError as exc:
            raise APIError(400, f"body: malformed JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise APIError(400, "body: expected a JSON object")
        return payload

    def _fresh(self) -> SchemaRegistry:
        self.registry.reload()
        return self.registry

    async def list(self, request: Request) -> Any:
        self.core.require(request, "admin")
        return {"subjects": self._fresh().subjects()}

    async def subject(self, request: Request) -> Any:
        self.core.require(request, "admin")
        try:
            return self._fresh().subject(request.path_params["event_type"])
        except UnknownSchema as exc:
            raise APIError(404, str(exc)) from exc

    async def version(self, request: Request) -> Any:
        self.core.require(request, "admin")
        raw = request.path_params["version"]
        if raw != "latest" and not (raw.isascii() and raw.isdigit()):
            raise APIError(400, "version: expected a number or 'latest'")
        try:
            return self._fresh().get(
                request.path_params["event_type"], None if raw == "latest" else int(raw)
            )
        except UnknownSchema as exc:
            raise APIError(404, str(exc)) from exc

    async def register(self, request: Request) -> Any:
        self.core.require(request, "admin")
        payload = await self._body(request)
        if "schema" not in payload:
            raise APIError(400, "schema: required, a JSON Schema object")
        mode = payload.get("mode")
        if mode is not None and not isinstance(mode, str):
            raise APIError(400, "mode: expected a string")
        try:
            result = await run_in_threadpool(
                self.registry.register, request.path_params["event_type"], payload["schema"],
                mode=mode.upper() if mode else None,
            )
        except SchemaError as exc:
            raise APIError(400, str(exc)) from exc
        except IncompatibleSchema as exc:
            return JSON({"error": str(exc), "mode": exc.mode, "problems": exc.problems},
                        status_code=409)
        return JSON(result, status_code=201 if result["created"] else 200)

    async def check(self, request: Request) -> Any:
        self.core.require(request, "admin")
        payload = await self._body(request)
        event_type = request.path_params["event_type"]
        registry = self._fresh()
        try:
            compile_schema(payload.get("schema"))
            latest = registry.get(event_type)
        except SchemaError as exc:
            raise APIError(400, str(exc)) from exc
        except UnknownSchema:
            return {"compatible": True, "problems": [], "mode": registry.default_mode}
        mode = payload.get("mode") or latest["mode"]
        problems = check(latest["schema"], payload["schema"], mode)
        return {"compatible": not problems, "problems": problems, "mode": mode}

    async def mode(self, request: Request) -> Any:
        self.core.require(request, "admin")
        payload = await self._body(request)
        mode = payload.get("mode")
        if not isinstance(mode, str):
            raise APIError(400, "mode: required, one of BACKWARD, FORWARD, FULL, NONE")
        try:
            return await run_in_threadpool(
                self.registry.set_mode, request.path_params["event_type"], mode.upper()
            )
        except SchemaError as exc:
            raise APIError(400, str(exc)) from exc

    async def replay(self, request: Request) -> Any:
        self.core.require(request, "admin")
        body = await request.body()
        payload = await self._body(request) if body.strip() else {}
        event_type = payload.get("event_type")
        if event_type is not None and not isinstance(event_type, str):
            raise APIError(400, "event_type: expected a string")
        return await run_in_threadpool(
            quarantine.replay, self.pipeline.config, self.pipeline.store, self.pipeline.log,
            self.registry, event_type=event_type,
        )


def schema_routes(pipeline: Pipeline) -> list[Route]:
    api = SchemaAPI(pipeline)
    prefix = "/v1/schemas/{event_type:path}"
    return [
        Route("/v1/schemas", json_endpoint(api.list), methods=["GET"]),
        Route(prefix + "/versions/{version}", json_endpoint(api.version), methods=["GET"]),
        Route(prefix + "/mode", json_endpoint(api.mode), methods=["PUT"]),
        Route(prefix + "/check", json_endpoint(api.check), methods=["POST"]),
        Route(prefix, json_endpoint(api.subject), methods=["GET"]),
        Route(prefix, json_endpoint(api.register), methods=["POST"]),
        Route("/v1/quarantine/replay", json_endpoint(api.replay), methods=["POST"]),
    ]
