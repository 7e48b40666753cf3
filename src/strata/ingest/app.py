"""The ingest HTTP API: ``POST /v1/batch`` and ``POST /v1/track``.

It authenticates the write key, bounds the body (before and after gzip),
validates each event on its own, and answers 2xx only after the accepted
events are durable in the log (group commit, docs/semantics.md). A malformed
request as a whole gets a 4xx ``{"error": ...}`` and appends nothing. A full
or failing log gets 503 with ``Retry-After``: the client retries with the
same event_ids and nothing is stored twice.
"""

from __future__ import annotations

import logging
import time
import zlib
from datetime import datetime
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from strata.auth import Keyring, bearer
from strata.config import Config, parse_duration_ms
from strata.events import BatchIn, Normalizer, now_ms, to_epoch_ms
from strata.ingest.committer import GroupCommitter
from strata.log.base import LogError, LogFull
from strata.telemetry import REGISTRY

log = logging.getLogger("strata.ingest")

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding",
    "Access-Control-Max-Age": "86400",
}


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


_batch_decoder = msgspec.json.Decoder(BatchIn)
_object_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])


class IngestService:
    def __init__(self, config: Config, committer: GroupCommitter, keyring: Keyring) -> None:
        self.config = config
        self.committer = committer
        self.keyring = keyring
        self.max_body = config.ingest.max_body_bytes
        self.max_events = config.ingest.max_batch_events
        self.normalizer = Normalizer(
            partitions=config.log.partitions,
            max_future_skew_ms=parse_duration_ms(config.ingest.max_future_skew),
            max_event_age_ms=parse_duration_ms(config.ingest.max_event_age),
            max_event_bytes=config.ingest.max_event_bytes,
            hot_keys=config.ingest.hot_user_ids,
            salt_buckets=config.ingest.hot_key_salt_buckets,
        )

    # -- request plumbing -------------------------------------------------------
    def authorize(self, request: Request) -> None:
        key = bearer(request.headers)
        principal = self.keyring.authenticate(key)
        if principal is None:
            raise RequestError(401, "authorization: missing or unknown write key")
        if principal.kind != "write":
            raise RequestError(403, "authorization: this key may not ingest (use a write key)")

    async def read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body:
                    raise RequestError(413, f"body: larger than {self.max_body} bytes")
            except ValueError as exc:
                raise RequestError(400, "content-length: not a number") from exc
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise RequestError(413, f"body: larger than {self.max_body} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            decompressor = zlib.decompressobj(wbits=31)
            try:
                body = decompressor.decompress(body, self.max_body + 1)
            except zlib.error as exc:
                raise RequestError(400, f"body: invalid gzip data: {exc}") from exc
            if len(body) > self.max_body or decompressor.unconsumed_tail:
                raise RequestError(413, f"body: larger than {self.max_body} bytes after gzip")
            if not decompressor.eof:
                raise RequestError(400, "body: truncated gzip data")
        elif encoding not in ("", "identity"):
            raise RequestError(415, f"content-encoding: unsupported {encoding!r} (use gzip)")
        if not body:
            raise RequestError(400, "body: empty")
        return body

    async def commit(self, raw_events: list[Any], sent_at: Any) -> dict[str, Any]:
        started = time.perf_counter()
        received = now_ms()
        sent_at_ms = None if sent_at is None else to_epoch_ms(sent_at)
        accepted, rejected = self.normalizer.normalize(
            raw_events, sent_at_ms=sent_at_ms, received_at_ms=received
        )
        try:
            await self.committer.append([(partition, value) for partition, value, _ in accepted])
        except LogFull as exc:
            raise RequestError(503, f"log: full ({exc}); retry later", {"Retry-After": "5"}) from exc
        except LogError as exc:
            raise RequestError(503, f"log: append failed ({exc}); retry later", {"Retry-After": "1"}) from exc
        REGISTRY.inc("strata_ingest_events_total", len(accepted))
        if rejected:
            REGISTRY.inc("strata_ingest_rejected_total", len(rejected))
        REGISTRY.observe("strata_ingest_append_seconds", time.perf_counter() - started)
        return {
            "accepted": len(accepted),
            "rejected": [{"index": r.index, "error": r.error} for r in rejected],
        }

    # -- endpoints ----------------------------------------------------------------
    async def batch(self, request: Request) -> dict[str, Any]:
        self.authorize(request)
        body = await self.read_body(request)
        try:
            parsed = _batch_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise RequestError(400, f"body: {_describe(exc)}") from exc
        except msgspec.DecodeError as exc:
            raise RequestError(400, f"body: malformed JSON: {exc}") from exc
        if len(parsed.batch) > self.max_events:
            raise RequestError(413, f"batch: more than {self.max_events} events")
        if not parsed.batch:
            raise RequestError(400, "batch: empty")
        return await self.commit(parsed.batch, parsed.sent_at)

    async def track(self, request: Request) -> dict[str, Any]:
        self.authorize(request)
        body = await self.read_body(request)
        try:
            fields = _object_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise RequestError(400, f"body: {_describe(exc)}") from exc
        except msgspec.DecodeError as exc:
            raise RequestError(400, f"body: malformed JSON: {exc}") from exc
        result = await self.commit([body], _parse_sent_at(fields.get("sent_at")))
        if result["rejected"]:
            raise RequestError(400, result["rejected"][0]["error"])
        return result


def _parse_sent_at(raw: msgspec.Raw | None) -> Any:
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=datetime | int | None)
    except msgspec.MsgspecError as exc:
        raise RequestError(400, f"sent_at: {exc}") from exc


def _describe(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return text
    return f"{where.rstrip('`')}: {message}"


def endpoint(
    handler: Callable[[Request], Awaitable[dict[str, Any]]],
) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=CORS_HEADERS)
        try:
            result = await handler(request)
            status, payload, headers = 200, result, {}
        except RequestError as exc:
            status, payload, headers = exc.status, {"error": exc.message}, exc.headers
        except Exception:  # a bug must not leak a traceback to the client
            log.exception("ingest request failed")
            status, payload, headers = 500, {"error": "internal error"}, {}
        REGISTRY.inc("strata_ingest_requests_total", labels={"status": str(status)})
        return JSONResponse(payload, status_code=status, headers={**CORS_HEADERS, **headers})

    return run


def ingest_routes(service: IngestService) -> list[Route]:
    return [
        Route("/v1/batch", endpoint(service.batch), methods=["POST", "OPTIONS"]),
        Route("/v1/track", endpoint(service.track), methods=["POST", "OPTIONS"]),
    ]
