"""The Log interface: a durable, partitioned, append-only record log.

Two backends implement it and say nothing new: ``log.embedded`` (segment
files in the data directory) and ``log.kafka`` (Apache Kafka through
confluent-kafka). Nothing outside ``strata.log`` imports a backend; use
``strata.log.open_log(config)``.

Vocabulary (the words Kafka users already know):

* A *topic* has a fixed number of *partitions*, numbered from 0.
* Every record in a partition has an *offset*: 0, 1, 2, ... with no gaps
  for records that are still retained. Order is guaranteed only within a
  partition.
* The *end offset* of a partition is the offset the next appended record
  will get. The *beginning offset* is the oldest retained offset.
* A *committed offset* for a consumer group is the offset of the next record
  the group wants to read, i.e. "everything before it is done".
* A record's ``timestamp_ms`` is the log-append time (wall clock, ms since
  the epoch, UTC). It is what ``offset_for_time`` searches.

Durability: records handed to ``Producer.produce`` are buffered. They are
durable only once ``Producer.flush`` has returned without raising. Callers
acknowledge clients only after that (DESIGN.md, "Accepted means durable").
What "durable" means (fsync per flush, on an interval, or never) is the
backend's configured fsync policy; see docs/semantics.md.

Errors: every backend raises ``LogError`` (or a subclass) for failures the
caller should surface; ``LogFull`` when a configured size limit stops
appends (the ingest API answers 503 with Retry-After); ``OffsetOutOfRange``
when a read asks for an offset that retention already dropped or that lies
past the end.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field


class LogError(Exception):
    """A log operation failed; nothing partial is visible to readers."""


class LogFull(LogError):
    """An append was refused because a configured size limit was reached."""


class OffsetOutOfRange(LogError):
    """A read asked for an offset outside [beginning offset, end offset]."""


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes


@dataclass(slots=True)
class RecordBatch:
    """Consecutive records of one partition: offsets first_offset, first_offset+1, ..."""

    topic: str
    partition: int
    first_offset: int
    values: list[bytes]
    timestamps_ms: list[int]

    @property
    def last_offset(self) -> int:
        return self.first_offset + len(self.values) - 1


def merge_batches(
    batches: list[RecordBatch], into: dict[int, RecordBatch] | None = None
) -> dict[int, RecordBatch]:
    """One batch per partition: consecutive ``batches`` of a partition (in
    poll order) appended to a copy of its first one, or to ``into``'s."""
    merged = {} if into is None else into
    for batch in batches:
        have = merged.get(batch.partition)
        if have is None:
            merged[batch.partition] = RecordBatch(
                batch.topic,
                batch.partition,
                batch.first_offset,
                list(batch.values),
                list(batch.timestamps_ms),
            )
        else:
            have.values.extend(batch.values)
            have.timestamps_ms.extend(batch.timestamps_ms)
    return merged


@dataclass
class RetentionReport:
    """What one retention pass removed, per topic and partition."""

    deleted_segments: int = 0
    deleted_records: int = 0
    deleted_bytes: int = 0
    # Records removed although some consumer group had not committed past
    # them. Only possible when the operator allowed it explicitly.
    dropped_uncommitted_records: int = 0
    details: list[str] = field(default_factory=list)


class Producer(ABC):
    """Appends records. Not thread-safe: one producer per thread."""

    @abstractmethod
    def produce(self, topic: str, partition: int, key: bytes | None, value: bytes) -> None:
        """Buffer one record for ``partition`` of ``topic``.

        The record is not durable and not visible to readers until ``flush``
        returns. Records produced to one partition keep their order.
        """

    def produce_many(
        self, topic: str, partition: int, records: Sequence[tuple[bytes | None, bytes]]
    ) -> None:
        """Buffer several records for one partition, in order."""
        for key, value in records:
            self.produce(topic, partition, key, value)

    @abstractmethod
    def flush(self) -> None:
        """Make every buffered record durable and visible, or raise.

        On success all buffered records are appended in order, under the
        backend's fsync policy. On failure (``LogError``/``LogFull``) none of
        the records of the failed flush may be acknowledged to clients; the
        buffer is cleared, and a client retry re-sends them. Several
        producers in several processes may append to the same partition
        concurrently; each flush is one group commit.
        """

    @abstractmethod
    def close(self) -> None:
        """Flush and release resources."""


