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


class GroupCommitter:
    def __init__(self, log_: Log, topic: str = "events", max_group_records: int = 50_000) -> None:
        self.topic = topic
        self.producer = log_.producer()
        self.max_group_records = max_group_records
        self._queue: queue.SimpleQueue[
            tuple[Items, asyncio.AbstractEventLoop, asyncio.Future[None]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    async def append(self, items: Items) -> None:
        """Append ``(partition, value)`` records; returns once durable.
        Raises the log's error (``LogFull``/``LogError``) if the flush failed."""
        if not items:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put((items, loop, future))
        await future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            count = len(first[0])
            while count < self.max_group_records:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                group.append(nxt)
                count += len(nxt[0])
            error: BaseException | None = None
            try:
                by_partition: dict[int, list[tuple[bytes | None, bytes]]] = defaultdict(list)
                for items, _, _ in group:
                    for partition, value in items:
                        by_partition[partition].append((None, value))
                for partition, records in by_partition.items():
                    self.producer.produce_many(self.topic, partition, records)
                self.producer.flush()
            except BaseException as exc:  # every waiter must hear about it
                error = exc
                log.warning("group commit of %d records failed: %s", count, exc)
            for _, loop, future in group:
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
