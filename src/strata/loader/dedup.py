"""Event-id deduplication across client retries, per log partition.

A client that got no answer retries with the same event_ids; the retry lands
in the same partition as its original (strata.events.partition_for), so one
index per partition suffices. The index holds 64-bit BLAKE2b hashes of the
ids seen within the horizon (``loader.dedup_horizon``, at least 24 h).
Memory is bounded by the event-time locality of retries (decision 094): a
retry carries the same event_id and the same client ``timestamp`` as its
original, so its event time ``ts`` differs from the original's only by the
difference in network delay.

* Ids are bucketed by (partition, event-time minute): one **slot** per
  ``SLOT_MS`` of ``ts``.
* Durability, as before: one append-only file of little-endian uint64 per
  (partition, slot), ``p<N>-m<minute>[.e<epoch>].u64``. The caller's
  checkpoint records each file's length (``lengths()``), and ``load`` cuts
  files back to it, so the index always matches the committed offsets.
* **Hot** slots, those within ``hot_window`` of the newest slot seen in the
  partition, are in memory (sorted numpy arrays, merged LSM-style). Every
  lookup checks all hot slots of its partition, whatever its ``ts``: this
  also catches retries of events whose ``ts`` is their receive time (no or
  clamped client timestamp) within the hot window.
* **Cold** slots are spilled to an immutable sorted *run* file (derived from
  the append file, rebuilt at load when missing or stale) with only every
  ``BLOCK``-th value (the fences) in memory. A lookup whose own slot, or a
  slot within ``TOLERANCE_MS`` of its ``ts``, is cold reads the few 4 KiB
  blocks it needs with ``os.pread`` (not mmap: mapped pages count in RSS).
  Ids added to a cold slot later (late events) are appended to its file and
  kept in a small in-memory tail until the run is rewritten.
* A slot expires when its last write (receive time) is older than the
  horizon, so an id is remembered at least ``dedup_horizon`` after it was
  last seen (docs/semantics.md says what is and is not guaranteed).

Files of the pre-094 layout (``p<N>-<hour>.u64``, bucketed by receive hour,
no event time) still load: they are kept in memory and checked by every
lookup until they expire by their hour, as before.

A 64-bit hash collision between two different ids (probability about
n^2 / 2^65 for n ids in the horizon) drops the later one.
"""

from __future__ import annotations

import os
import re
import struct
from hashlib import blake2b
from pathlib import Path

import numpy as np

HOUR_MS = 3_600_000
# Event-time width of a slot: the unit of spilling, expiry and cold reads.
SLOT_MS = 60_000
# A cold lookup also reads the slots within this distance of its ts: a retry
# with a client timestamp differs from its original by the network delay.
TOLERANCE_MS = 60_000
DEFAULT_HOT_WINDOW_MS = 300_000
# Values per fence: one 4 KiB pread per cold lookup, 1/512 of a run in memory.
BLOCK = 512
# Late ids of cold slots held in memory, per index, before runs are rewritten.
TAIL_BUDGET = 1 << 20

_RUN_MAGIC = b"STRDRUN1"
_RUN_HEADER = struct.Struct("<8sQQQ")  # magic, covered bytes, count, block
_NAME = re.compile(r"^p(\d+)-(m?)(\d+)(?:\.e(\d+))?\.u64$")
_RUN_NAME = re.compile(r"^(p\d+-m?\d+(?:\.e\d+)?\.u64)(?:\.e(\d+))?\.run(\.tmp)?$")


