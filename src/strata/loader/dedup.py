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
* **Hot** slots, those within ``hot_window`` of the newest slot seen in the
  partition, are in memory (sorted numpy arrays, merged LSM-style). Every
  lookup checks all hot slots of its partition, whatever its ``ts``: this
  also catches retries of events whose ``ts`` is their receive time (no or
  clamped client timestamp) within the hot window.
* **Cold** slots are spilled to an immutable sorted *run* file with only
  every ``BLOCK``-th value (the fences) in memory. A lookup whose own slot,
  or a slot within ``TOLERANCE_MS`` of its ``ts``, is cold reads the few
  4 KiB blocks it needs with ``os.pread`` (not mmap: mapped pages count in
  RSS). Ids that reach a cold slot later (late events) are kept in a small
  in-memory tail until the run is rewritten (``TAIL_BUDGET``).
* Durability, as before: append-only files whose lengths the caller's
  checkpoint records (``lengths()``); ``load`` cuts them back to it, so the
  index always matches the committed offsets. Ids of the two newest slots
  go to ``p<N>-m<minute>[.e<epoch>].u64`` (uint64 hashes of that slot); all
  older ones (late events) to one journal per receive hour,
  ``p<N>-l<hour>[.e<epoch>].u64`` (12-byte records: hash, slot), so a batch
  costs a few fsyncs however widely its event times spread. Run files are
  derived: each records how many bytes of which append files it holds, and
  ``load`` rebuilds runs that are missing, torn or cover bytes the
  checkpoint does not.
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
import time
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
# Ids of cold slots held in memory (tails), per index, before runs are rewritten.
TAIL_BUDGET = 1 << 20
# In-memory chunks up to this many ids are merged on every add.
SMALL = 1 << 15

JOURNAL_RECORD = np.dtype([("hash", "<u8"), ("slot", "<u4")])
_RUN_MAGIC = b"STRDRUN2"
_RUN_HEADER = struct.Struct("<8sQQQ")  # magic, count, block, number of covered files
_RUN_REF = struct.Struct("<56sQ")  # append file name, bytes of it in the run
_NAME = re.compile(r"^p(\d+)-([ml]?)(\d+)(?:\.e(\d+))?\.u64$")
_RUN_NAME = re.compile(r"^p(\d+)-m(\d+)(?:\.e(\d+))?\.run(\.tmp)?$")


