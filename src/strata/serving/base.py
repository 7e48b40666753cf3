"""The ServingStore interface: live windows for the query layer.

Two backends implement it and say nothing new: ``serving.memory`` (a dict
in the core process, embedded shape) and ``serving.redis`` (distributed
shape, several processor processes). Use ``strata.serving.open_serving``.

Contract:

* A window group is addressed by ``WindowState.key`` = (metric, shard,
  window_start, dims). ``shard`` names the processor that owns it (its
  partition set), so processors that split the partitions never overwrite
  each other; readers merge the shards' mergeable states.
* ``put_windows`` *replaces* each group's full state (idempotent SET, never
  an increment), so a processor replaying after a crash writes the same
  values again. ``delete_windows`` is idempotent too.
* ``add_revised`` records window ranges corrected by late data (a set:
  adding twice is a no-op); the query layer marks them and drops its cache.
* ``set_progress`` stores a shard's per-metric watermark (epoch ms); a
  metric is complete up to the minimum over shards.
* Readers see each ``put_windows`` call either fully or not at all per group;
  there is no cross-group transaction.

Fencing (decision 090): a writer that may be superseded (a consumer-group
processor owning one partition's shard) first calls ``claim(shard)``, which
atomically increments the shard's *owner epoch* and returns a ``Fence``.
Every write that passes ``fence=`` is applied only if the fence's epoch is
still the shard's current epoch, checked atomically with the write; else
nothing of that call is applied and ``FencedError`` is raised. Writes
without a fence (the embedded and static-shard processors, which have no
competing owner) are never checked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from strata.serving.state import WindowState

WindowKey = tuple[str, str, int, tuple[str, ...]]


class ServingError(Exception):
    """The serving store failed (connection lost, bad data)."""


@dataclass(frozen=True)
class Fence:
    """Ownership of ``shard`` at ``epoch``, as returned by ``claim``."""

    shard: str
    epoch: int


class FencedError(ServingError):
    """A fenced write was rejected: another owner claimed the shard since."""

    def __init__(self, fence: Fence, current: int) -> None:
        super().__init__(
            f"shard {fence.shard}: owner epoch {fence.epoch} was superseded by epoch {current}"
        )
        self.fence = fence
        self.current = current


class ServingStore(ABC):
    @abstractmethod
    def claim(self, shard: str) -> Fence:
        """Become the shard's owner: atomically increment its owner epoch and
        return the new one. Every earlier fence of the shard stops working."""

    @abstractmethod
    def check_fence(self, fence: Fence) -> None:
        """Raise ``FencedError`` if ``fence`` is no longer the shard's owner.
        (A check, not a lock: use it before side effects the store cannot fence.)"""

    @abstractmethod
    def put_windows(self, states: Sequence[WindowState], *, fence: Fence | None = None) -> None:
        """Replace the full state of every given group."""

    @abstractmethod
    def delete_windows(self, keys: Sequence[WindowKey], *, fence: Fence | None = None) -> None:
        """Forget these groups (evicted by the processor). Missing keys are fine."""

    @abstractmethod
    def windows(self, metric: str, start_ms: int, end_ms: int) -> list[WindowState]:
        """Every group of ``metric`` with ``start_ms <= window_start < end_ms``,
        all shards, ordered by (window_start, shard, dims)."""

    @abstractmethod
    def add_revised(
        self, metric: str, ranges: Sequence[tuple[int, int]], *, fence: Fence | None = None
    ) -> None:
        """Record ``[start, end)`` ranges revised by late events."""

    @abstractmethod
    def revised(self, metric: str, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
        """Recorded revised ranges overlapping ``[start_ms, end_ms)``, sorted."""

    @abstractmethod
    def prune_revised(self, metric: str, before_ms: int) -> None:
        """Forget the recorded revised ranges of ``metric`` that start before
        ``before_ms``: their windows are no longer held live, so no answer
        from the serving store covers them any more. Idempotent."""

    @abstractmethod
    def set_progress(
        self, shard: str, watermarks: dict[str, int], *, fence: Fence | None = None
    ) -> None:
        """Store the shard's watermark per metric (replaces the previous)."""

    @abstractmethod
    def progress(self) -> dict[str, dict[str, int]]:
        """shard -> metric -> watermark ms."""

    @abstractmethod
    def clear(self) -> None:
        """Remove every window, revised range and progress entry (tests,
        ``strata replay``). Owner epochs are kept, so a fence taken before
        never becomes current again."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""
