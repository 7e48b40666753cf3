"""In-process serving store (embedded shape): plain dicts under a lock,
shared by the processor thread and the query API of the core process."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from strata.serving.base import Fence, FencedError, ServingStore, WindowKey
from strata.serving.state import WindowState, decode_state, encode_state


class MemoryServingStore(ServingStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # metric -> window_start -> key -> encoded state. States are stored
        # encoded so a reader never sees an object the processor still mutates.
        self._windows: dict[str, dict[int, dict[WindowKey, bytes]]] = {}
        self._revised: dict[str, set[tuple[int, int]]] = {}
        self._progress: dict[str, dict[str, int]] = {}
        self._owners: dict[str, int] = {}  # shard -> owner epoch (kept by clear())

    def claim(self, shard: str) -> Fence:
        with self._lock:
            epoch = self._owners.get(shard, 0) + 1
            self._owners[shard] = epoch
        return Fence(shard, epoch)

    def check_fence(self, fence: Fence) -> None:
        with self._lock:
            self._check(fence)

    def _check(self, fence: Fence | None) -> None:
        # Called with the lock held, so the check and the write are atomic.
        if fence is not None:
            current = self._owners.get(fence.shard, 0)
            if current != fence.epoch:
                raise FencedError(fence, current)

    def put_windows(self, states: Sequence[WindowState], *, fence: Fence | None = None) -> None:
        encoded = [(s.key, encode_state(s)) for s in states]
        with self._lock:
            self._check(fence)
            for key, data in encoded:
                metric, _, start, _ = key
                self._windows.setdefault(metric, {}).setdefault(start, {})[key] = data

    def delete_windows(self, keys: Sequence[WindowKey], *, fence: Fence | None = None) -> None:
        with self._lock:
            self._check(fence)
            for key in keys:
                metric, _, start, _ = key
                by_start = self._windows.get(metric, {})
                groups = by_start.get(start)
                if groups is None:
                    continue
                groups.pop(key, None)
                if not groups:
                    del by_start[start]

    def windows(self, metric: str, start_ms: int, end_ms: int) -> list[WindowState]:
        with self._lock:
            found = [
                data
                for start, groups in self._windows.get(metric, {}).items()
                if start_ms <= start < end_ms
                for data in groups.values()
            ]
        states = [decode_state(d) for d in found]
        states.sort(key=lambda s: (s.window_start, s.shard, s.dims))
        return states

    def add_revised(
        self, metric: str, ranges: Sequence[tuple[int, int]], *, fence: Fence | None = None
    ) -> None:
        with self._lock:
            self._check(fence)
            self._revised.setdefault(metric, set()).update((int(a), int(b)) for a, b in ranges)

    def revised(self, metric: str, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
        with self._lock:
            ranges = list(self._revised.get(metric, ()))
        return sorted(r for r in ranges if r[0] < end_ms and r[1] > start_ms)

    def prune_revised(self, metric: str, before_ms: int) -> None:
        with self._lock:
            ranges = self._revised.get(metric)
            if ranges:
                self._revised[metric] = {r for r in ranges if r[0] >= before_ms}

    def set_progress(
        self, shard: str, watermarks: dict[str, int], *, fence: Fence | None = None
    ) -> None:
        with self._lock:
            self._check(fence)
            self._progress[shard] = dict(watermarks)

    def progress(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {shard: dict(w) for shard, w in self._progress.items()}

    def clear(self) -> None:
        with self._lock:
            self._windows.clear()
            self._revised.clear()
            self._progress.clear()

    def close(self) -> None:
        pass