def hash_ids(ids: list[str]) -> np.ndarray:
    """Stable 64-bit hashes of ``ids`` (the same in every process and run)."""
    joined = b"".join(blake2b(i.encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(joined, dtype="<u8")


def _contains(values: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    position = np.searchsorted(values, hashes)
    position[position == len(values)] = len(values) - 1
    return values[position] == hashes


def _merge_sorted(parts: list[np.ndarray]) -> np.ndarray:
    """One sorted array of sorted ``parts`` (timsort merges the runs in
    linear time)."""
    merged = np.concatenate(parts) if parts else np.zeros(0, dtype="<u8")
    merged.sort(kind="stable")
    return merged


def _add_chunk(chunks: list[np.ndarray], values: np.ndarray) -> None:
    """Append a sorted array; keep chunk sizes geometric (O(log n) chunks),
    and small chunks merged (every lookup searches every chunk)."""
    chunks.append(values)
    while len(chunks) >= 2 and (
        len(chunks[-2]) <= 2 * len(chunks[-1]) or len(chunks[-2]) + len(chunks[-1]) <= SMALL
    ):
        newer = chunks.pop()
        chunks.append(_merge_sorted([chunks.pop(), newer]))


def _groups(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(key, indexes) for each distinct key, indexes in their original order."""
    if len(keys) == 0:
        return []
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(order)]
    return [
        (int(ordered[a]), order[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


class _Run:
    """An immutable sorted run file: header, covered files, fences, values.
    It holds exactly this slot's ids among the first ``coverage[name]``
    bytes of each listed append file."""

    __slots__ = ("count", "coverage", "fences", "path", "values_offset")

    def __init__(
        self, path: Path, coverage: dict[str, int], count: int, fences: np.ndarray
    ) -> None:
        self.path = path
        self.coverage = coverage
        self.count = count
        self.fences = fences
        self.values_offset = _RUN_HEADER.size + _RUN_REF.size * len(coverage) + 8 * len(fences)

    @classmethod
    def write(cls, path: Path, values: np.ndarray, coverage: dict[str, int]) -> _Run:
        """Write ``values`` (sorted) as a run, tmp + fsync + rename."""
        fences = values[::BLOCK].copy()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(_RUN_HEADER.pack(_RUN_MAGIC, len(values), BLOCK, len(coverage)))
            for name, covered in coverage.items():
                handle.write(_RUN_REF.pack(name.encode(), covered))
            handle.write(fences.tobytes())
            handle.write(np.ascontiguousarray(values, dtype="<u8").tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return cls(path, dict(coverage), len(values), fences)

    @classmethod
    def open(cls, path: Path) -> _Run | None:
        """The run at ``path`` if it is well-formed; None if it is missing or
        torn (its validity against the checkpoint is the caller's check)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            header = os.pread(fd, _RUN_HEADER.size, 0)
            if len(header) != _RUN_HEADER.size:
                return None
            magic, count, block, n_refs = _RUN_HEADER.unpack(header)
            n_fences = -(-count // BLOCK)
            refs_size = _RUN_REF.size * n_refs
            expected = _RUN_HEADER.size + refs_size + 8 * (n_fences + count)
            if magic != _RUN_MAGIC or block != BLOCK or os.fstat(fd).st_size != expected:
                return None
            refs = os.pread(fd, refs_size, _RUN_HEADER.size)
            coverage = {}
            for i in range(n_refs):
                name, covered = _RUN_REF.unpack_from(refs, i * _RUN_REF.size)
                coverage[name.rstrip(b"\0").decode()] = covered
            data = os.pread(fd, 8 * n_fences, _RUN_HEADER.size + refs_size)
            fences = np.frombuffer(data, dtype="<u8").copy()
        finally:
            os.close(fd)
        return cls(path, coverage, count, fences)

    def read_all(self) -> np.ndarray:
        return np.fromfile(self.path, dtype="<u8", count=self.count, offset=self.values_offset)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Membership of ``hashes``: one pread per distinct block needed."""
        found = np.zeros(len(hashes), dtype=bool)
        if self.count == 0 or len(hashes) == 0:
            return found
        blocks = np.searchsorted(self.fences, hashes, side="right") - 1
        candidates = np.flatnonzero(blocks >= 0)
        if len(candidates) == 0:
            return found
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for block, members in _groups(blocks[candidates]):
                n = min(BLOCK, self.count - block * BLOCK)
                data = os.pread(fd, 8 * n, self.values_offset + 8 * BLOCK * block)
                members = candidates[members]
                found[members] = _contains(np.frombuffer(data, dtype="<u8"), hashes[members])
        finally:
            os.close(fd)
        return found


class _Slot:
    """One (partition, minute) of the index: ids in ``run`` (on disk, cold
    slots) plus ``chunks`` (in memory: all ids when hot, the tail beyond the
    run when cold). ``files`` and ``journals`` are the append files holding
    its ids."""

    __slots__ = ("chunks", "files", "journals", "last_write_ms", "run")

    def __init__(self, last_write_ms: int = 0) -> None:
        self.last_write_ms = last_write_ms
        self.chunks: list[np.ndarray] = []
        self.files: list[str] = []
        self.journals: set[str] = set()
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
    __slots__ = ("_cold_keys", "cold", "hot", "legacy", "newest_slot")

    def __init__(self) -> None:
        self.newest_slot: int | None = None
        self.hot: dict[int, _Slot] = {}
        # Mutate only through set_cold/pop_cold: cold_keys() is cached.
        self.cold: dict[int, _Slot] = {}
        self._cold_keys: np.ndarray | None = None
        # Pre-094 files: (receive hour, name, sorted values).
        self.legacy: list[tuple[int, str, np.ndarray]] = []

    def get(self, slot: int) -> _Slot | None:
        return self.hot.get(slot) or self.cold.get(slot)

    def set_cold(self, number: int, slot: _Slot) -> None:
        self.cold[number] = slot
        self._cold_keys = None

    def pop_cold(self, number: int) -> _Slot:
        self._cold_keys = None
        return self.cold.pop(number)

    def cold_keys(self) -> np.ndarray:
        if self._cold_keys is None:
            keys = np.fromiter(self.cold, dtype=np.int64, count=len(self.cold))
            keys.sort()
            self._cold_keys = keys
        return self._cold_keys


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
        to carry ``.e<epoch>`` in their names, so a stale owner of the
        directory (a lower epoch) never appends to the current owner's files.
        ``load`` then reads other epochs' files only up to their checkpointed
        lengths, never truncates them, and removes only unknown files of
        lower epochs. Run files carry the reader's epoch too."""
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
        self._next_expire_ms = 0
        self._tails_added = 0

    # -- persistence -------------------------------------------------------
    def load(self, lengths: dict[str, int]) -> None:
        """Restore exactly the committed state: files are cut back to the
        checkpointed lengths; files the checkpoint does not know are removed.
        Runs that are missing, torn or hold ids beyond the checkpoint are
        rebuilt from the append files."""
        self._partitions = {}
        self._lengths = {}
        self._unsynced = set()
        slot_files: dict[int, dict[int, list[str]]] = {}
        journals: dict[int, list[tuple[int, str]]] = {}
        for path in sorted(self.directory.glob("p*-*.u64")):
            match = _NAME.match(path.name)
            if match is None:
                continue
            length = lengths.get(path.name, 0)
            epoch = int(match[4] or 0)
            owned = self.epoch is None or epoch == self.epoch
            if length == 0:
                if owned or epoch < (self.epoch or 0):
                    path.unlink(missing_ok=True)
                continue
            if owned and path.stat().st_size != length:
                with open(path, "r+b") as handle:
                    handle.truncate(length)
            self._lengths[path.name] = length
            partition, kind, number = int(match[1]), match[2], int(match[3])
            state = self._partitions.setdefault(partition, _Partition())
            if kind == "m":
                slot_files.setdefault(partition, {}).setdefault(number, []).append(path.name)
            elif kind == "l":
                journals.setdefault(partition, []).append((number, path.name))
            else:
                values = np.fromfile(path, dtype="<u8", count=length // 8)
                state.legacy.append((number, path.name, np.sort(values)))
        now = int(time.time() * 1000)
        for partition, state in self._partitions.items():
            slots = slot_files.get(partition, {})
            if slots:
                state.newest_slot = max(slots)
            for number, names in slots.items():
                self._load_slot(partition, state, number, names, now)
            for _, name in journals.get(partition, []):
                self._load_journal(partition, state, name, now)
                self._tails_added = TAIL_BUDGET + 1  # recount: bound memory while loading
                self._flush_tails()
            for slot_number, slot in state.cold.items():
                if slot.run is None:
                    self._write_run(partition, slot_number, slot)
        self._remove_stray_runs()
        self._tails_added = TAIL_BUDGET + 1  # recount
        self._flush_tails()

    def _load_slot(
        self, partition: int, state: _Partition, slot_number: int, names: list[str], now: int
    ) -> None:
        slot = _Slot(max(self._mtime_ms(name) for name in names))
        slot.files = names
        if self._is_hot(state, slot_number):
            state.hot[slot_number] = slot
        else:
            state.set_cold(slot_number, slot)
            slot.run = self._open_run(partition, slot_number, now)
        for name in names:
            start = slot.run.coverage.get(name, 0) if slot.run is not None else 0
            end = self._lengths[name]
            if end > start:
                values = np.fromfile(
                    self.directory / name, dtype="<u8", count=(end - start) // 8, offset=start
                )
                _add_chunk(slot.chunks, np.sort(values))

    def _load_journal(self, partition: int, state: _Partition, name: str, now: int) -> None:
        length = self._lengths[name]
        records = np.fromfile(self.directory / name, dtype=JOURNAL_RECORD,
                              count=length // JOURNAL_RECORD.itemsize)
        written = self._mtime_ms(name)
        positions = np.arange(len(records), dtype=np.int64) * JOURNAL_RECORD.itemsize
        for slot_number, members in _groups(records["slot"].astype(np.int64)):
            slot = state.get(slot_number)
            if slot is None:
                slot = _Slot(written)
                if self._is_hot(state, slot_number):
                    state.hot[slot_number] = slot
                else:
                    state.set_cold(slot_number, slot)
                    slot.run = self._open_run(partition, slot_number, now)
            slot.journals.add(name)
            slot.last_write_ms = max(slot.last_write_ms, written)
            if slot.run is not None:
                members = members[positions[members] >= slot.run.coverage.get(name, 0)]
            if len(members):
                _add_chunk(slot.chunks, np.sort(records["hash"][members]))

    def _open_run(self, partition: int, slot_number: int, now: int) -> _Run | None:
        run = _Run.open(self._run_path(partition, slot_number))
        return run if run is not None and self._covers_only_committed(run, now) else None

    def _covers_only_committed(self, run: _Run, now: int) -> bool:
        """A run is usable iff every byte it covers is committed. A journal
        that expired since (older than the horizon) may be gone."""
        for name, covered in run.coverage.items():
            length = self._lengths.get(name)
            if length is None:
                match = _NAME.match(name)
                if match and match[2] == "l" and self._journal_expired(int(match[3]), now):
                    continue
                return False
            if covered > length:
                return False
        return True

    def _journal_expired(self, hour: int, now_ms: int) -> bool:
        return (hour + 1) * HOUR_MS <= now_ms - self.horizon_ms

    def _mtime_ms(self, name: str) -> int:
        # The last write is not recorded; the mtime is at or after it, so
        # expiry after a restart is never early.
        return (self.directory / name).stat().st_mtime_ns // 1_000_000

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
        # Lookups of the distinct hashes in sorted order: binary searches
        # of sorted needles walk each chunk forward (cache-friendly).
        distinct, first_index = np.unique(hashes, return_index=True)
        state = self._partitions.get(partition)
        if state is None:
            keep[first_index] = True
            return keep
        unseen = np.ones(len(distinct), dtype=bool)
        for slot in state.hot.values():
            for chunk in slot.chunks:
                unseen &= ~_contains(chunk, distinct)
        for _, _, values in state.legacy:
            unseen &= ~_contains(values, distinct)
        if state.cold:
            event = np.asarray(event_ms, dtype=np.int64)[first_index]
            self._check_cold(state, distinct, event, unseen)
        keep[first_index[unseen]] = True
        return keep

    def _check_cold(
        self, state: _Partition, hashes: np.ndarray, event_ms: np.ndarray, keep: np.ndarray
    ) -> None:
        cold_slots = state.cold_keys()
        indexes: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        own = event_ms // SLOT_MS
        for offset in (0, -TOLERANCE_MS, TOLERANCE_MS):
            slot = own if offset == 0 else (event_ms + offset) // SLOT_MS
            wanted = keep & _contains(cold_slots, slot)
            if offset:
                wanted &= slot != own
            selected = np.flatnonzero(wanted)
            indexes.append(selected)
            slots.append(slot[selected])
        index = np.concatenate(indexes)
        if len(index) == 0:
            return
        for slot_number, members in _groups(np.concatenate(slots)):
            members = index[members]
            members = members[keep[members]]
            if len(members):
                keep[members[state.cold[slot_number].contains(hashes[members])]] = False

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
        hashes = np.ascontiguousarray(hashes, dtype="<u8")
        slots = np.asarray(event_ms, dtype=np.int64) // SLOT_MS
        received = np.asarray(received_ms, dtype=np.int64)
        top = int(slots.max())
        if state.newest_slot is None or top > state.newest_slot:
            state.newest_slot = top
        late: list[np.ndarray] = []
        for slot_number, members in _groups(slots):
            slot = state.get(slot_number)
            if slot is None:
                slot = _Slot()
                if self._is_hot(state, slot_number):
                    state.hot[slot_number] = slot
                else:
                    state.set_cold(slot_number, slot)
            values = hashes[members]
            if slot_number >= state.newest_slot - 1:
                name = f"p{partition}-m{slot_number}{self._tag}.u64"
                self._append(name, values.tobytes(), sync)
                if name not in slot.files:
                    slot.files.append(name)
            else:
                late.append(members)
            slot.last_write_ms = max(slot.last_write_ms, int(received[members].max()))
            _add_chunk(slot.chunks, np.sort(values))
            if slot.run is not None or slot_number in state.cold:
                self._tails_added += len(values)
        if late:
            members = np.concatenate(late)
            for hour, in_hour in _groups(received[members] // HOUR_MS):
                chosen = members[in_hour]
                records = np.empty(len(chosen), dtype=JOURNAL_RECORD)
                records["hash"] = hashes[chosen]
                records["slot"] = slots[chosen]
                name = f"p{partition}-l{hour}{self._tag}.u64"
                self._append(name, records.tobytes(), sync)
                for slot_number in np.unique(slots[chosen]).tolist():
                    slot = state.get(slot_number)
                    assert slot is not None
                    slot.journals.add(name)
        self._spill(partition, state)
        self._flush_tails()

    def _append(self, name: str, data: bytes, sync: bool) -> None:
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
            if sync:
                os.fsync(fd)
            else:
                self._unsynced.add(path)
        finally:
            os.close(fd)
        self._lengths[name] = self._lengths.get(name, 0) + len(data)

    def _is_hot(self, state: _Partition, slot: int) -> bool:
        return state.newest_slot is not None and slot >= state.newest_slot - self.hot_slots

    def _spill(self, partition: int, state: _Partition) -> None:
        """Slots that fell out of the hot window become runs on disk."""
        for slot_number in [s for s in state.hot if not self._is_hot(state, s)]:
            slot = state.hot.pop(slot_number)
            self._write_run(partition, slot_number, slot)
            state.set_cold(slot_number, slot)

    def _write_run(self, partition: int, slot_number: int, slot: _Slot) -> None:
        """Merge the slot's run (if any) and in-memory ids into a new run
        covering all of its append files' current bytes."""
        parts = list(slot.chunks)
        if slot.run is not None:
            parts.append(slot.run.read_all())
        values = _merge_sorted(parts)
        names = [*slot.files, *sorted(slot.journals)]
        coverage = {name: self._lengths[name] for name in names if name in self._lengths}
        slot.run = _Run.write(self._run_path(partition, slot_number), values, coverage)
        slot.chunks = []

    def _flush_tails(self) -> None:
        """Keep ids of cold slots in memory under ``TAIL_BUDGET``: the
        largest tails are merged into their runs until half is left.
        ``_tails_added`` (never less than the true total) spares the scan."""
        if self._tails_added <= TAIL_BUDGET:
            return
        tails = [
            (slot.in_memory(), partition, number, slot)
            for partition, state in self._partitions.items()
            for number, slot in state.cold.items()
            if slot.chunks
        ]
        total = sum(t[0] for t in tails)
        self._tails_added = total
        if total <= TAIL_BUDGET:
            return
        for size, partition, number, slot in sorted(tails, key=lambda t: t[0], reverse=True):
            if total <= TAIL_BUDGET // 2:
                break
            total -= size
            self._write_run(partition, number, slot)
        self._tails_added = total

    def expire(self, now_ms: int) -> None:
        """Forget slots whose last write is older than the horizon, journals
        whose receive hour is, and pre-094 files older than the horizon by
        their receive hour. Runs at most once per ``SLOT_MS`` of ``now_ms``:
        callers call it every batch, and expiring up to a slot late never
        forgets an id early."""
        if now_ms < self._next_expire_ms:
            return
        self._next_expire_ms = now_ms + SLOT_MS
        cutoff = now_ms - self.horizon_ms
        cutoff_hour = now_ms // HOUR_MS - self.horizon_hours
        for partition, state in list(self._partitions.items()):
            for group in (state.hot, state.cold):
                for number in [n for n, s in group.items() if s.last_write_ms < cutoff]:
                    slot = state.pop_cold(number) if group is state.cold else group.pop(number)
                    for name in slot.files:
                        self._remove(name)
                    self._run_path(partition, number).unlink(missing_ok=True)
            for hour, name, _ in state.legacy:
                if hour < cutoff_hour:
                    self._remove(name)
            state.legacy = [entry for entry in state.legacy if entry[0] >= cutoff_hour]
            if not (state.hot or state.cold or state.legacy):
                del self._partitions[partition]
        for name in list(self._lengths):
            match = _NAME.match(name)
            if match and match[2] == "l" and self._journal_expired(int(match[3]), now_ms):
                self._remove(name)

    def _remove(self, name: str) -> None:
        self._lengths.pop(name, None)
        (self.directory / name).unlink(missing_ok=True)

    # -- introspection -----------------------------------------------------
    def size(self) -> int:
        """Hashes held in memory: hot slots, tails of cold slots, fences and
        pre-094 files. Cold runs on disk do not count."""
        total = 0
        for state in self._partitions.values():
            for group in (state.hot, state.cold):
                for slot in group.values():
                    total += slot.in_memory()
                    if slot.run is not None:
                        total += len(slot.run.fences)
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
    def _run_path(self, partition: int, slot: int) -> Path:
        return self.directory / f"p{partition}-m{slot}{self._tag}.run"

    def _remove_stray_runs(self) -> None:
        """Remove this reader's runs of slots that are not cold (or leftover
        temporary files), and runs of lower reader epochs."""
        mine = self.epoch or 0
        for path in self.directory.glob("p*.run*"):
            match = _RUN_NAME.match(path.name)
            if match is None:
                continue
            reader = int(match[3] or 0)
            if reader < mine:
                path.unlink(missing_ok=True)
            elif reader == mine:
                state = self._partitions.get(int(match[1]))
                slot = state.cold.get(int(match[2])) if state is not None else None
                if match[4] or slot is None or slot.run is None:
                    path.unlink(missing_ok=True)
