"""The ingest HTTP API: ``POST /v1/batch`` and ``POST /v1/track``.

It authenticates the write key, bounds the body (before and after gzip),
validates each event on its own, and answers 2xx only after the accepted
events are durable in the log (group commit, docs/semantics.md). A malformed
request as a whole gets a 4xx ``{"error": ...}`` and appends nothing. A full
or failing log gets 503 with ``Retry-After``: the client retries with the
same event_ids and nothing is stored twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from strata.auth import Keyring, bearer
from strata.config import Config, parse_duration_ms
from strata.events import (
    BatchIn,
    Normalizer,
    invalid_utf8_message,
    now_ms,
    partition_for,
    to_epoch_ms,
    utf8_error,
)
from strata.ingest import segment
from strata.ingest.committer import GroupCommitter
from strata.log.base import Log, LogError, LogFull
from strata.schemas import SchemaRegistry, UnknownSchema
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


class _BatchProbe(msgspec.Struct):
    """``/v1/batch`` in either format: native (``batch`` of events with
    ``event_type``, ``sent_at``) or Segment's (``batch`` of messages with
    ``type``, ``sentAt``, ``writeKey``, batch-level ``context``)."""

    batch: list[msgspec.Raw]
    sent_at: datetime | int | None = None
    sentAt: datetime | int | None = None
    write_key: str | None = None
    writeKey: str | None = None
    context: dict[str, Any] | None = None


class _Kind(msgspec.Struct):
    type: Any = None
    event: Any = None
    event_type: Any = None


class _Pin(msgspec.Struct):
    schema_version: int | None = None


_probe_decoder = msgspec.json.Decoder(_BatchProbe)
_kind_decoder = msgspec.json.Decoder(_Kind)
_pin_decoder = msgspec.json.Decoder(_Pin)
_message_decoder = msgspec.json.Decoder(dict[str, Any])
_side_encoder = msgspec.json.Encoder()


class IngestService:
    def __init__(
        self,
        config: Config,
        committer: GroupCommitter,
        keyring: Keyring,
        *,
        log: Log | None = None,
        registry: SchemaRegistry | None = None,
    ) -> None:
        self.config = config
        self.committer = committer
        self.keyring = keyring
        # Schema registry (strata.schemas): re-read when its VERSION file
        # changes, checked at most every 0.5 s on the request path.
        self.registry = registry or SchemaRegistry(
            config.data_path / "schemas", default_mode=config.schemas.default_mode
        )
        self.policy = config.schemas.policy
        # Committers for the side topics (quarantine, identities), opened on
        # first use; ``log`` is the worker's log if it passes one.
        self._log = log
        self._side: dict[str, GroupCommitter] = {}
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
    def authorize(self, request: Request, body_key: str | None = None) -> None:
        """Authenticate the write key: ``Authorization`` (Bearer, or HTTP
        Basic user name as Segment sends it), else ``body_key`` (the
        ``write_key``/``writeKey`` body field, for browsers' sendBeacon)."""
        key = bearer(request.headers) or body_key
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

    def side_committer(self, topic: str) -> GroupCommitter:
        committer = self._side.get(topic)
        if committer is None:
            if self._log is None:
                from strata.log import open_log

                self._log = open_log(self.config, create_topics=False)
            committer = self._side[topic] = GroupCommitter(self._log, topic=topic)
        return committer

    def check_schemas(
        self,
        raw_events: list[Any],
        accepted: list[tuple[int, bytes, Any]],
        rejected: list[Any],
        indexes: list[int],
    ) -> tuple[list[tuple[int, bytes, Any]], list[tuple[int, bytes]], list[tuple[int, str]]]:
        """Validate normalized events against the registry. Returns the
        events to append to ``events``, the ``(partition, record)`` pairs
        for ``quarantine`` and ``(index, reason)`` rejections. ``indexes``
        maps positions in ``raw_events`` to the request's event indexes."""
        registry = self.registry
        registry.maybe_reload()
        if not registry.in_use:
            return accepted, [], []
        seen_rejected = {r.index for r in rejected}
        positions = [i for i in range(len(raw_events)) if i not in seen_rejected]
        keep: list[tuple[int, bytes, Any]] = []
        quarantine: list[tuple[int, bytes]] = []
        refused: list[tuple[int, str]] = []
        latest = registry.latest_validators()
        decode = msgspec.json.decode
        for position, item in zip(positions, accepted, strict=True):
            record = item[2]
            validator = latest.get(record.event_type)
            raw = raw_events[position]
            if b'"schema_version"' in (raw if isinstance(raw, bytes) else bytes(raw)):
                try:
                    version = _pin_decoder.decode(raw).schema_version
                    if version is not None:
                        validator = registry.validator(record.event_type, version)
                except (msgspec.MsgspecError, UnknownSchema) as exc:
                    refused.append((indexes[position], f"schema_version: {exc}".replace(
                        "schema_version: schema_version: ", "schema_version: ")))
                    continue
            if validator is not None:
                properties = record.properties
                problem = validator({} if properties == "{}" else decode(properties))
                if problem is None:
                    keep.append(item)
                else:
                    refused.append((indexes[position], problem))
                continue
            if self.policy == "accept":
                keep.append(item)
            elif self.policy == "reject":
                refused.append(
                    (indexes[position],
                     f"event_type: no schema registered for {record.event_type!r} "
                     "(schemas.policy = reject)")
                )
            else:
                quarantine.append(
                    (item[0], _side_encoder.encode({
                        "event_id": record.event_id,
                        "event_type": record.event_type,
                        "distinct_id": record.distinct_id,
                        "ts": record.ts,
                        "received_at": record.received_at,
                        "reason": f"event_type: no schema registered for {record.event_type!r}",
                        "event": item[1].decode(),
                    }))
                )
        return keep, quarantine, refused

    async def commit(
        self,
        raw_events: list[Any],
        sent_at: Any,
        *,
        received: int | None = None,
        indexes: list[int] | None = None,
        rejected_before: list[tuple[int, str]] | None = None,
        identities: list[tuple[int, bytes]] | None = None,
    ) -> dict[str, Any]:
        """Normalize, validate and append; returns once everything accepted
        is durable. ``indexes`` maps positions in ``raw_events`` to request
        indexes (Segment batches mix events, identify calls and unmappable
        messages); ``identities`` are ``(partition, record)`` pairs for the
        ``identities`` topic."""
        started = time.perf_counter()
        received = now_ms() if received is None else received
        sent_at_ms = None if sent_at is None else to_epoch_ms(sent_at)
        indexes = list(range(len(raw_events))) if indexes is None else indexes
        batch = self.normalizer.normalize_batch(
            raw_events, sent_at_ms=sent_at_ms, received_at_ms=received
        )
        rejected = batch.rejected
        self.registry.maybe_reload()
        quarantined: list[tuple[int, bytes]] = []
        refused: list[tuple[int, str]] = []
        if self.registry.in_use:
            accepted: list[tuple[int, bytes, Any]] = list(
                zip(batch.partitions, batch.values, batch.events, strict=True)
            )
            accepted, quarantined, refused = self.check_schemas(
                raw_events, accepted, rejected, indexes
            )
            partitions = [partition for partition, _, _ in accepted]
            values = [value for _, value, _ in accepted]
        else:  # no schemas: the normalizer's columns go to the log as they are
            partitions, values = batch.partitions, batch.values
        all_rejected = sorted(
            [(indexes[r.index], r.error) for r in rejected] + refused + (rejected_before or [])
        )
        appends = [self.committer.append_values(partitions, values)]
        if quarantined:
            appends.append(self.side_committer("quarantine").append(quarantined))
        if identities:
            appends.append(self.side_committer("identities").append(identities))
        try:
            await asyncio.gather(*appends)
        except LogFull as exc:
            raise RequestError(503, f"log: full ({exc}); retry later", {"Retry-After": "5"}) from exc
        except LogError as exc:
            raise RequestError(503, f"log: append failed ({exc}); retry later", {"Retry-After": "1"}) from exc
        REGISTRY.inc("strata_ingest_events_total", len(values))
        if all_rejected:
            REGISTRY.inc("strata_ingest_rejected_total", len(all_rejected))
        if quarantined:
            REGISTRY.inc("strata_ingest_quarantined_total", len(quarantined))
        REGISTRY.observe("strata_ingest_append_seconds", time.perf_counter() - started)
        result: dict[str, Any] = {
            "accepted": len(values),
            "rejected": [{"index": index, "error": error} for index, error in all_rejected],
        }
        if quarantined:
            result["quarantined"] = len(quarantined)
        if identities:
            result["identified"] = len(identities)
        return result

    async def commit_segment(
        self,
        messages: list[Any],
        *,
        kind: str | None = None,
        sent_at: Any = None,
        context: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Map Segment messages (strata.ingest.segment) and commit them."""
        received = now_ms()
        sent_at_ms = None if sent_at is None else to_epoch_ms(sent_at)
        events: list[bytes] = []
        indexes: list[int] = []
        identities: list[tuple[int, bytes]] = []
        refused: list[tuple[int, str]] = []
        for index, message in enumerate(messages):
            raw = message
            try:
                if isinstance(message, msgspec.Raw):
                    message = _message_decoder.decode(message)
                what, mapped = segment.map_message(
                    message, kind=kind, batch_sent_at_ms=sent_at_ms,
                    batch_context=context, received_at_ms=received,
                )
            except (segment.MappingError, msgspec.MsgspecError) as exc:
                bad = utf8_error(raw) if isinstance(exc, msgspec.DecodeError) else None
                refused.append((index, invalid_utf8_message(bad) if bad else str(exc)))
                continue
            except UnicodeDecodeError as exc:
                refused.append((index, invalid_utf8_message(exc)))
                continue
            if what == "identify":
                record = msgspec.json.decode(mapped)
                partition = partition_for(
                    record["distinct_id"], record["event_id"], self.normalizer.partitions,
                    self.normalizer.hot_keys, self.normalizer.salt_buckets,
                )
                identities.append((partition, mapped))
            else:
                events.append(mapped)
                indexes.append(index)
        return await self.commit(
            events, None, received=received, indexes=indexes,
            rejected_before=refused, identities=identities,
        )

    # -- endpoints ----------------------------------------------------------------
    async def batch(self, request: Request) -> dict[str, Any]:
        header_auth = bool(request.headers.get("authorization"))
        if header_auth:
            self.authorize(request)
        body = await self.read_body(request)
        try:
            parsed = _probe_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise RequestError(400, f"body: {_describe(exc)}") from exc
        except msgspec.DecodeError as exc:
            bad = utf8_error(body)
            detail = _not_utf8(bad) if bad else str(exc)
            raise RequestError(400, f"body: malformed JSON: {detail}") from exc
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"body: malformed JSON: {_not_utf8(exc)}") from exc
        if len(parsed.batch) > self.max_events:
            raise RequestError(413, f"batch: more than {self.max_events} events")
        if not header_auth:
            self.authorize(request, parsed.write_key or parsed.writeKey)
        if not parsed.batch:
            raise RequestError(400, "batch: empty")
        if parsed.sentAt is not None or parsed.writeKey is not None or _is_segment(parsed.batch[0]):
            return await self.commit_segment(
                parsed.batch, sent_at=parsed.sentAt if parsed.sentAt is not None else parsed.sent_at,
                context=parsed.context,
            )
        return await self.commit(parsed.batch, parsed.sent_at)

    async def track(self, request: Request) -> dict[str, Any]:
        return await self.single(request, None)

    async def single(self, request: Request, kind: str | None) -> dict[str, Any]:
        """One event: native (``/v1/track`` with ``event_type``) or one
        Segment message (``/v1/track``, ``/v1/page``, ``/v1/screen``,
        ``/v1/identify``). A rejected event is a 400 naming the field."""
        header_auth = bool(request.headers.get("authorization"))
        if header_auth:
            self.authorize(request)
        body = await self.read_body(request)
        try:
            fields = _object_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise RequestError(400, f"body: {_describe(exc)}") from exc
        except msgspec.DecodeError as exc:
            bad = utf8_error(body)
            detail = _not_utf8(bad) if bad else str(exc)
            raise RequestError(400, f"body: malformed JSON: {detail}") from exc
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"body: malformed JSON: {_not_utf8(exc)}") from exc
        if not header_auth:
            self.authorize(request, _body_key(fields))
        if kind is not None or ("event_type" not in fields and ("type" in fields or "event" in fields)):
            result = await self.commit_segment([msgspec.Raw(body)], kind=kind)
        else:
            result = await self.commit([body], _parse_sent_at(fields.get("sent_at")))
        if result["rejected"]:
            raise RequestError(400, result["rejected"][0]["error"])
        return result

    async def sdk_js(self, request: Request) -> Response:
        return Response(
            SDK_JS,
            media_type="application/javascript; charset=utf-8",
            headers={"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"},
        )


SDK_JS = resources.files("strata.sdk").joinpath("sdk.js").read_bytes()


def _is_segment(first: msgspec.Raw) -> bool:
    try:
        kind = _kind_decoder.decode(first)
    except (msgspec.MsgspecError, UnicodeDecodeError):
        return False
    return kind.event_type is None and (kind.type is not None or kind.event is not None)


def _body_key(fields: dict[str, msgspec.Raw]) -> str | None:
    for name in ("write_key", "writeKey"):
        if name in fields:
            try:
                value = msgspec.json.decode(fields[name])
            except (msgspec.MsgspecError, UnicodeDecodeError):
                return None
            return value if isinstance(value, str) else None
    return None


def _parse_sent_at(raw: msgspec.Raw | None) -> Any:
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=datetime | int | None)
    except msgspec.MsgspecError as exc:
        raise RequestError(400, f"sent_at: {exc}") from exc


def _not_utf8(exc: UnicodeDecodeError) -> str:
    # msgspec raises UnicodeDecodeError (not DecodeError) for invalid UTF-8
    # in a string it decodes; its offsets are relative to that string.
    return f"not valid UTF-8 ({exc.reason})"


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
    def segment_route(kind: str) -> Callable[[Request], Awaitable[dict[str, Any]]]:
        async def handle(request: Request) -> dict[str, Any]:
            return await service.single(request, kind)

        return handle

    return [
        Route("/v1/batch", endpoint(service.batch), methods=["POST", "OPTIONS"]),
        Route("/v1/track", endpoint(service.track), methods=["POST", "OPTIONS"]),
        # Segment HTTP Tracking API (strata.ingest.segment).
        Route("/v1/page", endpoint(segment_route("page")), methods=["POST", "OPTIONS"]),
        Route("/v1/screen", endpoint(segment_route("screen")), methods=["POST", "OPTIONS"]),
        Route("/v1/identify", endpoint(segment_route("identify")), methods=["POST", "OPTIONS"]),
        Route("/sdk.js", service.sdk_js, methods=["GET"]),
    ]