def hash_ids(ids: list[str]) -> np.ndarray:
    """Stable 64-bit hashes of ``ids`` (the same in every process and run)."""
    joined = b"".join(blake2b(i.encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(joined, dtype="<u8")


def _contains(values: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    position = np.searchsorted(values, hashes)
    position[position == len(values)] = len(values) - 1
    return values[position] == hashes


def _add_chunk(chunks: list[np.ndarray], values: np.ndarray) -> None:
    """Append a sorted array; keep chunk sizes geometric (O(log n) chunks)."""
    chunks.append(values)
    while len(chunks) >= 2 and len(chunks[-2]) <= 2 * len(chunks[-1]):
        newer = chunks.pop()
        older = chunks.pop()
        merged = np.concatenate([older, newer])
        merged.sort()
        chunks.append(merged)


class _Run:
    """An immutable sorted run file: header, fences, values. It holds exactly
    the first ``covered`` bytes of its append file, sorted."""

    __slots__ = ("count", "covered", "fences", "path", "values_offset")

    def __init__(self, path: Path, covered: int, count: int, fences: np.ndarray) -> None:
        self.path = path
        self.covered = covered
        self.count = count
        self.fences = fences
        self.values_offset = _RUN_HEADER.size + 8 * len(fences)

    @classmethod
    def write(cls, path: Path, values: np.ndarray, covered: int) -> _Run:
        """Write ``values`` (sorted) as a run, tmp + fsync + rename."""
        fences = values[::BLOCK].copy()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(_RUN_HEADER.pack(_RUN_MAGIC, covered, len(values), BLOCK))
            handle.write(fences.tobytes())
            handle.write(np.ascontiguousarray(values, dtype="<u8").tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return cls(path, covered, len(values), fences)

    @classmethod
    def open(cls, path: Path, max_covered: int) -> _Run | None:
        """The run at ``path`` if it is well-formed and covers at most
        ``max_covered`` bytes; None if it is missing or unusable."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            header = os.pread(fd, _RUN_HEADER.size, 0)
            if len(header) != _RUN_HEADER.size:
                return None
            magic, covered, count, block = _RUN_HEADER.unpack(header)
            n_fences = -(-count // BLOCK)
            expected = _RUN_HEADER.size + 8 * (n_fences + count)
            if (magic != _RUN_MAGIC or block != BLOCK or covered != 8 * count
                    or covered > max_covered or os.fstat(fd).st_size != expected):
                return None
            fences = np.frombuffer(os.pread(fd, 8 * n_fences, _RUN_HEADER.size), dtype="<u8")
        finally:
            os.close(fd)
        return cls(path, covered, count, fences.copy())

    def read_all(self) -> np.ndarray:
        return np.fromfile(self.path, dtype="<u8", count=self.count, offset=self.values_offset)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Membership of ``hashes``: one pread per distinct block needed."""
        found = np.zeros(len(hashes), dtype=bool)
        if self.count == 0 or len(hashes) == 0:
            return found
        blocks = np.searchsorted(self.fences, hashes, side="right") - 1
        candidates = np.nonzero(blocks >= 0)[0]
        if len(candidates) == 0:
            return found
        order = candidates[np.argsort(blocks[candidates], kind="stable")]
        sorted_blocks = blocks[order]
        starts = np.flatnonzero(np.r_[True, sorted_blocks[1:] != sorted_blocks[:-1]])
        ends = np.r_[starts[1:], len(order)]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
                block = int(sorted_blocks[start])
                n = min(BLOCK, self.count - block * BLOCK)
                data = os.pread(fd, 8 * n, self.values_offset + 8 * BLOCK * block)
                values = np.frombuffer(data, dtype="<u8")
                members = order[start:end]
                found[members] = _contains(values, hashes[members])
        finally:
            os.close(fd)
        return found


class _File:
    """One append file of a slot (a slot has one per writer epoch): its ids
    are ``run`` (on disk, when cold) plus ``chunks`` (in memory: all of them
    when hot, the tail beyond the run when cold)."""

    __slots__ = ("chunks", "last_write_ms", "name", "run")

    def __init__(self, name: str, last_write_ms: int) -> None:
        self.name = name
        self.last_write_ms = last_write_ms
        self.chunks: list[np.ndarray] = []
        self.run: _Run | None = None

    def in_memory(self) -> int:
        return sum(len(c) for c in self.chunks)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for chunk in self.chunks:
            found |= _contains(chunk, hashes)
        if self.run is not None:
            rest = np.flatnonzero(~found)
            if len(rest):
                found[rest] = self.run.contains(hashes[rest])
        return found


class _Partition:
    __slots__ = ("cold", "hot", "legacy", "newest_slot")

    def __init__(self) -> None:
        self.newest_slot: int | None = None
        self.hot: dict[int, list[_File]] = {}
        self.cold: dict[int, list[_File]] = {}
        # Pre-094 files: (receive hour, name, sorted values).
        self.legacy: list[tuple[int, str, np.ndarray]] = []


class DedupIndex:
    def __init__(
        self,
        directory: Path,
        horizon_ms: int,
        *,
        hot_window_ms: int = DEFAULT_HOT_WINDOW_MS,
        epoch: int | None = None,
    ) -> None:
        """``hot_window_ms`` (``loader.dedup_hot_window``): how far behind the
        newest event time of a partition its slots stay in memory.

        ``epoch`` (fenced processors, decision 090): files this index appends
        to are named ``p<N>-m<minute>.e<epoch>.u64``, so a stale owner of the
        directory (a lower epoch) never appends to the current owner's files.
        ``load`` then reads other epochs' files only up to their checkpointed
        lengths, never truncates them, and removes only unknown files of
        lower epochs. Run files carry the reader's epoch too
        (``<append file>.e<epoch>.run``)."""
        self.directory = directory
        self.epoch = epoch
        self.horizon_ms = horizon_ms
        self._tag = "" if epoch is None else f".e{epoch}"
        self.horizon_hours = -(-horizon_ms // HOUR_MS) + 1
        self.hot_slots = max(1, -(-hot_window_ms // SLOT_MS))
        directory.mkdir(parents=True, exist_ok=True)
        self._partitions: dict[int, _Partition] = {}
        self._lengths: dict[str, int] = {}
        self._unsynced: set[Path] = set()

    # -- persistence -------------------------------------------------------
    def load(self, lengths: dict[str, int]) -> None:
        """Restore exactly the committed state: files are cut back to the
        checkpointed lengths; files the checkpoint does not know are removed.
        Run files are derived: a run of a file that had to be cut back is
        removed first, and missing or unusable runs are rebuilt."""
        self._partitions = {}
        self._lengths = {}
        self._unsynced = set()
        found: dict[int, list[tuple[int, str, int]]] = {}
        for path in sorted(self.directory.glob("p*-*.u64")):
            match = _NAME.match(path.name)
            if match is None:
                continue
            length = lengths.get(path.name, 0)
            epoch = int(match[4] or 0)
            owned = self.epoch is None or epoch == self.epoch
            if length == 0:
                if owned or epoch < (self.epoch or 0):
                    self._run_path(path.name).unlink(missing_ok=True)
                    path.unlink(missing_ok=True)
                continue
            if owned and path.stat().st_size != length:
                # A crash between append and checkpoint: the run may hold ids
                # beyond the checkpoint, so it goes before the cut.
                self._run_path(path.name).unlink(missing_ok=True)
                with open(path, "r+b") as handle:
                    handle.truncate(length)
            self._lengths[path.name] = length
            partition, number = int(match[1]), int(match[3])
            state = self._partitions.setdefault(partition, _Partition())
            if not match[2]:
                values = np.fromfile(path, dtype="<u8", count=length // 8)
                state.legacy.append((number, path.name, np.sort(values)))
                continue
            found.setdefault(partition, []).append((number, path.name, length))
        for partition, files in found.items():
            state = self._partitions[partition]
            state.newest_slot = max(slot for slot, _, _ in files)
            for slot, name, length in files:
                path = self.directory / name
                # The last write is not recorded; the file's mtime is at or
                # after it, so expiry after a restart is never early.
                file = _File(name, path.stat().st_mtime_ns // 1_000_000)
                if self._is_hot(state, slot):
                    values = np.fromfile(path, dtype="<u8", count=length // 8)
                    file.chunks = [np.sort(values)]
                    state.hot.setdefault(slot, []).append(file)
                    continue
                file.run = _Run.open(self._run_path(name), length)
                if file.run is None:
                    values = np.fromfile(path, dtype="<u8", count=length // 8)
                    values.sort()
                    file.run = _Run.write(self._run_path(name), values, length)
                    del values
                elif file.run.covered < length:
                    covered = file.run.covered
                    tail = np.fromfile(path, dtype="<u8", count=(length - covered) // 8,
                                       offset=covered)
                    file.chunks = [np.sort(tail)]
                state.cold.setdefault(slot, []).append(file)
        self._remove_stray_runs()
        self._flush_tails()

    def lengths(self) -> dict[str, int]:
        """Append-file lengths to checkpoint (run files are not part of it)."""
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
    def first_unseen(self, partition: int, hashes: np.ndarray, event_ms: np.ndarray) -> np.ndarray:
        """Boolean mask: True where the hash is neither in the index nor
        earlier in ``hashes`` (the first of in-batch duplicates wins).

        ``event_ms`` (event time of each id, epoch ms) selects the cold slots
        to read: the id's own slot and those within ``TOLERANCE_MS``. Hot
        slots and pre-094 files are always checked. Answers depend only on
        the index's contents, so replays after a crash decide the same."""
        keep = np.zeros(len(hashes), dtype=bool)
        if len(hashes) == 0:
            return keep
        _, first_index = np.unique(hashes, return_index=True)
        keep[first_index] = True
        state = self._partitions.get(partition)
        if state is None:
            return keep
        for files in state.hot.values():
            for file in files:
                for chunk in file.chunks:
                    keep &= ~_contains(chunk, hashes)
        for _, _, values in state.legacy:
            keep &= ~_contains(values, hashes)
        if state.cold:
            self._check_cold(state, hashes, np.asarray(event_ms, dtype=np.int64), keep)
        return keep

    def _check_cold(
        self, state: _Partition, hashes: np.ndarray, event_ms: np.ndarray, keep: np.ndarray
    ) -> None:
        cold_slots = np.fromiter(state.cold.keys(), dtype=np.int64, count=len(state.cold))
        indexes: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        previous: np.ndarray | None = None
        for offset in (0, -TOLERANCE_MS, TOLERANCE_MS):
            slot = (event_ms + offset) // SLOT_MS
            wanted = keep & np.isin(slot, cold_slots)
            if previous is not None:
                wanted &= slot != previous
            if offset == 0:
                previous = slot
            selected = np.flatnonzero(wanted)
            indexes.append(selected)
            slots.append(slot[selected])
        index = np.concatenate(indexes)
        slot_of = np.concatenate(slots)
        if len(index) == 0:
            return
        order = np.argsort(slot_of, kind="stable")
        index, slot_of = index[order], slot_of[order]
        starts = np.flatnonzero(np.r_[True, slot_of[1:] != slot_of[:-1]])
        ends = np.r_[starts[1:], len(index)]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            members = index[start:end]
            for file in state.cold[int(slot_of[start])]:
                members = members[keep[members]]
                if len(members) == 0:
                    break
                keep[members[file.contains(hashes[members])]] = False

    # -- writes ------------------------------------------------------------
    def add(
        self,
        partition: int,
        hashes: np.ndarray,
        event_ms: np.ndarray,
        received_ms: np.ndarray,
        *,
        sync: bool = True,
    ) -> None:
        """Record ``hashes`` (event times ``event_ms``, received at
        ``received_ms``, epoch ms) in memory and on disk. With ``sync`` the
        files are fsynced now; else ``sync()`` must run before the lengths are
        checkpointed (the processor batches many cycles into one checkpoint)."""
        if len(hashes) == 0:
            return
        state = self._partitions.setdefault(partition, _Partition())
        slots = np.asarray(event_ms, dtype=np.int64) // SLOT_MS
        received = np.asarray(received_ms, dtype=np.int64)
        top = int(slots.max())
        if state.newest_slot is None or top > state.newest_slot:
            state.newest_slot = top
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            slot = int(sorted_slots[start])
            members = order[start:end]
            values = np.ascontiguousarray(hashes[members], dtype="<u8")
            file = self._writable(state, partition, slot)
            path = self.directory / file.name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, values.tobytes())
                if sync:
                    os.fsync(fd)
                else:
                    self._unsynced.add(path)
            finally:
                os.close(fd)
            self._lengths[file.name] = self._lengths.get(file.name, 0) + values.nbytes
            file.last_write_ms = max(file.last_write_ms, int(received[members].max()))
            _add_chunk(file.chunks, np.sort(values))
        self._spill(state)
        self._flush_tails()

    def _writable(self, state: _Partition, partition: int, slot: int) -> _File:
        name = f"p{partition}-m{slot}{self._tag}.u64"
        files = state.hot.get(slot)
        if files is None:
            files = state.cold.get(slot)
        if files is None:
            group = state.hot if self._is_hot(state, slot) else state.cold
            files = group.setdefault(slot, [])
        for file in files:
            if file.name == name:
                return file
        file = _File(name, 0)
        files.append(file)
        return file

    def _is_hot(self, state: _Partition, slot: int) -> bool:
        return state.newest_slot is not None and slot >= state.newest_slot - self.hot_slots

    def _spill(self, state: _Partition) -> None:
        """Slots that fell out of the hot window become runs on disk."""
        for slot in [s for s in state.hot if not self._is_hot(state, s)]:
            files = state.hot.pop(slot)
            for file in files:
                self._write_run(file)
            state.cold[slot] = files

    def _write_run(self, file: _File) -> None:
        """Merge the file's run (if any) and in-memory ids into a new run
        covering the whole file."""
        parts = list(file.chunks)
        if file.run is not None:
            parts.append(file.run.read_all())
        values = np.concatenate(parts) if parts else np.zeros(0, dtype="<u8")
        values.sort()
        file.run = _Run.write(self._run_path(file.name), values, self._lengths[file.name])
        file.chunks = []

    def _flush_tails(self) -> None:
        """Keep late ids of cold slots under ``TAIL_BUDGET``: the largest
        tails are merged into their runs until half the budget is left."""
        tails = [
            file
            for state in self._partitions.values()
            for files in state.cold.values()
            for file in files
            if file.chunks
        ]
        total = sum(file.in_memory() for file in tails)
        if total <= TAIL_BUDGET:
            return
        for file in sorted(tails, key=_File.in_memory, reverse=True):
            if total <= TAIL_BUDGET // 2:
                break
            total -= file.in_memory()
            self._write_run(file)

    def expire(self, now_ms: int) -> None:
        """Forget slots whose last write is older than the horizon (and
        pre-094 files older than the horizon by their receive hour)."""
        cutoff = now_ms - self.horizon_ms
        cutoff_hour = now_ms // HOUR_MS - self.horizon_hours
        for partition, state in list(self._partitions.items()):
            for group in (state.hot, state.cold):
                for slot in list(group):
                    alive = []
                    for file in group[slot]:
                        if file.last_write_ms < cutoff:
                            self._remove(file.name)
                        else:
                            alive.append(file)
                    if alive:
                        group[slot] = alive
                    else:
                        del group[slot]
            for hour, name, _ in state.legacy:
                if hour < cutoff_hour:
                    self._remove(name)
            state.legacy = [entry for entry in state.legacy if entry[0] >= cutoff_hour]
            if not (state.hot or state.cold or state.legacy):
                del self._partitions[partition]

    def _remove(self, name: str) -> None:
        self._lengths.pop(name, None)
        self._run_path(name).unlink(missing_ok=True)
        (self.directory / name).unlink(missing_ok=True)

    # -- introspection -----------------------------------------------------
    def size(self) -> int:
        """Hashes held in memory: hot slots, tails of cold slots, fences and
        pre-094 files. Cold runs on disk do not count."""
        total = 0
        for state in self._partitions.values():
            for group in (state.hot, state.cold):
                for files in group.values():
                    for file in files:
                        total += file.in_memory()
                        if file.run is not None:
                            total += len(file.run.fences)
            total += sum(len(values) for _, _, values in state.legacy)
        return total

    def memory_bytes(self) -> int:
        """Bytes of hash arrays held in memory (``8 * size()``)."""
        return 8 * self.size()

    def hot_slots_of(self, partition: int) -> list[int]:
        """Slots (event-time minutes) of ``partition`` held in memory."""
        state = self._partitions.get(partition)
        return sorted(state.hot) if state is not None else []

    def cold_slots_of(self, partition: int) -> list[int]:
        """Slots of ``partition`` spilled to run files."""
        state = self._partitions.get(partition)
        return sorted(state.cold) if state is not None else []

    # -- files -------------------------------------------------------------
    def _run_path(self, name: str) -> Path:
        return self.directory / f"{name}{self._tag}.run"

    def _remove_stray_runs(self) -> None:
        """Remove run files this reader wrote for files it no longer has, and
        runs (or leftovers) of lower reader epochs."""
        mine = self.epoch or 0
        for path in self.directory.glob("p*.run*"):
            match = _RUN_NAME.match(path.name)
            if match is None:
                continue
            reader = int(match[2] or 0)
            if reader < mine or (reader == mine and (match[3] or match[1] not in self._lengths)):
                path.unlink(missing_ok=True)
