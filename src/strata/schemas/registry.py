"""The schema registry: versioned JSON Schemas per event type, on disk.

Layout under ``<data_dir>/schemas/``::

    subjects/<event_type, %-encoded>.json  {"event_type", "mode", "versions": [...]}
    VERSION                                 {"generation": n}, rewritten after every change
    .lock                                   flock(2) target serialising writers

Every file is replaced atomically (``strata.durable``), so a reader sees the
old or the new registry, never a mix, also after kill -9. Any number of
processes may read and write: writers serialise on the flock and re-read the
subject under it. Readers (ingest workers) ``stat`` the ``VERSION`` file at
most every ``check_interval`` seconds on the request path and re-read the
subjects when its mtime or size changed, so a registration reaches every
worker within about a second, without a restart.

A schema describes the event's ``properties`` object. Schemas are compiled
once per version (``fastjsonschema`` generates Python code) and cached; the
hot path is one dict lookup and one call of the compiled validator.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import fastjsonschema

from strata.durable import atomic_write_json, read_json
from strata.schemas.compat import MODES, Mode, check

Policy = Literal["accept", "reject", "quarantine"]
POLICIES: tuple[Policy, ...] = ("accept", "reject", "quarantine")

MAX_EVENT_TYPE = 200


class SchemaError(ValueError):
    """A schema or request is invalid (HTTP 400); the message names the field."""


class IncompatibleSchema(ValueError):
    """A new version breaks the subject's compatibility mode (HTTP 409)."""

    def __init__(self, event_type: str, mode: str, problems: list[str]) -> None:
        super().__init__(
            f"schema for {event_type!r} is not {mode} compatible with the latest version: "
            + "; ".join(problems)
        )
        self.event_type = event_type
        self.mode = mode
        self.problems = problems


class UnknownSchema(LookupError):
    """No such event type or version (HTTP 404)."""


@dataclass(frozen=True)
class Validator:
    """A compiled schema. ``__call__`` returns ``None`` for a valid
    ``properties`` object, else ``"<json path>: <reason>"``."""

    event_type: str
    version: int
    compiled: Callable[[Any], Any]

    def __call__(self, properties: Any) -> str | None:
        try:
            self.compiled(properties)
        except fastjsonschema.JsonSchemaValueException as exc:
            return _message(exc)
        return None


def _message(exc: fastjsonschema.JsonSchemaValueException) -> str:
    # fastjsonschema says "data.plan must be one of [...]" with name
    # "data.plan"; strata names the path from the event: properties.plan.
    name = exc.name or "data"
    path = "properties" + name[len("data"):] if name.startswith("data") else name
    reason = exc.message
    if reason.startswith(name + " "):
        reason = reason[len(name) + 1 :]
    return f"{path}: {reason}"


