"""The embedded Log backend: segment files in the data directory.

On-disk layout under the log directory::

    <topic>/meta.json                          {"partitions": N}
    <topic>/<partition>/<base_offset:020d>.seg segment files, oldest first
    <topic>/<partition>/<base_offset:020d>.index batch index of a sealed segment (a cache)
    <topic>/<partition>/.lock                  flock(2) target serialising writers
    <topic>/groups/<group>.json                committed offsets of one consumer group

A segment file is a sequence of record batches. A batch is a fixed header
(``_HEADER``: magic, CRC32, base offset, record count, first and max append
timestamp, payload length) followed by the payload: per record a key length
(i32, -1 for ``None``), the key, a value length (u32) and the value. The CRC
covers everything after the CRC field, header and payload. One flush of one
partition is one batch, written with a single ``os.write`` on an ``O_APPEND``
descriptor, so a crash tears at most the last batch of a partition. All
records of a batch share one timestamp, the append time; it never decreases
within a partition (a writer uses ``max(now, previous batch)``), so
``offset_for_time`` can binary-search.

Concurrency. Any number of processes may open the same directory. Writers of
a partition serialise on an ``flock`` of its ``.lock`` file; under the lock a
writer catches up on what other processes appended (it reads only the batch
headers written since it last looked), truncates a torn tail left by a crashed
writer, rolls the segment when it is full and appends. Readers take no lock:
they read the files and stop before an incomplete batch, which may be one that
another process is writing right now. Truncation happens only under the lock.

Durability (``fsync``):

* ``"always"``: ``Producer.flush`` writes one batch per touched partition and
  then ``fdatasync``s every touched file before returning (group commit).
  Records survive power loss once ``flush`` returned.
* ``"interval"``: a background thread ``fdatasync``s written files every
  ``fsync_interval_ms``. A returned ``flush`` survives the death of the process
  (the data is in the page cache), but power loss or a kernel crash can lose
  up to the last interval of acknowledged records.
* ``"never"``: no fsync at all (tests, benchmarks, throwaway data).

Under every policy a record is visible to readers in other processes as soon
as its batch is written, which is before the fsync of ``"always"``. So after
power loss a reader may have seen records that the log then no longer holds.
New segment files and directories get their directory fsynced (except under
``"never"``); when a segment rolls, the finished one is fsynced first so that
power loss cannot leave a hole in the offsets.

Batch index. To seek by offset or by time a process needs, per segment, the
file position, base offset and max timestamp of every batch. Only the newest
(active) segment of a partition keeps that index in memory for good. When a
segment is sealed (a newer one exists) the process keeps just its summary
(size, end offset, newest timestamp) and drops the batches; the writer that
rolled it writes them to the sidecar ``<base>.index`` (temp file, fsync per
the policy, rename). A lookup in a sealed segment reads the sidecar into a
small per-partition LRU (``_CACHED_SEALED_INDEXES`` segments). The sidecar is
a cache and the segment is the truth: a sidecar that is missing, torn, or
does not match its segment (size, and the last batch's header) is rebuilt by
scanning the segment's headers. Retention deletes it with its segment. So the
memory an index takes is bounded by ``segment_bytes`` (the active segment)
plus the LRU, and a few dozen bytes per retained segment; not by the number
of batches the log keeps (decision 099).

Consumers. ``poll`` raises ``OffsetOutOfRange`` when a position lies below the
beginning offset (retention deleted it) or beyond the end offset; the caller
decides whether to ``seek`` to ``beginning_offsets()``. There is no automatic
reset. A consumer that already has a segment open may finish reading it even
after retention deleted the file. ``EmbeddedConsumer.poll_batches`` overrides
the interface's default with a faster read that builds no ``Record`` objects.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import logging
import os
import re
import struct
import sys
import threading
import time
import types
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from strata.log.base import (
    Consumer,
    Log,
    LogError,
    LogFull,
    OffsetOutOfRange,
    Producer,
    Record,
    RecordBatch,
    RetentionReport,
)

__all__ = ["EmbeddedConsumer", "EmbeddedLog", "EmbeddedProducer"]

logger = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "interval", "never"]

_MAGIC = b"STB1"
# magic, crc32, base_offset, record_count, first_timestamp_ms, max_timestamp_ms, payload_length
_HEADER = struct.Struct("<4sIQIqqI")
_HEADER_SIZE = _HEADER.size
_CRC_START = 8  # the CRC covers the header from here on, then the payload
_CRC = struct.Struct("<I")
_KEY_AND_VALUE_LENGTH = struct.Struct("<iI")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_MAX_PAYLOAD = 2**32 - 1

_SEGMENT_SUFFIX = ".seg"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
_INDEX_SUFFIX = ".index"
_INDEX_NAME = re.compile(r"^(\d{20})\.index$")
# A sidecar's temp file (``_write_file_atomically``) left behind by a crash.
_INDEX_TEMP_NAME = re.compile(r"^\.\d{20}\.index\.\d+\.\d+\.tmp$")
_INDEX_TEMP_MAX_AGE_S = 3600
# magic, crc32 (of everything after it), base_offset, end_offset, segment_size, batch_count;
# then batch_count int64 file positions, base offsets and max timestamps, little-endian.
_INDEX_MAGIC = b"STI1"
_INDEX_HEADER = struct.Struct("<4sIQQQI")
# Sealed segments whose full batch index a partition keeps in memory after a
# lookup (seek, offset_for_time); sequential reads do not use the index.
_CACHED_SEALED_INDEXES = 4
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")

_READ_AHEAD = 512 * 1024
_SCAN_CHUNK = 32 * 1024
_POLL_SLEEP_MIN_S = 0.005
_POLL_SLEEP_MAX_S = 0.02
# How stale the cached total size used for ``max_bytes`` may get; other
# processes' appends are only seen by a recount.
_SIZE_RECOUNT_S = 1.0

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)

# A forked child shares its parent's open file descriptions, and with them the
# flocks, so it must not write through a log its parent opened.
_fork_generation = 0


def _count_fork() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_count_fork)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}{_SEGMENT_SUFFIX}"


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise LogError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-'")


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir(path: Path, *, sync: bool) -> None:
    """Create ``path`` if missing and, when asked, make the new entry durable."""
    try:
        path.mkdir()
    except FileExistsError:
        return
    if sync:
        _fsync_dir(path.parent)


def _write_file_atomically(path: Path, data: bytes, *, sync: bool) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        if sync:
            os.fsync(file.fileno())
    os.replace(tmp, path)
    if sync:
        _fsync_dir(path.parent)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as exc:
        raise LogError(f"cannot read {path}: {exc}") from exc


# --- record construction -------------------------------------------------------------------------

# Record is a frozen dataclass; its generated __init__ goes through
# object.__setattr__ per field, which dominates read cost. Record has slots
# (strata.log.base), so we fill them through the slot descriptors instead
# (about 1.7x faster).
_RecordSetter = Callable[[Record, Any], None]


def _record_slot_setters() -> tuple[_RecordSetter, ...]:
    fields = ("topic", "partition", "offset", "timestamp_ms", "key", "value")
    descriptors = [Record.__dict__.get(name) for name in fields]
    if not all(isinstance(item, types.MemberDescriptorType) for item in descriptors):
        raise TypeError("strata.log.base.Record must be a dataclass with slots")
    return tuple(item.__set__ for item in descriptors)  # type: ignore[union-attr]


_RECORD_SETTERS = _record_slot_setters()


def _decode_records(
    data: bytes,
    index: int,
    count: int,
    topic: str,
    partition: int,
    first_offset: int,
    timestamp_ms: int,
    out: list[Record],
) -> int:
    """Append ``count`` records encoded in ``data`` from ``index``; return the index after them."""
    unpack_key_and_value = _KEY_AND_VALUE_LENGTH.unpack_from
    unpack_u32 = _U32.unpack_from
    append = out.append
    new = object.__new__
    set_topic, set_partition, set_offset, set_timestamp, set_key, set_value = _RECORD_SETTERS
    for offset in range(first_offset, first_offset + count):
        key_length, value_length = unpack_key_and_value(data, index)
        if key_length < 0:
            key = None
            index += 8
        else:
            index += 4
            key = data[index : index + key_length]
            index += key_length
            (value_length,) = unpack_u32(data, index)
            index += 4
        record = new(Record)
        set_topic(record, topic)
        set_partition(record, partition)
        set_offset(record, offset)
        set_timestamp(record, timestamp_ms)
        set_key(record, key)
        set_value(record, data[index : index + value_length])
        index += value_length
        append(record)
    return index


def _decode_values(data: bytes, index: int, count: int, out: list[bytes]) -> int:
    """Append ``count`` values encoded in ``data`` from ``index``; return the index after them."""
    unpack_key_and_value = _KEY_AND_VALUE_LENGTH.unpack_from
    unpack_u32 = _U32.unpack_from
    append = out.append
    for _ in range(count):
        key_length, value_length = unpack_key_and_value(data, index)
        if key_length < 0:
            index += 8
        else:
            index += 4 + key_length
            (value_length,) = unpack_u32(data, index)
            index += 4
        append(data[index : index + value_length])
        index += value_length
    return index


def _skip_records(data: bytes, index: int, count: int) -> int:
    unpack_key_and_value = _KEY_AND_VALUE_LENGTH.unpack_from
    unpack_u32 = _U32.unpack_from
    for _ in range(count):
        key_length, value_length = unpack_key_and_value(data, index)
        if key_length < 0:
            index += 8 + value_length
        else:
            index += 4 + key_length
            (value_length,) = unpack_u32(data, index)
            index += 4 + value_length
    return index


class _Batches:
    """The batch index of (part of) one segment: one int64 each per batch.

    24 B per batch (lists of ints took 125 B: decision 095). Held for good
    only for a partition's active segment; see "Batch index" above.
    """

    __slots__ = ("positions", "offsets", "timestamps")

    def __init__(self) -> None:
        self.positions = array("q")  # file position of each batch
        self.offsets = array("q")  # base offset of each batch
        self.timestamps = array("q")  # max timestamp of each batch

    def __len__(self) -> int:
        return len(self.positions)

    def append(self, position: int, offset: int, timestamp: int) -> None:
        self.positions.append(position)
        self.offsets.append(offset)
        self.timestamps.append(timestamp)

    def pop(self) -> tuple[int, int, int]:
        return self.positions.pop(), self.offsets.pop(), self.timestamps.pop()


class _Segment:
    """What this process knows about one segment file.

    ``size``/``end_offset``/``max_timestamp`` cover the complete batches
    indexed so far; once ``final`` (a newer segment exists and this one was
    indexed to its end) they describe the whole, immutable segment, and
    ``batches`` is ``None``: the partition's LRU or the sidecar holds them.
    A segment listed but never indexed also has ``batches`` ``None``.
    """

    __slots__ = ("base_offset", "path", "size", "end_offset", "max_timestamp", "final", "batches")

    def __init__(self, base_offset: int, path: str) -> None:
        self.base_offset = base_offset
        self.path = path
        self.size = 0  # bytes covered by the indexed batches
        self.end_offset = base_offset  # offset after the last indexed batch
        self.max_timestamp: int | None = None  # of the last indexed batch
        self.final = False
        self.batches: _Batches | None = None


def _index_path(segment_path: str) -> str:
    return segment_path[: -len(_SEGMENT_SUFFIX)] + _INDEX_SUFFIX


def _encode_index(segment: _Segment, batches: _Batches) -> bytes:
    arrays = [batches.positions, batches.offsets, batches.timestamps]
    if sys.byteorder != "little":
        arrays = [array("q", values) for values in arrays]
        for values in arrays:
            values.byteswap()
    body = _INDEX_HEADER.pack(
        _INDEX_MAGIC, 0, segment.base_offset, segment.end_offset, segment.size, len(batches)
    )[8:] + b"".join(values.tobytes() for values in arrays)
    return _INDEX_MAGIC + _CRC.pack(zlib.crc32(body)) + body


def _decode_index(data: bytes, segment_base: int) -> tuple[int, int, _Batches] | None:
    """(end offset, segment size, batches) from sidecar bytes, or ``None`` if
    they are torn, corrupt or name another segment."""
    if len(data) < _INDEX_HEADER.size:
        return None
    magic, crc, base, end_offset, size, count = _INDEX_HEADER.unpack_from(data)
    if (
        magic != _INDEX_MAGIC
        or base != segment_base
        or len(data) != _INDEX_HEADER.size + 24 * count
        or zlib.crc32(memoryview(data)[8:]) != crc
    ):
        return None
    batches = _Batches()
    start = _INDEX_HEADER.size
    for values in (batches.positions, batches.offsets, batches.timestamps):
        values.frombytes(data[start : start + 8 * count])
        if sys.byteorder != "little":
            values.byteswap()
        start += 8 * count
    return end_offset, size, batches


def _scan_file(
    fd: int, file_size: int, batches: _Batches, position: int, next_offset: int
) -> tuple[int, int, bool]:
    """Append to ``batches`` the complete batches of the open segment file
    from ``position`` (whose batch has base offset ``next_offset``).

    Returns (position after the last complete batch, the offset after it,
    whether a torn or corrupt batch stopped the scan before ``file_size``).
    Only headers are read, except for the newest batch, whose CRC is checked:
    only it can be half-written or half-synced.
    """
    first_new = len(batches)
    chunk = b""
    chunk_position = position
    torn = False
    while position < file_size:
        if position + _HEADER_SIZE > file_size:
            torn = True
            break
        relative = position - chunk_position
        if relative + _HEADER_SIZE > len(chunk):
            chunk = os.pread(fd, _SCAN_CHUNK, position)
            chunk_position = position
            relative = 0
            if len(chunk) < _HEADER_SIZE:
                torn = True
                break
        magic, _crc, base, count, _first_ts, max_ts, length = _HEADER.unpack_from(chunk, relative)
        end = position + _HEADER_SIZE + length
        if magic != _MAGIC or base != next_offset or count == 0 or end > file_size:
            torn = True
            break
        batches.append(position, base, max_ts)
        position = end
        next_offset = base + count
    if len(batches) > first_new:
        batch_position = batches.positions[-1]
        if not _crc_ok(os.pread(fd, position - batch_position, batch_position)):
            position, next_offset, _ = batches.pop()
            torn = True
    return position, next_offset, torn


# --- partitions: the shared index and the writer -------------------------------------------------


class _Partition:
    """One partition of one topic: the batch index, the writer and their locks.

    ``lock`` serialises threads of this process; the flock on ``lock_fd``
    serialises writers across processes. Every method must be called with
    ``lock`` held.
    """

    def __init__(self, log: EmbeddedLog, topic: str, number: int, directory: Path) -> None:
        self.log = log
        self.topic = topic
        self.number = number
        self.directory = directory
        self.lock = threading.RLock()
        self.segments: list[_Segment] = []
        # Full batch indexes of recently looked-up sealed segments, by base offset.
        self.sealed_indexes: OrderedDict[int, _Batches] = OrderedDict()
        # Segments this process rolled, whose sidecar it writes once the flock is released.
        self.unwritten_sidecars: list[tuple[_Segment, _Batches]] = []
        self.writer_fd: int | None = None
        self.writer_base: int | None = None
        self.last_timestamp = 0
        self.dirty = False
        if not directory.is_dir():
            raise LogError(f"partition directory {directory} is missing")
        self.lock_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        with self.lock, self.flocked():
            # Opening a partition recovers it: a torn tail is truncated away.
            self.refresh(repair=True, relist=True)

    # -- locking and life cycle

    def flocked(self) -> _Flock:
        self.log._check_not_forked()
        return _Flock(self.lock_fd)

    def close(self) -> None:
        if self.writer_fd is not None:
            os.close(self.writer_fd)
            self.writer_fd = None
            self.writer_base = None
        os.close(self.lock_fd)

    def _sync_policy(self) -> bool:
        return self.log._fsync != "never"

    # -- the index

    def index_stats(self) -> tuple[int, int]:
        """(batches indexed in memory, segments known) of this partition."""
        held = sum(len(segment.batches) for segment in self.segments if segment.batches)
        held += sum(len(batches) for batches in self.sealed_indexes.values())
        return held, len(self.segments)

    def refresh(self, *, repair: bool = False, relist: bool = False) -> None:
        """Catch up with what other processes appended, rolled or deleted.

        ``repair`` (only with the flock held) truncates a torn or corrupt tail
        batch; without it the index simply stops before it. ``relist`` reads the
        directory, which also notices segments deleted by retention; without it
        only the newest segment and a successor named by its end offset are
        examined, which costs two ``stat`` calls when nothing changed.
        """
        if relist or not self.segments:  # a first segment may come from another process
            self._relist()
        while self.segments:
            last = self.segments[-1]
            self._scan(last, repair=repair)
            successor = os.path.join(self.directory, _segment_name(last.end_offset))
            if last.end_offset == last.base_offset or not os.path.exists(successor):
                break
            self._seal(last)
            self.segments.append(_Segment(last.end_offset, successor))
        if self.segments:
            last = self.segments[-1]
            if last.max_timestamp is not None:
                self.last_timestamp = max(self.last_timestamp, last.max_timestamp)
            elif len(self.segments) > 1:
                previous = self.segments[-2]
                self.ensure_indexed(previous)
                if previous.max_timestamp is not None:
                    self.last_timestamp = max(self.last_timestamp, previous.max_timestamp)

    def _relist(self) -> None:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError as exc:
            raise LogError(f"partition directory {self.directory} is missing") from exc
        bases = sorted(int(match.group(1)) for match in map(_SEGMENT_NAME.match, names) if match)
        known = {segment.base_offset: segment for segment in self.segments}
        self.segments = [
            known.get(base) or _Segment(base, os.path.join(self.directory, _segment_name(base)))
            for base in bases
        ]
        listed = set(bases)
        for base in [base for base in self.sealed_indexes if base not in listed]:
            del self.sealed_indexes[base]
        # A segment that was partly indexed as the newest may have been rolled
        # past by another process; seal it now rather than keep its batches.
        for segment in self.segments[:-1]:
            if segment.batches is not None:
                self.ensure_indexed(segment)

    def ensure_indexed(self, segment: _Segment) -> None:
        """Index a segment to its end; seal it if it is no longer the newest.

        Sealing a segment that is not yet final reads its sidecar or, when the
        sidecar is unusable, scans the rest of the segment and rewrites it.
        """
        if segment.final:
            return
        if segment is self.segments[-1]:
            self._scan(segment, repair=False)
            return
        # No longer the newest, so complete and immutable.
        batches = self._read_sidecar(segment)
        if batches is not None:
            segment.batches = None
        else:
            torn = self._scan(segment, repair=False)
            batches = segment.batches
            if batches is not None and len(batches) and not torn:
                self._write_sidecar(segment, batches)
        self._seal(segment)
        if batches is not None and len(batches):
            self._cache(segment, batches)

    def _seal(self, segment: _Segment) -> None:
        """Mark a segment indexed to its end final and release its batches."""
        segment.final = True
        segment.batches = None

    def batches_of(self, segment: _Segment) -> _Batches:
        """The full batch index of ``segment``, which ``ensure_indexed`` saw."""
        if segment.batches is not None:
            return segment.batches
        batches = self.sealed_indexes.get(segment.base_offset)
        if batches is not None:
            self.sealed_indexes.move_to_end(segment.base_offset)
            return batches
        batches = self._read_sidecar(segment)
        if batches is None:
            batches = _Batches()
            try:
                fd = os.open(segment.path, os.O_RDONLY)
            except FileNotFoundError:
                return batches  # deleted by retention: nothing left to find in it
            try:
                size, _end, torn = _scan_file(
                    fd, os.fstat(fd).st_size, batches, 0, segment.base_offset
                )
            finally:
                os.close(fd)
            if not torn and size == segment.size and len(batches):
                self._write_sidecar(segment, batches)
        self._cache(segment, batches)
        return batches

    def _cache(self, segment: _Segment, batches: _Batches) -> None:
        self.sealed_indexes[segment.base_offset] = batches
        self.sealed_indexes.move_to_end(segment.base_offset)
        while len(self.sealed_indexes) > _CACHED_SEALED_INDEXES:
            self.sealed_indexes.popitem(last=False)

    def _read_sidecar(self, segment: _Segment) -> _Batches | None:
        """The sidecar's batches if it matches the segment file as it is now.

        On success ``segment``'s size, end offset and newest timestamp are set
        from it. ``None`` when missing, torn, corrupt or stale (written for
        other contents of this file name).
        """
        path = _index_path(segment.path)
        try:
            with open(path, "rb") as file:
                data = file.read()
            fd = os.open(segment.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            decoded = _decode_index(data, segment.base_offset)
            if decoded is None:
                logger.warning(
                    "log %s/%d: ignoring invalid index %s", self.topic, self.number, path
                )
                return None
            end_offset, size, batches = decoded
            if os.fstat(fd).st_size != size or not len(batches):
                return None
            # The last batch's header must be where and what the sidecar says.
            header = os.pread(fd, _HEADER_SIZE, batches.positions[-1])
        finally:
            os.close(fd)
        if len(header) < _HEADER_SIZE:
            return None
        magic, _crc, base, count, _first_ts, max_ts, length = _HEADER.unpack(header)
        if (
            magic != _MAGIC
            or base != batches.offsets[-1]
            or max_ts != batches.timestamps[-1]
            or base + count != end_offset
            or batches.positions[-1] + _HEADER_SIZE + length != size
        ):
            logger.warning("log %s/%d: ignoring stale index %s", self.topic, self.number, path)
            return None
        segment.size = size
        segment.end_offset = end_offset
        segment.max_timestamp = batches.timestamps[-1]
        return batches

    def _write_sidecar(self, segment: _Segment, batches: _Batches) -> None:
        """Write the sidecar of a sealed segment; a failure only costs a rescan later."""
        path = Path(_index_path(segment.path))
        try:
            _write_file_atomically(path, _encode_index(segment, batches), sync=self._sync_policy())
        except FileNotFoundError:
            pass  # the partition directory is gone
        except OSError:
            logger.warning(
                "log %s/%d: cannot write index %s", self.topic, self.number, path, exc_info=True
            )

    def write_unwritten_sidecars(self) -> None:
        """Write the sidecars of segments this process rolled (without the flock)."""
        while self.unwritten_sidecars:
            segment, batches = self.unwritten_sidecars.pop()
            if os.path.exists(segment.path):
                self._write_sidecar(segment, batches)

    def _scan(self, segment: _Segment, *, repair: bool) -> bool:
        """Index the complete batches appended to ``segment`` since the last scan.

        Returns whether a torn or corrupt batch stopped the scan.
        """
        if segment.final:
            return False
        try:
            file_size = os.stat(segment.path).st_size
        except FileNotFoundError:
            return False  # deleted by retention; a relist drops it
        if file_size == segment.size and segment.batches is not None:
            return False
        if segment.batches is None:
            # Never indexed (or its partial index was dropped): start over.
            segment.batches = _Batches()
            segment.size = 0
            segment.end_offset = segment.base_offset
        elif file_size < segment.size:
            self._forget_beyond(segment, file_size)
        try:
            fd = os.open(segment.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        batches = segment.batches
        try:
            position, next_offset, torn = _scan_file(
                fd, os.fstat(fd).st_size, batches, segment.size, segment.end_offset
            )
        finally:
            os.close(fd)
        segment.size = position
        segment.end_offset = next_offset
        segment.max_timestamp = batches.timestamps[-1] if len(batches) else None
        if torn and repair:
            self._truncate(segment, position)
        return torn

    def _forget_beyond(self, segment: _Segment, size: int) -> None:
        """Drop indexed batches that no longer fit in a file truncated to ``size``."""
        batches = segment.batches
        assert batches is not None
        while len(batches) and segment.size > size:
            segment.size, segment.end_offset, _ = batches.pop()
        if segment.size > size:
            segment.size = 0
            segment.end_offset = segment.base_offset
        segment.max_timestamp = batches.timestamps[-1] if len(batches) else None

    def _truncate(self, segment: _Segment, size: int) -> None:
        logger.warning(
            "log %s/%d: truncating torn tail of %s at byte %d",
            self.topic,
            self.number,
            segment.path,
            size,
        )
        fd = os.open(segment.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            if self._sync_policy():
                os.fsync(fd)
        finally:
            os.close(fd)

    def beginning_offset(self) -> int:
        return self.segments[0].base_offset if self.segments else 0

    def end_offset(self) -> int:
        return self.segments[-1].end_offset if self.segments else 0

    def locate(self, offset: int) -> tuple[_Segment, int, int] | None:
        """Find the batch holding ``offset``: (segment, file position, batch base offset).

        For the end offset this is the end of the newest segment, or ``None``
        if the partition has no segment yet. Raises ``OffsetOutOfRange``
        outside [beginning, end].
        """
        self.refresh(relist=True)
        beginning, end = self.beginning_offset(), self.end_offset()
        if not beginning <= offset <= end:
            raise OffsetOutOfRange(
                f"{self.topic}/{self.number}: offset {offset} is outside [{beginning}, {end}]"
            )
        if not self.segments:
            return None
        bases = [segment.base_offset for segment in self.segments]
        segment = self.segments[bisect.bisect_right(bases, offset) - 1]
        self.ensure_indexed(segment)
        if offset >= segment.end_offset:
            return segment, segment.size, segment.end_offset
        batches = self.batches_of(segment)
        index = bisect.bisect_right(batches.offsets, offset) - 1
        if index < 0:  # the file vanished under us (retention)
            return segment, 0, segment.base_offset
        return segment, batches.positions[index], batches.offsets[index]

    def offset_for_time(self, timestamp_ms: int) -> int:
        self.refresh(relist=True)
        segments = self.segments
        low, high = 0, len(segments)
        # First segment whose newest batch is at or after timestamp_ms. An
        # empty newest segment (rolled, its first batch not yet written) counts
        # as newer than everything: it holds the end offset. Treating it as
        # older broke the search's monotone order and answered the end offset
        # for timestamps of the previous segment.
        newest_index = len(segments) - 1
        while low < high:
            middle = (low + high) // 2
            segment = segments[middle]
            self.ensure_indexed(segment)
            newest = segment.max_timestamp
            if (newest is None and middle == newest_index) or (
                newest is not None and newest >= timestamp_ms
            ):
                high = middle
            else:
                low = middle + 1
        if low == len(segments):
            return self.end_offset()
        segment = segments[low]
        batches = self.batches_of(segment)
        index = bisect.bisect_left(batches.timestamps, timestamp_ms)
        if index == len(batches):  # the empty newest segment, or its file vanished (retention)
            return segment.base_offset
        return batches.offsets[index]

    # -- the writer

    def append(self, batch: bytearray, count: int, *, dup_for_sync: bool) -> tuple[int, int | None]:
        """Append one batch (header space reserved at the front of ``batch``).

        Returns (bytes written, a duplicate of the written file's descriptor to
        fsync after the lock is released, if ``dup_for_sync``).
        """
        payload_length = len(batch) - _HEADER_SIZE
        if payload_length > _MAX_PAYLOAD:
            raise LogError(
                f"{self.topic}/{self.number}: a flush of {payload_length} bytes is too big"
            )
        try:
            with self.flocked():
                return self._append_locked(batch, count, payload_length, dup_for_sync)
        finally:
            if self.unwritten_sidecars:
                self.write_unwritten_sidecars()

    def _append_locked(
        self, batch: bytearray, count: int, payload_length: int, dup_for_sync: bool
    ) -> tuple[int, int | None]:
        self.refresh(repair=True)
        segment = self._segment_for_append()
        fd = self._writer_for(segment)
        base_offset = segment.end_offset
        timestamp = max(_now_ms(), self.last_timestamp)
        _HEADER.pack_into(
            batch, 0, _MAGIC, 0, base_offset, count, timestamp, timestamp, payload_length
        )
        with memoryview(batch) as view:
            crc = zlib.crc32(view[_CRC_START:])
        _CRC.pack_into(batch, 4, crc)
        try:
            written = os.write(fd, batch)
            if written != len(batch):
                raise OSError(f"short write: {written} of {len(batch)} bytes")
        except OSError as exc:
            # Leave no torn batch behind; the next writer would truncate it anyway.
            try:
                os.ftruncate(fd, segment.size)
            except OSError:
                logger.exception(
                    "log %s/%d: cannot truncate after a failed write", self.topic, self.number
                )
            raise LogError(f"{self.topic}/{self.number}: append failed: {exc}") from exc
        assert segment.batches is not None
        segment.batches.append(segment.size, base_offset, timestamp)
        segment.size += written
        segment.max_timestamp = timestamp
        segment.end_offset = base_offset + count
        self.last_timestamp = timestamp
        self.dirty = True
        return written, (os.dup(fd) if dup_for_sync else None)

    def _segment_for_append(self) -> _Segment:
        if not self.segments:
            return self._create_segment(0)
        last = self.segments[-1]
        if last.size >= self.log._segment_bytes and last.batches:
            if self._sync_policy():
                self._sync_segment(last)
            self.unwritten_sidecars.append((last, last.batches))
            self._seal(last)
            return self._create_segment(last.end_offset)
        if last.batches is None:
            last.batches = _Batches()  # the refresh found an empty file
        return last

    def _sync_segment(self, segment: _Segment) -> None:
        if self.writer_fd is not None and self.writer_base == segment.base_offset:
            _fdatasync(self.writer_fd)
            return
        fd = os.open(segment.path, os.O_RDONLY)
        try:
            _fdatasync(fd)
        finally:
            os.close(fd)

    def _create_segment(self, base_offset: int) -> _Segment:
        path = os.path.join(self.directory, _segment_name(base_offset))
        try:
            # Exclusive: appending to a segment this process did not index would
            # write batches with wrong offsets, which the next scan cuts away.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError as exc:
            raise LogError(
                f"{self.topic}/{self.number}: segment {path} appeared unexpectedly"
            ) from exc
        if self._sync_policy():
            _fsync_dir(self.directory)
        self._set_writer(fd, base_offset)
        segment = _Segment(base_offset, path)
        segment.batches = _Batches()
        self.segments.append(segment)
        return segment

    def _writer_for(self, segment: _Segment) -> int:
        if self.writer_fd is None or self.writer_base != segment.base_offset:
            self._set_writer(os.open(segment.path, os.O_WRONLY | os.O_APPEND), segment.base_offset)
        assert self.writer_fd is not None
        return self.writer_fd

    def _set_writer(self, fd: int, base_offset: int) -> None:
        if self.writer_fd is not None:
            os.close(self.writer_fd)
        self.writer_fd = fd
        self.writer_base = base_offset

    def take_dirty(self) -> int | None:
        """For the interval syncer: a duplicate descriptor of the written file, if dirty."""
        if not self.dirty or self.writer_fd is None:
            return None
        self.dirty = False
        return os.dup(self.writer_fd)

    # -- retention

    def apply_retention(
        self, now_ms: int, min_committed: int | None, report: RetentionReport
    ) -> None:
        log = self.log
        with self.flocked():
            self.refresh(repair=True, relist=True)
            sizes = []
            for segment in self.segments:
                try:
                    sizes.append(os.stat(segment.path).st_size)
                except FileNotFoundError:
                    sizes.append(0)
            total = sum(sizes)
            deleted = 0
            for index, segment in enumerate(self.segments[:-1]):
                self.ensure_indexed(segment)
                segment_end = self.segments[index + 1].base_offset
                newest = segment.max_timestamp
                expired = log._retention_ms is not None and (
                    newest is None or newest < now_ms - log._retention_ms
                )
                oversized = log._retention_bytes is not None and total > log._retention_bytes
                if not (expired or oversized):
                    break
                uncommitted = 0
                if min_committed is not None:
                    uncommitted = max(0, segment_end - max(segment.base_offset, min_committed))
                where = f"{self.topic}/{self.number}/{_segment_name(segment.base_offset)}"
                if uncommitted and not log._allow_drop_uncommitted:
                    report.details.append(
                        f"{where}: kept, {uncommitted} records not committed by every group"
                    )
                    break
                # The sidecar first: a crash in between leaves a segment without
                # one (rebuilt when needed), never an orphan sidecar.
                for path in (_index_path(segment.path), segment.path):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass  # another process's retention got there first
                self.sealed_indexes.pop(segment.base_offset, None)
                reason = "expired" if expired else "over retention_bytes"
                report.deleted_segments += 1
                report.deleted_records += segment_end - segment.base_offset
                report.deleted_bytes += sizes[index]
                report.dropped_uncommitted_records += uncommitted
                report.details.append(
                    f"{where}: deleted offsets [{segment.base_offset}, {segment_end}), "
                    f"{sizes[index]} bytes, {reason}"
                    + (f", {uncommitted} records uncommitted" if uncommitted else "")
                )
                total -= sizes[index]
                deleted += 1
            if deleted:
                del self.segments[:deleted]
                if self._sync_policy():
                    _fsync_dir(self.directory)
                log._note_bytes(-sum(sizes[:deleted]))
            self._delete_orphan_sidecars()

    def _delete_orphan_sidecars(self) -> None:
        """Delete sidecars whose segment is gone (a reader may rebuild one for a
        segment that retention deletes meanwhile), and temp files of sidecar
        writes that crashed (old enough that no write is still under way)."""
        bases = {segment.base_offset for segment in self.segments}
        stale_before = time.time() - _INDEX_TEMP_MAX_AGE_S
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            match = _INDEX_NAME.match(name)
            try:
                if (match and int(match.group(1)) not in bases) or (
                    _INDEX_TEMP_NAME.match(name) and os.stat(path).st_mtime < stale_before
                ):
                    os.unlink(path)
            except FileNotFoundError:
                pass


class _Flock:
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _crc_ok(batch: bytes) -> bool:
    """Whether a complete batch (header and payload) matches its CRC."""
    return len(batch) >= _HEADER_SIZE and _crc_matches(batch, 0, len(batch))


def _crc_matches(data: bytes, start: int, end: int) -> bool:
    """Whether the batch at ``data[start:end]`` matches its CRC."""
    (stored,) = _CRC.unpack_from(data, start + 4)
    with memoryview(data) as view:
        return zlib.crc32(view[start + _CRC_START : end]) == stored


# --- the log -------------------------------------------------------------------------------------


class EmbeddedLog(Log):
    """The Log in a local directory; safe to open from several processes at once.

    ``segment_bytes``: once the newest segment holds at least this much, the
    next batch starts a new segment named by its base offset.
    ``retention_ms``/``retention_bytes`` (per partition; ``None`` disables):
    what ``apply_retention`` deletes; nothing is deleted in the background.
    ``fsync``: see the module docstring. ``max_bytes``: when the segment files
    of the whole directory plus a flush would exceed it, the flush raises
    ``LogFull`` and appends nothing (the count of other processes' appends may
    lag by about a second). ``allow_drop_uncommitted``: let retention delete
    records some consumer group has not committed, counting them.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        segment_bytes: int = 64 * 2**20,
        retention_ms: int | None = 7 * 86_400_000,
        retention_bytes: int | None = None,
        fsync: FsyncPolicy = "always",
        fsync_interval_ms: int = 200,
        max_bytes: int | None = None,
        allow_drop_uncommitted: bool = False,
    ) -> None:
        if segment_bytes <= 0:
            raise ValueError("segment_bytes must be positive")
        if fsync not in ("always", "interval", "never"):
            raise ValueError(f"fsync must be 'always', 'interval' or 'never', not {fsync!r}")
        if fsync_interval_ms <= 0:
            raise ValueError("fsync_interval_ms must be positive")
        for name, value in (
            ("retention_ms", retention_ms),
            ("retention_bytes", retention_bytes),
            ("max_bytes", max_bytes),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be None or >= 0")
        self.path = Path(path)
        self._segment_bytes = segment_bytes
        self._retention_ms = retention_ms
        self._retention_bytes = retention_bytes
        self._fsync: FsyncPolicy = fsync
        self._fsync_interval_s = fsync_interval_ms / 1000
        self._max_bytes = max_bytes
        self._allow_drop_uncommitted = allow_drop_uncommitted
        self._lock = threading.RLock()
        self._topics: dict[str, int] = {}
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self._closed = False
        self._size_lock = threading.Lock()
        self._size_estimate = 0
        self._size_counted_at = float("-inf")
        self._background_error: BaseException | None = None
        self._fork_generation = _fork_generation
        if not self.path.is_dir():
            self.path.mkdir(parents=True, exist_ok=True)
            if fsync != "never":
                _fsync_dir(self.path.parent)
        self._stop_syncer = threading.Event()
        self._syncer: threading.Thread | None = None
        if fsync == "interval":
            self._syncer = threading.Thread(
                target=self._sync_periodically, name=f"strata-log-fsync:{self.path}", daemon=True
            )
            self._syncer.start()

    # -- topics

    def create_topic(self, topic: str, partitions: int) -> None:
        _check_name("topic", topic)
        if not isinstance(partitions, int) or partitions <= 0:
            raise LogError(f"topic {topic!r}: partitions must be a positive integer")
        with self._lock:
            self._check_open()
            existing = self._read_partition_count(topic)
            if existing is None:
                sync = self._fsync != "never"
                topic_dir = self.path / topic
                _mkdir(topic_dir, sync=sync)
                for number in range(partitions):
                    _mkdir(topic_dir / str(number), sync=sync)
                _mkdir(topic_dir / "groups", sync=sync)
                # Publish meta.json last and only if absent: a concurrent creator loses cleanly.
                tmp = topic_dir / f".meta.json.{os.getpid()}.{threading.get_ident()}.tmp"
                tmp.write_bytes(json.dumps({"partitions": partitions}).encode())
                try:
                    if sync:
                        fd = os.open(tmp, os.O_RDONLY)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)
                    os.link(tmp, topic_dir / "meta.json")
                    if sync:
                        _fsync_dir(topic_dir)
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink()
                existing = self._read_partition_count(topic)
            if existing != partitions:
                raise LogError(
                    f"topic {topic!r} exists with {existing} partitions, not {partitions}"
                )

    def _read_partition_count(self, topic: str) -> int | None:
        if topic in self._topics:
            return self._topics[topic]
        meta = _read_json(self.path / topic / "meta.json")
        if meta is None:
            return None
        count = meta.get("partitions") if isinstance(meta, dict) else None
        if not isinstance(count, int) or count <= 0:
            raise LogError(f"topic {topic!r}: meta.json is invalid: {meta!r}")
        self._topics[topic] = count
        return count

    def partitions(self, topic: str) -> int:
        with self._lock:
            self._check_open()
            count = self._read_partition_count(topic)
        if count is None:
            raise LogError(f"topic {topic!r} does not exist")
        return count

    def topics(self) -> list[str]:
        """The names of all topics, sorted."""
        names = []
        for entry in os.scandir(self.path):
            if entry.is_dir() and os.path.exists(os.path.join(entry.path, "meta.json")):
                names.append(entry.name)
        return sorted(names)

    def _partition(self, topic: str, number: int) -> _Partition:
        key = (topic, number)
        partition = self._partitions.get(key)
        if partition is not None:
            return partition
        count = self.partitions(topic)
        if not isinstance(number, int) or not 0 <= number < count:
            raise LogError(f"topic {topic!r} has no partition {number!r} (it has {count})")
        with self._lock:
            self._check_open()
            partition = self._partitions.get(key)
            if partition is None:
                partition = _Partition(self, topic, number, self.path / topic / str(number))
                self._partitions[key] = partition
            return partition

    # -- producers and consumers

    def producer(self) -> EmbeddedProducer:
        self._check_open()
        return EmbeddedProducer(self)

    def consumer(self, group: str, topic: str) -> EmbeddedConsumer:
        _check_name("group", group)
        self.partitions(topic)
        return EmbeddedConsumer(self, group, topic)

    # -- offsets

    def beginning_offsets(self, topic: str) -> dict[int, int]:
        result = {}
        for number in range(self.partitions(topic)):
            partition = self._partition(topic, number)
            with partition.lock:
                partition.refresh(relist=True)
                result[number] = partition.beginning_offset()
        return result

    def end_offsets(self, topic: str) -> dict[int, int]:
        result = {}
        for number in range(self.partitions(topic)):
            partition = self._partition(topic, number)
            with partition.lock:
                partition.refresh()
                result[number] = partition.end_offset()
        return result

    def committed_offsets(self, group: str, topic: str) -> dict[int, int]:
        _check_name("group", group)
        self.partitions(topic)
        return self._read_group(topic, group)

    def groups(self, topic: str) -> list[str]:
        """Consumer groups of ``topic`` that have committed at least once, sorted."""
        self.partitions(topic)
        try:
            names = os.listdir(self.path / topic / "groups")
        except FileNotFoundError:
            return []
        return sorted(
            name[: -len(".json")]
            for name in names
            if name.endswith(".json") and not name.startswith(".")
        )

    def _group_path(self, topic: str, group: str) -> Path:
        return self.path / topic / "groups" / f"{group}.json"

    def _read_group(self, topic: str, group: str) -> dict[int, int]:
        data = _read_json(self._group_path(topic, group))
        if data is None:
            return {}
        try:
            return {int(number): int(offset) for number, offset in data["offsets"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LogError(f"group file of {group!r} on {topic!r} is invalid: {exc}") from exc

    def _commit(self, topic: str, group: str, offsets: dict[int, int]) -> None:
        count = self.partitions(topic)
        for number, offset in offsets.items():
            if not isinstance(number, int) or not 0 <= number < count:
                raise LogError(f"topic {topic!r} has no partition {number!r}")
            if not isinstance(offset, int) or offset < 0:
                raise LogError(f"commit of partition {number}: invalid offset {offset!r}")
        groups_dir = self.path / topic / "groups"
        _mkdir(groups_dir, sync=self._fsync != "never")
        # Consumers of one group in several processes commit different
        # partitions into the same file; serialise the read-modify-write.
        lock_fd = os.open(groups_dir / f".{group}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with _Flock(lock_fd):
                merged = self._read_group(topic, group)
                merged.update(offsets)
                document = {
                    "group": group,
                    "topic": topic,
                    "offsets": {str(number): merged[number] for number in sorted(merged)},
                }
                _write_file_atomically(
                    self._group_path(topic, group),
                    json.dumps(document).encode(),
                    sync=self._fsync != "never",
                )
        finally:
            os.close(lock_fd)

    def offset_for_time(self, topic: str, partition: int, timestamp_ms: int) -> int:
        part = self._partition(topic, partition)
        with part.lock:
            return part.offset_for_time(timestamp_ms)

    # -- retention and size

    def apply_retention(self, now_ms: int | None = None) -> RetentionReport:
        """Delete whole non-active segments past ``retention_ms`` or ``retention_bytes``.

        A segment goes only when every older segment of its partition goes too,
        so offsets stay contiguous. The newest segment is never deleted. A
        segment holding offsets at or after the minimum committed offset over
        the topic's known groups (those with a group file; a group without a
        commit for a partition protects all of it) is kept, unless
        ``allow_drop_uncommitted``, in which case those records are counted in
        ``dropped_uncommitted_records``.
        """
        self._check_open()
        now = _now_ms() if now_ms is None else now_ms
        report = RetentionReport()
        if self._retention_ms is None and self._retention_bytes is None:
            return report
        for topic in self.topics():
            groups = [self._read_group(topic, group) for group in self.groups(topic)]
            for number in range(self.partitions(topic)):
                partition = self._partition(topic, number)
                with partition.lock:
                    min_committed: int | None = None
                    if groups:
                        min_committed = min(
                            group.get(number, partition.beginning_offset()) for group in groups
                        )
                    partition.apply_retention(now, min_committed, report)
        return report

    def index_stats(self) -> dict[str, int]:
        """What the batch index holds in this process's memory, over the
        partitions it opened: ``batches`` (entries of 24 B: the active
        segments' plus the cached sealed ones'), ``segments`` (known, each a
        small summary) and ``cached_segments`` (sealed ones with a full index).
        """
        with self._lock:
            partitions = list(self._partitions.values())
        batches = segments = cached = 0
        for partition in partitions:
            with partition.lock:
                held, known = partition.index_stats()
                batches += held
                segments += known
                cached += len(partition.sealed_indexes)
        return {"batches": batches, "segments": segments, "cached_segments": cached}

    def size_bytes(self) -> int:
        """Total bytes of all segment files in the directory, counted now."""
        with self._size_lock:
            return self._recount_size()

    def _recount_size(self) -> int:
        total = 0
        for topic in self.topics():
            topic_dir = self.path / topic
            for entry in os.scandir(topic_dir):
                if not entry.is_dir() or not entry.name.isdigit():
                    continue
                for segment in os.scandir(entry.path):
                    if _SEGMENT_NAME.match(segment.name):
                        try:
                            total += segment.stat().st_size
                        except FileNotFoundError:
                            pass
        self._size_estimate = total
        self._size_counted_at = time.monotonic()
        return total

    def _reserve(self, pending_bytes: int) -> None:
        """Raise ``LogFull`` if ``pending_bytes`` more would exceed ``max_bytes``."""
        if self._max_bytes is None:
            return
        with self._size_lock:
            if time.monotonic() - self._size_counted_at > _SIZE_RECOUNT_S:
                self._recount_size()
            if self._size_estimate + pending_bytes > self._max_bytes:
                self._recount_size()  # retention may have freed space since
                if self._size_estimate + pending_bytes > self._max_bytes:
                    raise LogFull(
                        f"log at {self.path} holds {self._size_estimate} bytes; "
                        f"{pending_bytes} more would exceed max_bytes={self._max_bytes}"
                    )

    def _note_bytes(self, delta: int) -> None:
        with self._size_lock:
            self._size_estimate += delta

    # -- durability

    def _sync_periodically(self) -> None:
        while not self._stop_syncer.wait(self._fsync_interval_s):
            self._sync_dirty()

    def _sync_dirty(self) -> None:
        with self._lock:
            partitions = list(self._partitions.values())
        for partition in partitions:
            with partition.lock:
                fd = partition.take_dirty()
            if fd is None:
                continue
            try:
                _fdatasync(fd)
            except OSError as exc:
                logger.exception(
                    "log %s/%d: background fsync failed", partition.topic, partition.number
                )
                self._background_error = exc
            finally:
                os.close(fd)

    # -- life cycle

    def _check_open(self) -> None:
        if self._closed:
            raise LogError(f"log at {self.path} is closed")

    def _check_not_forked(self) -> None:
        if self._fork_generation != _fork_generation:
            raise LogError(
                f"the log at {self.path} was opened before this process forked; "
                "open a new EmbeddedLog in the child"
            )

    def _check_writable(self) -> None:
        self._check_open()
        self._check_not_forked()
        error, self._background_error = self._background_error, None
        if error is not None:
            raise LogError(f"a background fsync failed; recent records may not be durable: {error}")

    def close(self) -> None:
        """Stop the fsync thread (syncing what it still owes) and close all files."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._syncer is not None:
            self._stop_syncer.set()
            self._syncer.join()
            self._sync_dirty()
        with self._lock:
            for partition in self._partitions.values():
                with partition.lock:
                    partition.close()
            self._partitions.clear()

    def __enter__(self) -> EmbeddedLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- producer ------------------------------------------------------------------------------------


class _Buffer:
    __slots__ = ("data", "count")

    def __init__(self) -> None:
        self.data = bytearray(_HEADER_SIZE)  # the header is filled in under the partition lock
        self.count = 0


class EmbeddedProducer(Producer):
    """Buffers records per partition; ``flush`` appends one batch per partition.

    A flush that touches several partitions is atomic per partition, not
    across them: if it raises after some partitions were written, those
    records stay in the log, and a client retry duplicates them (event_id
    deduplication downstream drops the copies).
    """

    def __init__(self, log: EmbeddedLog) -> None:
        self._log = log
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._closed = False

    def _buffer(self, topic: str, partition: int) -> _Buffer:
        if self._closed:
            raise LogError("producer is closed")
        count = self._log.partitions(topic)
        if not isinstance(partition, int) or not 0 <= partition < count:
            raise LogError(f"topic {topic!r} has no partition {partition!r} (it has {count})")
        buffer = self._buffers[(topic, partition)] = _Buffer()
        return buffer

    def produce(self, topic: str, partition: int, key: bytes | None, value: bytes) -> None:
        buffer = self._buffers.get((topic, partition))
        if buffer is None:
            buffer = self._buffer(topic, partition)
        if type(value) is not bytes or (key is not None and type(key) is not bytes):
            value, key = _as_bytes(value, "value"), _as_bytes(key, "key")
        data = buffer.data
        if key is None:
            data += _KEY_AND_VALUE_LENGTH.pack(-1, len(value))
        else:
            data += _I32.pack(len(key))
            data += key
            data += _U32.pack(len(value))
        data += value
        buffer.count += 1

    def produce_many(
        self, topic: str, partition: int, records: Sequence[tuple[bytes | None, bytes]]
    ) -> None:
        buffer = self._buffers.get((topic, partition))
        if buffer is None:
            buffer = self._buffer(topic, partition)
        data = buffer.data
        size_before = len(data)
        pack_no_key = _KEY_AND_VALUE_LENGTH.pack
        pack_i32 = _I32.pack
        pack_u32 = _U32.pack
        added = 0
        try:
            for key, value in records:
                if type(value) is not bytes or (key is not None and type(key) is not bytes):
                    value, key = _as_bytes(value, "value"), _as_bytes(key, "key")
                if key is None:
                    data += pack_no_key(-1, len(value))
                else:
                    data += pack_i32(len(key))
                    data += key
                    data += pack_u32(len(value))
                data += value
                added += 1
        except BaseException:
            del data[size_before:]  # all of them or none
            raise
        buffer.count += added

    def flush(self) -> None:
        if self._closed:
            raise LogError("producer is closed")
        if not self._buffers:
            return
        buffers, self._buffers = self._buffers, {}
        log = self._log
        log._check_writable()
        log._reserve(sum(len(buffer.data) for buffer in buffers.values() if buffer.count))
        sync = log._fsync == "always"
        sync_fds: list[int] = []
        try:
            for (topic, number), buffer in buffers.items():
                if buffer.count == 0:
                    continue  # a batch without records would read as corrupt
                partition = log._partition(topic, number)
                with partition.lock:
                    written, sync_fd = partition.append(
                        buffer.data, buffer.count, dup_for_sync=sync
                    )
                log._note_bytes(written)
                if sync_fd is not None:
                    sync_fds.append(sync_fd)
            # Group commit: all writes first, then one fdatasync per touched file.
            for fd in sync_fds:
                _fdatasync(fd)
        except OSError as exc:
            raise LogError(f"flush failed: {exc}") from exc
        finally:
            for fd in sync_fds:
                os.close(fd)

    def close(self) -> None:
        if not self._closed:
            try:
                self.flush()
            finally:
                self._closed = True


def _as_bytes(data: Any, what: str) -> Any:
    if data is None and what == "key":
        return None
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"record {what} must be bytes, not {type(data).__name__}")


# --- consumer ------------------------------------------------------------------------------------


class _Cursor:
    """A sequential reader of one partition with its own file descriptor.

    ``file_position`` is the batch whose base offset is ``batch_offset``; the
    partition's position is ``batch_offset + skip``. ``fd`` is ``None`` while
    waiting for the segment file named ``batch_offset`` to appear.
    """

    __slots__ = (
        "fd",
        "file_position",
        "batch_offset",
        "skip",
        "record_position",
        "buffer",
        "buffer_position",
        "verified_position",
        "segment_base",
    )

    def __init__(
        self, fd: int | None, segment_base: int, file_position: int, batch_offset: int, skip: int
    ) -> None:
        self.fd = fd
        self.segment_base = segment_base  # the base offset naming the open segment file
        self.file_position = file_position
        self.batch_offset = batch_offset
        self.skip = skip
        self.record_position = -1  # file position of record number `skip`, when known
        self.buffer = b""
        self.buffer_position = 0
        self.verified_position = -1

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class EmbeddedConsumer(Consumer):
    """Reads one topic for one group from the segment files, without locks.

    See ``Consumer`` for the contract. ``poll`` raises ``OffsetOutOfRange``
    when a position fell below the beginning offset (retention) or lies past
    the end; recover with ``seek``.
    """

    def __init__(self, log: EmbeddedLog, group: str, topic: str) -> None:
        self._log = log
        self._group = group
        self._topic = topic
        self._assignment: list[int] = []
        self._positions: dict[int, int] = {}
        self._cursors: dict[int, _Cursor] = {}
        self._next_partition = 0
        self._closed = False

    def assign(self, partitions: Sequence[int]) -> None:
        """Read exactly ``partitions``. Newly assigned ones start at the committed
        offset, or the beginning offset without one; kept ones keep their position."""
        self._check_open()
        count = self._log.partitions(self._topic)
        wanted = list(dict.fromkeys(partitions))
        for number in wanted:
            if not isinstance(number, int) or not 0 <= number < count:
                raise LogError(f"topic {self._topic!r} has no partition {number!r}")
        for number in set(self._assignment) - set(wanted):
            self._positions.pop(number, None)
            cursor = self._cursors.pop(number, None)
            if cursor is not None:
                cursor.close()
        new = [number for number in wanted if number not in self._positions]
        if new:
            committed = self._log._read_group(self._topic, self._group)
            beginnings = self._log.beginning_offsets(self._topic)
            for number in new:
                self._positions[number] = committed.get(number, beginnings[number])
        self._assignment = wanted
        self._next_partition = 0

    def assignment(self) -> list[int]:
        return list(self._assignment)

    def seek(self, partition: int, offset: int) -> None:
        """Move the position; ``OffsetOutOfRange`` outside [beginning, end]."""
        self._check_assigned(partition)
        part = self._log._partition(self._topic, partition)
        with part.lock:
            part.locate(offset)
        self._drop_cursor(partition)
        self._positions[partition] = offset

    def position(self, partition: int) -> int:
        self._check_assigned(partition)
        return self._positions[partition]

    def commit(self, offsets: dict[int, int]) -> None:
        self._check_open()
        self._log._commit(self._topic, self._group, dict(offsets))

    def committed(self) -> dict[int, int]:
        self._check_open()
        committed = self._log._read_group(self._topic, self._group)
        return {number: committed[number] for number in self._assignment if number in committed}

    def close(self) -> None:
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()
        self._closed = True

    # -- reading

    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[Record]:
        records: list[Record] = []
        self._poll(max_records, timeout_s, records, None)
        return records

    def poll_batches(self, max_records: int, timeout_s: float = 0.0) -> list[RecordBatch]:
        """Like ``poll``, but one ``RecordBatch`` of consecutive offsets per
        partition read, values and timestamps only; no ``Record`` objects are
        built, which makes it several times faster."""
        batches: list[RecordBatch] = []
        self._poll(max_records, timeout_s, None, batches)
        return batches

    def _poll(
        self,
        max_records: int,
        timeout_s: float,
        records: list[Record] | None,
        batches: list[RecordBatch] | None,
    ) -> None:
        self._check_open()
        if max_records <= 0 or not self._assignment:
            return
        deadline = time.monotonic() + timeout_s
        sleep_s = _POLL_SLEEP_MIN_S
        while True:
            remaining = max_records
            count = len(self._assignment)
            start = self._next_partition
            self._next_partition = (start + 1) % count
            for step in range(count):
                partition = self._assignment[(start + step) % count]
                try:
                    remaining -= self._read(partition, remaining, records, batches)
                except LogError:
                    if (records or batches) and remaining < max_records:
                        # Hand out what was read; the error recurs on the next poll.
                        return
                    raise
                if remaining == 0:
                    break
            if remaining < max_records:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(sleep_s, left))
            sleep_s = min(sleep_s * 2, _POLL_SLEEP_MAX_S)

    def _read(
        self,
        partition: int,
        limit: int,
        records: list[Record] | None,
        batches: list[RecordBatch] | None,
    ) -> int:
        """Read up to ``limit`` records of ``partition`` into ``records`` or ``batches``."""
        cursor = self._cursors.get(partition)
        if cursor is None:
            cursor = self._open_cursor(partition)
        values: list[bytes] = []
        timestamps: list[int] = []
        first_offset = cursor.batch_offset + cursor.skip
        got = 0
        try:
            while got < limit:
                batch = self._next_batch(partition, cursor)
                if batch is None:
                    break
                payload_index, count, timestamp, batch_length = batch
                skip = cursor.skip
                take = min(count - skip, limit - got)
                buffer = cursor.buffer
                if skip == 0:
                    index = payload_index
                elif cursor.record_position >= 0:
                    index = cursor.record_position - cursor.buffer_position
                else:
                    index = _skip_records(buffer, payload_index, skip)
                first = cursor.batch_offset + skip
                if records is not None:
                    index = _decode_records(
                        buffer, index, take, self._topic, partition, first, timestamp, records
                    )
                else:
                    index = _decode_values(buffer, index, take, values)
                    timestamps += [timestamp] * take
                got += take
                if skip + take == count:
                    cursor.file_position += batch_length
                    cursor.batch_offset += count
                    cursor.skip = 0
                    cursor.record_position = -1
                else:
                    cursor.skip = skip + take
                    cursor.record_position = cursor.buffer_position + index
        finally:
            # Also on an error: the records already handed out must not be read again.
            self._positions[partition] = cursor.batch_offset + cursor.skip
            if batches is not None and values:
                batches.append(
                    RecordBatch(self._topic, partition, first_offset, values, timestamps)
                )
        return got

    def _next_batch(self, partition: int, cursor: _Cursor) -> tuple[int, int, int, int] | None:
        """Make the batch at the cursor wholly present in its buffer.

        Returns (payload index in the buffer, record count, timestamp, batch
        length), or ``None`` when no complete batch is there yet (end of the
        log, or a batch still being written). Moves to the next segment at
        the end of a finished one.
        """
        while True:
            if cursor.fd is None and not self._reopen(partition, cursor):
                return None
            relative = cursor.file_position - cursor.buffer_position
            requested = 0  # size of the read that filled the buffer; 0: an older read
            if relative < 0 or relative + _HEADER_SIZE > len(cursor.buffer):
                requested = self._fill(cursor, _READ_AHEAD)
                relative = 0
            while True:
                buffer = cursor.buffer
                needed = 0  # the whole batch's size, once its header is known good
                problem = None
                if len(buffer) - relative >= _HEADER_SIZE:
                    magic, _crc, base, count, first_ts, _max_ts, length = _HEADER.unpack_from(
                        buffer, relative
                    )
                    if magic != _MAGIC:
                        problem = "bad magic"
                    elif base != cursor.batch_offset or count == 0:
                        problem = f"base offset {base} and count {count}"
                    else:
                        needed = _HEADER_SIZE + length
                        end = relative + needed
                        if end <= len(buffer):
                            if cursor.verified_position == cursor.file_position or _crc_matches(
                                buffer, relative, end
                            ):
                                cursor.verified_position = cursor.file_position
                                return relative + _HEADER_SIZE, count, first_ts, needed
                            problem = "CRC mismatch"
                if requested == 0 or (problem is None and len(buffer) == requested < needed):
                    # An older buffer may end inside a batch written since, or one
                    # truncated and rewritten; judge only what the file holds now.
                    requested = self._fill(cursor, max(_READ_AHEAD, needed))
                    relative = 0
                    continue
                if problem is not None:
                    raise LogError(
                        f"{self._topic}/{partition}: corrupt batch at byte "
                        f"{cursor.file_position} of segment {_segment_name(cursor.segment_base)}"
                        f" (expected offset {cursor.batch_offset}): {problem}"
                    )
                break
            # No complete batch at the cursor: the end of this segment, so far.
            if not self._advance_segment(partition, cursor):
                return None

    def _fill(self, cursor: _Cursor, size: int) -> int:
        """Read ``size`` bytes at the cursor into its buffer; return ``size``."""
        assert cursor.fd is not None
        cursor.buffer = os.pread(cursor.fd, size, cursor.file_position)
        cursor.buffer_position = cursor.file_position
        return size

    def _advance_segment(self, partition: int, cursor: _Cursor) -> bool:
        """At the end of the current segment: switch to the next one if it exists."""
        if cursor.segment_base == cursor.batch_offset:
            return False  # at the start of the newest segment, which is still empty
        successor = self._segment_path(partition, cursor.batch_offset)
        try:
            fd = os.open(successor, os.O_RDONLY)
        except FileNotFoundError:
            assert cursor.fd is not None
            if os.fstat(cursor.fd).st_nlink == 0:
                # Retention deleted the segment we finished; the next poll looks
                # up where the log begins now (and raises OffsetOutOfRange).
                self._drop_cursor(partition)
            return False
        self._replace_fd(cursor, fd, cursor.batch_offset)
        return True

    def _reopen(self, partition: int, cursor: _Cursor) -> bool:
        try:
            fd = os.open(self._segment_path(partition, cursor.batch_offset), os.O_RDONLY)
        except FileNotFoundError:
            return False
        self._replace_fd(cursor, fd, cursor.batch_offset)
        return True

    @staticmethod
    def _replace_fd(cursor: _Cursor, fd: int, segment_base: int) -> None:
        cursor.close()
        cursor.fd = fd
        cursor.segment_base = segment_base
        cursor.file_position = 0
        cursor.buffer = b""
        cursor.buffer_position = 0
        cursor.record_position = -1
        cursor.verified_position = -1

    def _segment_path(self, partition: int, base_offset: int) -> str:
        return os.path.join(self._log.path, self._topic, str(partition), _segment_name(base_offset))

    def _open_cursor(self, partition: int) -> _Cursor:
        position = self._positions[partition]
        part = self._log._partition(self._topic, partition)
        with part.lock:
            found = part.locate(position)
            if found is None:
                # An empty partition: wait for its first segment, named by offset 0.
                cursor = _Cursor(None, 0, 0, 0, 0)
            else:
                segment, file_position, batch_offset = found
                try:
                    fd = os.open(segment.path, os.O_RDONLY)
                except FileNotFoundError as exc:
                    raise OffsetOutOfRange(
                        f"{self._topic}/{partition}: offset {position} was deleted by retention"
                    ) from exc
                cursor = _Cursor(
                    fd, segment.base_offset, file_position, batch_offset, position - batch_offset
                )
        self._cursors[partition] = cursor
        return cursor

    def _drop_cursor(self, partition: int) -> None:
        cursor = self._cursors.pop(partition, None)
        if cursor is not None:
            cursor.close()

    def _check_assigned(self, partition: int) -> None:
        self._check_open()
        if partition not in self._positions:
            raise LogError(f"partition {partition!r} of {self._topic!r} is not assigned")

    def _check_open(self) -> None:
        if self._closed:
            raise LogError("consumer is closed")
