"""Admin routes for the lake's operations, served by the core process.

chDB allows one process per data directory, so while ``strata serve`` runs,
the CLI commands ``batch``, ``replay``, ``retention apply`` and
``delete-user`` send their work here instead of opening the store. Every
route needs a token with the ``admin`` scope; bad input is a 400 naming the
field. Bodies and answers are JSON:

* ``POST /v1/admin/delete-user``  ``{"user_id": "..."}``
* ``POST /v1/admin/batch``        ``{"date": "YYYY-MM-DD"}`` or ``{"backfill": "metric"}``
* ``POST /v1/admin/replay``       ``{"from": T1, "to": T2, "source": "auto|log|lake", "metric": "m"}``
* ``POST /v1/admin/retention``    ``{"now": T}`` (optional)
"""

from __future__ import annotations

from datetime import date
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Route

from strata.lake.batch import BatchError
from strata.query.api import APIError, CoreAPI, json_endpoint, parse_time


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise APIError(400, "body: expected a JSON object") from exc
    if not isinstance(body, dict):
        raise APIError(400, "body: expected a JSON object")
    return body


def _string(body: dict[str, Any], field: str, required: bool = True) -> str | None:
    value = body.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise APIError(400, f"{field}: required, a non-empty string of at most 256 characters")
    return value


def lake_routes(pipeline: Any) -> list[Route]:
    api = CoreAPI(pipeline)

    def scheduler() -> Any:
        component = pipeline.components.get("lake_scheduler")
        if component is None:
            raise APIError(503, "lake: not running in this process")
        return component

    async def delete_user(request: Request) -> Any:
        api.require(request, "admin")
        user_id = _string(await _body(request), "user_id") or ""
        from strata.lake.gdpr import delete_user as run

        job = scheduler().job
        report = await run_in_threadpool(
            run,
            user_id,
            store=pipeline.store,
            lake=job.lake,
            batch=job,
            deleted_users=job.deleted_users,
            serving=pipeline.components.get("serving"),
        )
        return report.as_dict()

    async def batch(request: Request) -> Any:
        api.require(request, "admin")
        body = await _body(request)
        job = scheduler().job
        try:
            if body.get("backfill") is not None:
                metric = _string(body, "backfill")
                rows = await run_in_threadpool(job.backfill, metric)
            else:
                text = _string(body, "date")
                try:
                    day = date.fromisoformat(text or "")
                except ValueError as exc:
                    raise APIError(400, "date: expected YYYY-MM-DD") from exc
                rows = await run_in_threadpool(job.recompute_day, day)
        except BatchError as exc:
            raise APIError(400, str(exc)) from exc
        return {"report": [r.as_dict() for r in rows]}

    async def replay(request: Request) -> Any:
        api.require(request, "admin")
        body = await _body(request)
        start = parse_time(str(body.get("from", "")), "from")
        end = parse_time(str(body.get("to", "")), "to")
        if start is None or end is None:
            raise APIError(400, "from, to: both required (ISO-8601 or epoch ms)")
        source = body.get("source") or "auto"
        metric = _string(body, "metric", required=False)
        from strata.lake.replay import replay as run

        try:
            used, rows = await run_in_threadpool(
                lambda: run(
                    scheduler().job, start, end, source=source, metrics=[metric] if metric else None
                )
            )
        except BatchError as exc:
            raise APIError(400, str(exc)) from exc
        return {"source": used, "report": [r.as_dict() for r in rows]}

    async def retention(request: Request) -> Any:
        api.require(request, "admin")
        body = await _body(request)
        now = parse_time(str(body["now"]), "now") if body.get("now") is not None else None
        from strata.lake import retention as policy

        component = scheduler()
        report = await run_in_threadpool(
            lambda: policy.apply(
                pipeline.config, store=pipeline.store, lake=component.lake, log_=pipeline.log, now=now
            )
        )
        return report.as_dict()

    return [
        Route("/v1/admin/delete-user", json_endpoint(delete_user), methods=["POST"]),
        Route("/v1/admin/batch", json_endpoint(batch), methods=["POST"]),
        Route("/v1/admin/replay", json_endpoint(replay), methods=["POST"]),
        Route("/v1/admin/retention", json_endpoint(retention), methods=["POST"]),
    ]