def compile_schema(schema: Any, where: str = "schema") -> Callable[[Any], Any]:
    """Compile a JSON Schema for ``properties``; raises ``SchemaError``."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: expected a JSON object")
    kind = schema.get("type", "object")
    if kind != "object":
        raise SchemaError(f"{where}.type: a schema describes the properties object; use 'object'")
    try:
        return fastjsonschema.compile(schema)
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        raise SchemaError(f"{where}: invalid JSON Schema: {exc}") from exc
    except Exception as exc:  # the compiler raises plain errors on odd input
        raise SchemaError(f"{where}: invalid JSON Schema: {exc}") from exc


def check_event_type(event_type: str) -> str:
    if not isinstance(event_type, str) or not 1 <= len(event_type) <= MAX_EVENT_TYPE:
        raise SchemaError(f"event_type: 1 to {MAX_EVENT_TYPE} characters")
    return event_type


def _file_name(event_type: str) -> str:
    encoded = quote(event_type, safe="")
    if len(encoded) > 200:  # file names are limited to 255 bytes
        encoded = "sha256-" + hashlib.sha256(event_type.encode()).hexdigest()
    return encoded + ".json"


class SchemaRegistry:
    """Versioned schemas per event type (the module docstring has the layout).

    Thread-safe; safe across processes. Versions are numbered from 1 and never
    change once registered. Registering a schema equal to the latest version
    returns that version instead of adding one (idempotent retries).
    """

    def __init__(
        self,
        directory: Path,
        *,
        default_mode: Mode = "BACKWARD",
        check_interval: float = 0.5,
    ) -> None:
        self.directory = Path(directory)
        self.subjects_dir = self.directory / "subjects"
        self.version_path = self.directory / "VERSION"
        self.default_mode: Mode = default_mode
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._subjects: dict[str, dict[str, Any]] = {}
        self._latest: dict[str, Validator] = {}
        self._compiled: dict[tuple[str, int], Validator] = {}
        self._stamp: tuple[float, int, int] | None = None
        self._checked = 0.0
        self.reload()

    # -- reading -------------------------------------------------------------
    def _current_stamp(self) -> tuple[float, int, int] | None:
        try:
            st = os.stat(self.version_path)
        except FileNotFoundError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino)

    def maybe_reload(self) -> None:
        """Re-read the registry if it changed; stats at most every
        ``check_interval`` seconds. Cheap enough for every request."""
        now = time.monotonic()
        if now - self._checked < self.check_interval:
            return
        self._checked = now
        if self._current_stamp() != self._stamp:
            self.reload()

    def reload(self) -> None:
        stamp = self._current_stamp()
        subjects: dict[str, dict[str, Any]] = {}
        try:
            names = os.listdir(self.subjects_dir)
        except FileNotFoundError:
            names = []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            data = read_json(self.subjects_dir / name)
            if isinstance(data, dict) and data.get("event_type"):
                subjects[data["event_type"]] = data
        latest: dict[str, Validator] = {}
        for event_type, data in subjects.items():
            if data.get("versions"):
                latest[event_type] = self._validator(data, data["versions"][-1]["version"])
        with self._lock:
            self._subjects = subjects
            self._latest = latest
            self._stamp = stamp
            self._checked = time.monotonic()

    def _validator(self, data: dict[str, Any], version: int) -> Validator:
        key = (data["event_type"], version)
        found = self._compiled.get(key)
        if found is None:
            entry = data["versions"][version - 1]
            found = Validator(data["event_type"], version, compile_schema(entry["schema"]))
            self._compiled[key] = found
        return found

    @property
    def in_use(self) -> bool:
        """True once any schema is registered (the unregistered-type policy
        applies only then; see docs/decisions/052-unregistered-policy.md)."""
        return bool(self._latest)

    def latest_validators(self) -> dict[str, Validator]:
        """event_type -> validator of its latest version (a snapshot: the
        registry swaps the whole dict on reload, never mutates it)."""
        return self._latest

    def validator(self, event_type: str, version: int | None = None) -> Validator | None:
        """The compiled validator of ``version`` (latest if ``None``), or
        ``None`` if the event type has no schema. Raises ``UnknownSchema``
        for a pinned version that does not exist."""
        if version is None:
            return self._latest.get(event_type)
        data = self._subjects.get(event_type)
        if data is None:
            return None
        if not 1 <= version <= len(data.get("versions", [])):
            raise UnknownSchema(f"schema_version: {event_type!r} has no version {version}")
        with self._lock:
            return self._validator(data, version)

    def subjects(self) -> list[dict[str, Any]]:
        return [
            {
                "event_type": event_type,
                "mode": data.get("mode", self.default_mode),
                "latest_version": len(data.get("versions", [])),
            }
            for event_type, data in sorted(self._subjects.items())
        ]

    def subject(self, event_type: str) -> dict[str, Any]:
        data = self._subjects.get(event_type)
        if data is None:
            raise UnknownSchema(f"event_type: no schema registered for {event_type!r}")
        return {
            "event_type": event_type,
            "mode": data.get("mode", self.default_mode),
            "versions": [
                {"version": v["version"], "registered_at": v.get("registered_at")}
                for v in data.get("versions", [])
            ],
        }

    def get(self, event_type: str, version: int | None = None) -> dict[str, Any]:
        """One version (latest if ``None``): ``{event_type, version, schema, mode}``."""
        data = self._subjects.get(event_type)
        if data is None or not data.get("versions"):
            raise UnknownSchema(f"event_type: no schema registered for {event_type!r}")
        versions = data["versions"]
        number = len(versions) if version is None else version
        if not 1 <= number <= len(versions):
            raise UnknownSchema(f"version: {event_type!r} has no version {version}")
        entry = versions[number - 1]
        return {
            "event_type": event_type,
            "version": number,
            "schema": entry["schema"],
            "mode": data.get("mode", self.default_mode),
            "registered_at": entry.get("registered_at"),
        }

    # -- writing -------------------------------------------------------------
    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read_subject(self, event_type: str) -> dict[str, Any] | None:
        data = read_json(self.subjects_dir / _file_name(event_type))
        return data if isinstance(data, dict) else None

    def _write_subject(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.subjects_dir / _file_name(data["event_type"]), data)
        generation = (read_json(self.version_path, {}) or {}).get("generation", 0) + 1
        atomic_write_json(self.version_path, {"generation": generation, "at": time.time()})
        self.reload()

    def register(
        self, event_type: str, schema: Any, *, mode: str | None = None
    ) -> dict[str, Any]:
        """Add a version after the compatibility check of the subject's mode
        (``mode`` sets it first, for a new subject or a change of mode).
        Returns ``{event_type, version, created, mode}``. Raises
        ``SchemaError`` (invalid) or ``IncompatibleSchema``."""
        check_event_type(event_type)
        if mode is not None and mode not in MODES:
            raise SchemaError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        compile_schema(schema)
        with self._exclusive():
            data = self._read_subject(event_type) or {
                "event_type": event_type,
                "mode": self.default_mode,
                "versions": [],
            }
            if mode is not None:
                data["mode"] = mode
            versions = data["versions"]
            if versions and versions[-1]["schema"] == schema:
                if mode is not None:
                    self._write_subject(data)
                return {"event_type": event_type, "version": len(versions), "created": False,
                        "mode": data["mode"]}
            if versions:
                problems = check(versions[-1]["schema"], schema, data["mode"])
                if problems:
                    raise IncompatibleSchema(event_type, data["mode"], problems)
            versions.append(
                {"version": len(versions) + 1, "schema": schema,
                 "registered_at": int(time.time() * 1000)}
            )
            self._write_subject(data)
            return {"event_type": event_type, "version": len(versions), "created": True,
                    "mode": data["mode"]}

    def set_mode(self, event_type: str, mode: str) -> dict[str, Any]:
        """Set the compatibility mode of a subject (creating it without
        versions if needed). Returns ``{event_type, mode}``."""
        check_event_type(event_type)
        if mode not in MODES:
            raise SchemaError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        with self._exclusive():
            data = self._read_subject(event_type) or {
                "event_type": event_type, "versions": []
            }
            data["mode"] = mode
            self._write_subject(data)
        return {"event_type": event_type, "mode": mode}
