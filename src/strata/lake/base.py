"""The lake: raw events as Parquet files, Hive-partitioned by event date and type.

Layout under a tier's root (docs/storage.md)::

    date=YYYY-MM-DD/event_type=<url-quoted type>/p{partition}-{first:020d}-{last:020d}.parquet

``date`` is the UTC date of the event time ``ts``. ``first``/``last`` is the
log offset range of the archiver plan that wrote the file (not of the rows in
it), so a re-executed plan writes the same names with the same content.
Every file also stores every column (``event_type`` too), so a single file is
self-describing; the directory names exist for pruning.

Contract:

* ``write`` is atomic: a reader sees the old file, the new file, or no file,
  never a partial one. Local: write to ``_tmp/`` in the same root, fsync,
  rename. S3: one PUT of the final key (atomic per object).
* Names starting with ``_`` or ``.`` are not part of the lake.
* Two tiers: *hot* (``lake.path``) and *cold* (``lake.cold_path``).
  Readers see the union; a relative path present in both (a move interrupted
  between copy and delete) is read once, since both copies are identical.

One class serves both filesystems: ``pyarrow.fs`` resolves a local path or a
``s3://bucket/prefix`` URI (with ``lake.s3_endpoint`` for an S3-protocol
server; credentials from the usual AWS environment variables). This module
is the one place that picks the filesystem.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from strata.config import Config
from strata.durable import fsync_dir
from strata.loader.sinks import EVENTS_SINK

# The columns of every lake file: the raw table's columns (strata.loader.sinks
# EVENTS_SINK plus the log position), in this order.
LAKE_SCHEMA = EVENTS_SINK.stored_schema

TIERS = ("hot", "cold")


class LakeError(Exception):
    """A lake operation failed (filesystem unreachable, bad path, ...)."""


@dataclass(frozen=True, order=True)
class LakeFile:
    """One committed file: its tier, its path relative to the tier root, its size."""

    relpath: str
    tier: str
    size: int

    @property
    def day(self) -> date:
        return date.fromisoformat(self.relpath.split("/", 1)[0].removeprefix("date="))

    @property
    def event_type(self) -> str:
        return unquote(self.relpath.split("/")[1].removeprefix("event_type="))


def day_of(day: date | str) -> date:
    return day if isinstance(day, date) else date.fromisoformat(day)


def file_relpath(day: date, event_type: str, partition: int, first: int, last: int) -> str:
    """The deterministic relative path of an archiver output file."""
    return (
        f"date={day.isoformat()}/event_type={quote(event_type, safe='')}/"
        f"p{partition}-{first:020d}-{last:020d}.parquet"
    )


def resolve(uri: str, *, s3_endpoint: str = "", s3_region: str = "us-east-1") -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the root path inside it for a local path,
    ``file://`` URI or ``s3://bucket/prefix`` URI."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        # allow_delayed_open: a file smaller than one part goes up as one
        # PutObject instead of a multipart upload (cheaper, and atomic).
        options: dict[str, object] = {"region": s3_region, "allow_delayed_open": True}
        if s3_endpoint:
            endpoint = urlparse(s3_endpoint if "://" in s3_endpoint else f"http://{s3_endpoint}")
            options["endpoint_override"] = endpoint.netloc
            options["scheme"] = endpoint.scheme or "http"
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            options["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            options["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        filesystem = pafs.S3FileSystem(**options)
        root = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        return filesystem, root
    if parsed.scheme in ("", "file"):
        local = Path(parsed.path if parsed.scheme == "file" else uri).resolve()
        return pafs.LocalFileSystem(), local.as_posix()
    raise LakeError(f"lake.path: unsupported filesystem scheme {parsed.scheme!r} in {uri!r}")


class Lake:
    """The lake's two tiers over one pyarrow filesystem each."""

    def __init__(
        self,
        hot_uri: str,
        cold_uri: str,
        *,
        s3_endpoint: str = "",
        s3_region: str = "us-east-1",
    ) -> None:
        self.uris = {"hot": hot_uri, "cold": cold_uri}
        self._fs: dict[str, pafs.FileSystem] = {}
        self._root: dict[str, str] = {}
        for tier, uri in self.uris.items():
            filesystem, root = resolve(uri, s3_endpoint=s3_endpoint, s3_region=s3_region)
            self._fs[tier], self._root[tier] = filesystem, root
            if self.is_local(tier):
                Path(root).mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, config: Config) -> Lake:
        settings = config.lake
        hot = settings.path or str(config.data_path / "lake")
        cold = settings.cold_path or str(config.data_path / "lake-cold")
        return cls(hot, cold, s3_endpoint=settings.s3_endpoint, s3_region=settings.s3_region)

    def is_local(self, tier: str = "hot") -> bool:
        return isinstance(self._fs[tier], pafs.LocalFileSystem)

    def filesystem(self, tier: str = "hot") -> pafs.FileSystem:
        return self._fs[tier]

    def full_path(self, relpath: str, tier: str = "hot") -> str:
        return f"{self._root[tier]}/{relpath}"

    # -- writing -------------------------------------------------------------
    def write(self, relpath: str, table: pa.Table, tier: str = "hot") -> int:
        """Atomically (re)place ``relpath`` with ``table`` as zstd Parquet.
        Returns the file size. Writing the same table twice gives the same bytes."""
        table = table.cast(LAKE_SCHEMA) if table.schema != LAKE_SCHEMA else table
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=1 << 20)
        data = sink.getvalue().to_pybytes()
        self.write_bytes(relpath, data, tier)
        return len(data)

    def write_bytes(self, relpath: str, data: bytes, tier: str = "hot") -> None:
        final = self.full_path(relpath, tier)
        try:
            if self.is_local(tier):
                target = Path(final)
                tmp_dir = Path(self._root[tier]) / "_tmp"
                tmp_dir.mkdir(parents=True, exist_ok=True)
                tmp = tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.parquet"
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
                fsync_dir(target.parent)
            else:
                with self._fs[tier].open_output_stream(final) as out:
                    out.write(data)
        except OSError as exc:
            raise LakeError(f"lake: cannot write {final}: {exc}") from exc

    def read_bytes(self, relpath: str, tier: str = "hot") -> bytes:
        with self._fs[tier].open_input_stream(self.full_path(relpath, tier)) as handle:
            return bytes(handle.read())

    def delete(self, relpath: str, tier: str = "hot") -> None:
        try:
            self._fs[tier].delete_file(self.full_path(relpath, tier))
        except FileNotFoundError:
            pass

    def clean_tmp(self, older_than_s: float = 3600.0) -> int:
        """Remove temp files that a killed writer left behind in local tiers."""
        removed = 0
        for tier in TIERS:
            if not self.is_local(tier):
                continue
            tmp_dir = Path(self._root[tier]) / "_tmp"
            if not tmp_dir.exists():
                continue
            for path in tmp_dir.iterdir():
                try:
                    if time.time() - path.stat().st_mtime > older_than_s:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    # -- listing -------------------------------------------------------------
    def days(self) -> list[date]:
        """Every date that has a partition directory, in either tier, sorted."""
        found: set[date] = set()
        for tier in TIERS:
            try:
                infos = self._fs[tier].get_file_info(
                    pafs.FileSelector(self._root[tier], allow_not_found=True)
                )
            except OSError as exc:
                raise LakeError(f"lake: cannot list {self.uris[tier]}: {exc}") from exc
            for info in infos:
                if info.type == pafs.FileType.Directory and info.base_name.startswith("date="):
                    try:
                        found.add(date.fromisoformat(info.base_name[5:]))
                    except ValueError:
                        continue
        return sorted(found)

    def files(self, days: Iterable[date | str] | None = None, tiers: Iterable[str] = TIERS) -> list[LakeFile]:
        """Committed files of ``days`` (all days when None), deduplicated by
        relative path (hot wins), sorted by path."""
        wanted = None if days is None else {day_of(d) for d in days}
        seen: dict[str, LakeFile] = {}
        for tier in tiers:
            roots = (
                [self._root[tier]]
                if wanted is None
                else [f"{self._root[tier]}/date={d.isoformat()}" for d in sorted(wanted)]
            )
            for root in roots:
                for relpath, size in self._walk(tier, root):
                    if relpath not in seen:
                        seen[relpath] = LakeFile(relpath, tier, size)
        return sorted(seen.values())

    def _walk(self, tier: str, root: str) -> Iterator[tuple[str, int]]:
        prefix = self._root[tier] + "/"
        try:
            infos = self._fs[tier].get_file_info(
                pafs.FileSelector(root, recursive=True, allow_not_found=True)
            )
        except OSError as exc:
            raise LakeError(f"lake: cannot list {root}: {exc}") from exc
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
                continue
            relpath = info.path[len(prefix) :]
            if any(part[:1] in ("_", ".") for part in relpath.split("/")):
                continue
            if relpath.count("/") != 2 or not relpath.startswith("date="):
                continue
            yield relpath, int(info.size or 0)

    # -- reading -------------------------------------------------------------
    def dataset(self, files: list[LakeFile]) -> ds.Dataset:
        """A pyarrow dataset over ``files`` (possibly from both tiers)."""
        parts = []
        for tier in TIERS:
            paths = [self.full_path(f.relpath, tier) for f in files if f.tier == tier]
            if paths:
                parts.append(
                    ds.dataset(paths, schema=LAKE_SCHEMA, format="parquet", filesystem=self._fs[tier])
                )
        if not parts:
            return ds.dataset([], schema=LAKE_SCHEMA, format="parquet")
        return parts[0] if len(parts) == 1 else ds.dataset(parts)

    def read(self, files: list[LakeFile], columns: list[str] | None = None) -> pa.Table:
        """Read ``files`` into one table (``columns``: a subset of LAKE_SCHEMA)."""
        return self.dataset(files).to_table(columns=columns)

    def read_file(self, lake_file: LakeFile) -> pa.Table:
        with self._fs[lake_file.tier].open_input_file(
            self.full_path(lake_file.relpath, lake_file.tier)
        ) as handle:
            return pq.read_table(handle, schema=LAKE_SCHEMA)

    # -- tiers ---------------------------------------------------------------
    def move_to_cold(self, lake_file: LakeFile) -> None:
        """Copy a hot file to the cold tier (atomic commit there), then delete
        the hot copy. A crash in between leaves two identical copies, which
        readers see once; the next pass deletes the hot one."""
        if lake_file.tier != "hot":
            return
        self.write_bytes(lake_file.relpath, self.read_bytes(lake_file.relpath, "hot"), "cold")
        self.delete(lake_file.relpath, "hot")
        self._prune_empty_dirs(lake_file.relpath, "hot")

    def _prune_empty_dirs(self, relpath: str, tier: str) -> None:
        if not self.is_local(tier):
            return  # object stores have no directories to leave behind
        directory = Path(self.full_path(relpath, tier)).parent
        root = Path(self._root[tier])
        while directory != root:
            try:
                directory.rmdir()
            except OSError:
                break
            directory = directory.parent


def day_bounds_ms(day: date) -> tuple[int, int]:
    """[start, end) of a UTC day in epoch milliseconds."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return int(start.timestamp() * 1000), int((start + timedelta(days=1)).timestamp() * 1000)


def day_of_ms(timestamp_ms: int) -> date:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).date()
