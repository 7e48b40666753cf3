"""Group commit: many concurrent requests, one durable flush.

Requests hand their records to the committer and await a future. A single
thread takes everything queued, produces it, calls ``Producer.flush()``
(one write per partition, then the fsync policy), and resolves every future
at once. While one flush is in progress the next group collects, so the
fsync cost is shared by all requests that arrive during it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import overload

from strata.log.base import Log

log = logging.getLogger("strata.ingest")

Items = list[tuple[int, bytes]]


class KeylessRecords(Sequence[tuple[None, bytes]]):
    """Log values as the ``(None, value)`` records ``Producer.produce_many``
    takes, without holding a tuple per record: iteration reuses one (zip
    does), so the request path allocates no GC-tracked object per event."""

    __slots__ = ("values",)

    def __init__(self, values: list[bytes]) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, index: int) -> tuple[None, bytes]: ...

    @overload
    def __getitem__(self, index: slice) -> KeylessRecords: ...

    def __getitem__(self, index: int | slice) -> tuple[None, bytes] | KeylessRecords:
        if isinstance(index, slice):
            return KeylessRecords(self.values[index])
        return (None, self.values[index])

    def __iter__(self) -> Iterator[tuple[None, bytes]]:
        return zip(repeat(None), self.values)


class GroupCommitter:
    def __init__(self, log_: Log, topic: str = "events", max_group_records: int = 50_000) -> None:
        self.topic = topic
        self.producer = log_.producer()
        self.max_group_records = max_group_records
        self._queue: queue.SimpleQueue[
            tuple[list[int], list[bytes], asyncio.AbstractEventLoop, asyncio.Future[None]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    async def append(self, items: Items) -> None:
        """Append ``(partition, value)`` records; returns once durable.
        Raises the log's error (``LogFull``/``LogError``) if the flush failed."""
        await self.append_values(
            [partition for partition, _ in items], [value for _, value in items]
        )

    async def append_values(self, partitions: list[int], values: list[bytes]) -> None:
        """``append`` in columns: ``values[i]`` goes to ``partitions[i]``
        (the form ``Normalizer.normalize_batch`` produces, so the request
        path builds no per-record objects of its own). Same guarantees."""
        if not values:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put((partitions, values, loop, future))
        await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            count = len(first[1])
            while count < self.max_group_records:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                group.append(nxt)
                count += len(nxt[1])
            error: BaseException | None = None
            try:
                by_partition: dict[int, list[bytes]] = defaultdict(list)
                for partitions, values, _, _ in group:
                    for partition, value in zip(partitions, values, strict=True):
                        by_partition[partition].append(value)
                for partition, grouped in by_partition.items():
                    self.producer.produce_many(self.topic, partition, KeylessRecords(grouped))
                self.producer.flush()
            except BaseException as exc:  # every waiter must hear about it
                error = exc
                log.warning("group commit of %d records failed: %s", count, exc)
            for _, _, loop, future in group:
                loop.call_soon_threadsafe(_resolve, future, error)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.producer.close()


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
