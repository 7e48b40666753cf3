"""Event-id deduplication across client retries, per log partition.

A client that got no answer retries with the same event_ids; the retry lands
in the same partition as its original (strata.events.partition_for), so one
index per partition suffices. The index holds 64-bit BLAKE2b hashes of the
ids seen within the horizon (``loader.dedup_horizon``, at least 24 h),
bucketed by the hour the server received them:

* on disk, one append-only file of little-endian uint64 per (partition,
  hour); the loader's checkpoint records each file's length, and files are
  truncated back to it at start-up, so the index always matches the
  committed offsets exactly;
* in memory, a few sorted numpy arrays per partition, merged LSM-style, so a
  lookup is a handful of vectorized binary searches.

Beyond the horizon a retry is no longer recognised and is stored again
(docs/semantics.md). A 64-bit hash collision between two different ids
(probability about n^2 / 2^65 for n ids in the horizon) drops the later one.
"""

from __future__ import annotations

import os
from hashlib import blake2b
from pathlib import Path

import numpy as np

HOUR_MS = 3_600_000


def hash_ids(ids: list[str]) -> np.ndarray:
    """Stable 64-bit hashes of ``ids`` (the same in every process and run)."""
    joined = b"".join(blake2b(i.encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(joined, dtype="<u8")


class _Chunk:
    __slots__ = ("max_hour", "values")

    def __init__(self, max_hour: int, values: np.ndarray) -> None:
        self.max_hour = max_hour
        self.values = values


class DedupIndex:
    def __init__(self, directory: Path, horizon_ms: int, *, epoch: int | None = None) -> None:
        """``epoch`` (fenced processors, decision 090): files this index
        appends to are named ``p<N>-<hour>.e<epoch>.u64``, so a stale owner
        of the directory (a lower epoch) never appends to the current
        owner's files. ``load`` then reads other epochs' files only up to
        their checkpointed lengths, never truncates them, and removes only
        unknown files of lower epochs."""
        self.directory = directory
        self.epoch = epoch
        self._tag = "" if epoch is None else f".e{epoch}"
        self.horizon_hours = -(-horizon_ms // HOUR_MS) + 1
        directory.mkdir(parents=True, exist_ok=True)
        self._chunks: dict[int, list[_Chunk]] = {}
        self._lengths: dict[str, int] = {}
        self._unsynced: set[Path] = set()

    # -- persistence -------------------------------------------------------
    def load(self, lengths: dict[str, int]) -> None:
        """Restore exactly the committed state: files are cut back to the
        checkpointed lengths; files the checkpoint does not know are removed."""
        self._chunks = {}
        self._lengths = {}
        for path in sorted(self.directory.glob("p*-*.u64")):
            length = lengths.get(path.name, 0)
            owned = self.epoch is None or _epoch(path.name) == self.epoch
            if length == 0:
                if owned or _epoch(path.name) < (self.epoch or 0):
                    path.unlink(missing_ok=True)
                continue
            if owned:
                with open(path, "r+b") as handle:
                    handle.truncate(length)
            partition, hour = _parse_name(path.name)
            values = np.fromfile(path, dtype="<u8", count=length // 8)
            self._add_chunk(partition, hour, np.sort(values))
            self._lengths[path.name] = length

    def lengths(self) -> dict[str, int]:
        return dict(self._lengths)

    def sync(self) -> None:
        """fsync every file written with ``add(..., sync=False)``."""
        for path in self._unsynced:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # expired meanwhile
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced.clear()

    # -- lookups -----------------------------------------------------------
    def first_unseen(self, partition: int, hashes: np.ndarray) -> np.ndarray:
        """Boolean mask: True where the hash is neither in the index nor
        earlier in ``hashes`` (the first of in-batch duplicates wins)."""
        keep = np.zeros(len(hashes), dtype=bool)
        if len(hashes) == 0:
            return keep
        _, first_index = np.unique(hashes, return_index=True)
        keep[first_index] = True
        for chunk in self._chunks.get(partition, ()):
            values = chunk.values
            position = np.searchsorted(values, hashes)
            position[position == len(values)] = len(values) - 1
            keep &= values[position] != hashes
        return keep

    def add(
        self, partition: int, hashes: np.ndarray, received_at_ms: np.ndarray, *, sync: bool = True
    ) -> None:
        """Record ``hashes`` in memory and on disk. With ``sync`` the files
        are fsynced now; else ``sync()`` must run before the lengths are
        checkpointed (the processor batches many cycles into one checkpoint)."""
        if len(hashes) == 0:
            return
        hours = received_at_ms // HOUR_MS
        for hour in np.unique(hours):
            selected = np.ascontiguousarray(hashes[hours == hour], dtype="<u8")
            name = f"p{partition}-{int(hour)}{self._tag}.u64"
            path = self.directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, selected.tobytes())
                if sync:
                    os.fsync(fd)
                else:
                    self._unsynced.add(path)
            finally:
                os.close(fd)
            self._lengths[name] = self._lengths.get(name, 0) + selected.nbytes
            self._add_chunk(partition, int(hour), np.sort(selected))

    def expire(self, now_ms: int) -> None:
        cutoff = now_ms // HOUR_MS - self.horizon_hours
        for partition, chunks in self._chunks.items():
            self._chunks[partition] = [c for c in chunks if c.max_hour >= cutoff]
        for name in list(self._lengths):
            if _parse_name(name)[1] < cutoff:
                del self._lengths[name]
                (self.directory / name).unlink(missing_ok=True)

    def size(self) -> int:
        return sum(len(c.values) for chunks in self._chunks.values() for c in chunks)

    def _add_chunk(self, partition: int, hour: int, values: np.ndarray) -> None:
        chunks = self._chunks.setdefault(partition, [])
        chunks.append(_Chunk(hour, values))
        # Keep chunk sizes geometric so a partition has O(log n) chunks.
        while len(chunks) >= 2 and len(chunks[-2].values) <= 2 * len(chunks[-1].values):
            newer = chunks.pop()
            older = chunks.pop()
            merged = np.concatenate([older.values, newer.values])
            merged.sort()
            chunks.append(_Chunk(max(older.max_hour, newer.max_hour), merged))


def _parse_name(name: str) -> tuple[int, int]:
    partition, hour = name[1:-4].split("-")
    return int(partition), int(hour.split(".")[0])


def _epoch(name: str) -> int:
    """The writer epoch in ``p<N>-<hour>.e<epoch>.u64``; 0 when untagged."""
    _, _, tag = name[:-4].partition(".e")
    return int(tag) if tag else 0
