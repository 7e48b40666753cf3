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

from strata.log.base import Log

log = logging.getLogger("strata.ingest")

Items = list[tuple[int, bytes]]
Record = tuple[None, bytes]  # (key, value) as Producer.produce_many takes it


class GroupCommitter:
    def __init__(self, log_: Log, topic: str = "events", max_group_records: int = 50_000) -> None:
        self.topic = topic
        self.producer = log_.producer()
        self.max_group_records = max_group_records
        self._queue: queue.SimpleQueue[
            tuple[list[int], list[Record], asyncio.AbstractEventLoop, asyncio.Future[None]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    async def append(self, items: Items) -> None:
        """Append ``(partition, value)`` records; returns once durable.
        Raises the log's error (``LogFull``/``LogError``) if the flush failed."""
        await self.append_records(
            [partition for partition, _ in items], [(None, value) for _, value in items]
        )

    async def append_records(self, partitions: list[int], records: list[Record]) -> None:
        """``append`` in columns: ``records[i]`` goes to ``partitions[i]``
        (the form ``Normalizer.normalize_batch`` produces, so the request
        path builds no per-record objects of its own). Same guarantees."""
        if not records:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put((partitions, records, loop, future))
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
                by_partition: dict[int, list[Record]] = defaultdict(list)
                for partitions, records, _, _ in group:
                    for partition, record in zip(partitions, records, strict=True):
                        by_partition[partition].append(record)
                for partition, grouped in by_partition.items():
                    self.producer.produce_many(self.topic, partition, grouped)
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