class Consumer(ABC):
    """Reads records of one topic for one consumer group.

    The *position* of a partition is the offset of the next record ``poll``
    returns for it. Positions start at the group's committed offset, or at
    the beginning offset when the group has none. ``seek`` moves a position.
    ``commit`` stores offsets durably for the group; it does not move
    positions. Records come back in offset order per partition. A consumer is
    not thread-safe.
    """

    @abstractmethod
    def assign(self, partitions: Sequence[int]) -> None:
        """Read exactly these partitions (static assignment)."""

    @abstractmethod
    def assignment(self) -> list[int]:
        """The partitions this consumer currently reads."""

    @abstractmethod
    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[Record]:
        """Return up to ``max_records`` records from the assigned partitions.

        Waits up to ``timeout_s`` when nothing is available; returns an empty
        list on timeout. Advances the positions past the returned records.
        """

    def poll_batches(self, max_records: int, timeout_s: float = 0.0) -> list[RecordBatch]:
        """Like ``poll``, but grouped into runs of consecutive offsets per
        partition, values only. Backends override it with a faster path."""
        batches: list[RecordBatch] = []
        for record in self.poll(max_records, timeout_s):
            last = batches[-1] if batches else None
            if (
                last is not None
                and last.partition == record.partition
                and last.last_offset + 1 == record.offset
            ):
                last.values.append(record.value)
                last.timestamps_ms.append(record.timestamp_ms)
            else:
                batches.append(
                    RecordBatch(
                        record.topic,
                        record.partition,
                        record.offset,
                        [record.value],
                        [record.timestamp_ms],
                    )
                )
        return batches

    def read_ranges(
        self,
        ranges: dict[int, tuple[int, int]],
        *,
        resume_at: dict[int, int],
        max_records: int = 100_000,
        timeout_s: float = 120.0,
    ) -> dict[int, RecordBatch]:
        """Read again exactly the records ``first..last`` (inclusive) of each
        partition in ``ranges``: what a consumer re-executing a checkpointed
        plan after a crash needs. Afterwards every assigned partition is
        positioned where its owner resumes: ``last + 1`` for the planned
        partitions, ``resume_at[p]`` (default 0) for the others, since
        polling advanced them too. Raises ``LogError`` if a range is not
        readable within ``timeout_s``."""
        for partition, (first, _) in ranges.items():
            self.seek(partition, first)
        collected: dict[int, RecordBatch] = {}
        remaining = dict(ranges)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise LogError(f"planned range {remaining} is no longer readable")
            for batch in self.poll_batches(max_records, timeout_s=0.1):
                if batch.partition not in remaining:
                    continue
                first, last = ranges[batch.partition]
                have = collected.get(batch.partition)
                expected = first if have is None else have.last_offset + 1
                if batch.first_offset > expected or batch.last_offset < expected:
                    continue
                skip = expected - batch.first_offset
                take = min(len(batch.values) - skip, last - expected + 1)
                values = batch.values[skip : skip + take]
                stamps = batch.timestamps_ms[skip : skip + take]
                if have is None:
                    collected[batch.partition] = RecordBatch(
                        batch.topic, batch.partition, first, list(values), list(stamps)
                    )
                else:
                    have.values.extend(values)
                    have.timestamps_ms.extend(stamps)
                if collected[batch.partition].last_offset >= last:
                    remaining.pop(batch.partition, None)
        for partition in self.assignment():
            if partition in ranges:
                self.seek(partition, ranges[partition][1] + 1)
            else:
                self.seek(partition, resume_at.get(partition, 0))
        return collected

    @abstractmethod
    def seek(self, partition: int, offset: int) -> None:
        """Set the position of ``partition``; the next poll starts there."""

    @abstractmethod
    def position(self, partition: int) -> int:
        """The offset of the next record ``poll`` returns for ``partition``."""

    @abstractmethod
    def commit(self, offsets: dict[int, int]) -> None:
        """Durably store ``offsets`` (partition -> next offset to read)."""

    @abstractmethod
    def committed(self) -> dict[int, int]:
        """The group's committed offsets for the assigned partitions."""

    @abstractmethod
    def close(self) -> None:
        """Release resources. Does not commit."""


class Log(ABC):
    """A set of topics. Thread-safe; safe to open in several processes."""

    @abstractmethod
    def create_topic(self, topic: str, partitions: int) -> None:
        """Create ``topic`` if missing. Idempotent; never changes an existing
        topic's partition count (raises ``LogError`` on a mismatch)."""

    @abstractmethod
    def partitions(self, topic: str) -> int:
        """The number of partitions of ``topic``; ``LogError`` if missing."""

    @abstractmethod
    def producer(self) -> Producer:
        """A new producer."""

    @abstractmethod
    def consumer(self, group: str, topic: str) -> Consumer:
        """A new consumer in ``group`` reading ``topic``; no assignment yet."""

    @abstractmethod
    def beginning_offsets(self, topic: str) -> dict[int, int]:
        """Oldest retained offset per partition."""

    @abstractmethod
    def end_offsets(self, topic: str) -> dict[int, int]:
        """Offset the next appended record gets, per partition."""

    @abstractmethod
    def committed_offsets(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed offsets; partitions without one are absent."""

    @abstractmethod
    def offset_for_time(self, topic: str, partition: int, timestamp_ms: int) -> int:
        """The earliest offset whose record's timestamp is >= ``timestamp_ms``.

        Returns the end offset when no such record exists.
        """

    @abstractmethod
    def apply_retention(self, now_ms: int | None = None) -> RetentionReport:
        """Delete whole segments older than the retention time or beyond the
        retention size. Never deletes records that a known consumer group has
        not committed, unless the backend was configured to allow it; such
        drops are counted in the report."""

    @abstractmethod
    def close(self) -> None:
        """Release resources."""
