"""The Kafka Log backend: Apache Kafka (or any Kafka-protocol broker) through
confluent-kafka (librdkafka).

It implements ``strata.log.base`` and says nothing new about the contract,
with these mappings:

* ``create_topic`` creates the topic with the admin API (``replication_factor``
  from the config). An existing topic is accepted when its partition count
  matches, else ``LogError``. strata never lets Kafka pick partitions: every
  record is produced to an explicit partition that strata computed
  (``strata.events.partition_for``), so a client retry lands where its
  original did, whichever backend is configured.
* ``Producer.flush`` is durable when every delivery report came back without
  error under ``acks=all`` with the idempotent producer (no duplicates or
  reordering from librdkafka's internal retries). Any failed delivery makes
  ``flush`` raise ``LogError``; undelivered messages are purged from the local
  queue, so the caller's retry re-sends them. A message already in flight may
  still land; the loader's event_id dedup stage drops the resulting duplicate
  (DESIGN.md, client retries).
* Consumers never auto-commit and never auto-reset. ``assign`` starts each
  partition at the group's committed offset, else at the beginning offset;
  ``commit`` is synchronous. ``OffsetOutOfRange`` is raised when the broker
  reports that a position fell out of the retained range.
* ``apply_retention`` does nothing: Kafka enforces retention on the broker
  (``retention_ms`` is set as the topic's ``retention.ms`` at creation).

Group rebalancing is an extension of the consumer: ``KafkaConsumer.subscribe``
(see its docstring). Callbacks run inside ``poll``/``poll_batches``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import confluent_kafka
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from strata.log.base import (
    Consumer,
    Log,
    LogError,
    OffsetOutOfRange,
    Producer,
    Record,
    RecordBatch,
    RetentionReport,
)

__all__ = ["KafkaConsumer", "KafkaLog", "KafkaProducer"]

logger = logging.getLogger(__name__)

OnAssign = Callable[[list[int]], "dict[int, int] | None"]
OnRevoke = Callable[[list[int]], None]

_OUT_OF_RANGE = {KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET}


def _kafka_logger() -> logging.Logger:
    # librdkafka logs connection chatter through this logger instead of stderr.
    return logging.getLogger("strata.log.kafka.librdkafka")


class KafkaProducer(Producer):
    """See the module docstring for the durability contract of ``flush``."""

    def __init__(self, config: dict[str, Any], flush_timeout_s: float) -> None:
        self._producer = confluent_kafka.Producer(config, logger=_kafka_logger())
        self._flush_timeout_s = flush_timeout_s
        self._errors: list[str] = []
        self._pending = 0

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        self._pending -= 1
        if error is not None:
            self._errors.append(
                f"{message.topic()}[{message.partition()}]: {error.str()} ({error.name()})"
            )

    def produce(self, topic: str, partition: int, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, value, key, partition=partition, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                # librdkafka's local queue is full: serve delivery reports to make room.
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise LogError(f"kafka produce to {topic}[{partition}]: {exc}") from exc
        self._pending += 1

    def produce_many(
        self, topic: str, partition: int, records: Sequence[tuple[bytes | None, bytes]]
    ) -> None:
        for key, value in records:
            self.produce(topic, partition, key, value)

    def flush(self) -> None:
        deadline = time.monotonic() + self._flush_timeout_s
        while self._pending > 0 and time.monotonic() < deadline:
            self._producer.flush(max(0.01, min(1.0, deadline - time.monotonic())))
        if self._pending > 0:
            # Not acknowledged in time: drop what is still queued locally so
            # that nothing of this flush is delivered later behind the caller's
            # back. Messages already sent may still land (see the module doc).
            self._producer.purge(in_queue=True, in_flight=False)
            self._producer.poll(0)
            self._errors.append(f"{self._pending} message(s) not acknowledged in time")
            self._pending = 0
        if self._errors:
            errors, self._errors = self._errors, []
            raise LogError(f"kafka delivery failed: {errors[0]} ({len(errors)} error(s))")

    def close(self) -> None:
        self.flush()


class KafkaConsumer(Consumer):
    """A Kafka consumer of one topic for one group.

    Two ways to get partitions:

    * ``assign(partitions)``: static assignment; the group coordinator is used
      only to store committed offsets.
    * ``subscribe(on_assign, on_revoke)``: join the consumer group and let the
      broker balance the topic's partitions over the group's members. When this
      consumer gets partitions, ``on_assign(partitions)`` is called with the
      new partitions; it may return ``{partition: offset}`` to start there
      (e.g. from the caller's own checkpoint) instead of the committed offset.
      Before partitions are taken away (another member joined or left, or
      this consumer closes), ``on_revoke(partitions)`` is called while they are
      still assigned, so the caller can checkpoint and ``commit``. After a lost
      session (this member was too slow and the group moved on without it)
      ``on_revoke`` is called as well, but another member may already own the
      partitions, so a ``commit`` then may fail with ``LogError``. Callbacks run
      inside ``poll``/``poll_batches``. The protocol is eager (range): each
      rebalance revokes everything and assigns the new set.
    """

    def __init__(self, log: KafkaLog, group: str, topic: str, config: dict[str, Any]) -> None:
        self._log = log
        self._group = group
        self._topic = topic
        self._consumer = confluent_kafka.Consumer(config, logger=_kafka_logger())
        self._positions: dict[int, int] = {}
        self._subscribed = False
        self._closed = False

    # -- assignment ----------------------------------------------------------
    def _start_offsets(self, partitions: Sequence[int]) -> dict[int, int]:
        committed = self._committed_for(partitions)
        missing = [p for p in partitions if p not in committed]
        beginning = self._log.beginning_offsets(self._topic) if missing else {}
        return {p: committed.get(p, beginning.get(p, 0)) for p in partitions}

    def assign(self, partitions: Sequence[int]) -> None:
        if self._subscribed:
            raise LogError("assign: this consumer is subscribed to its group; use one or the other")
        count = self._log.partitions(self._topic)
        bad = [p for p in partitions if not 0 <= p < count]
        if bad:
            raise LogError(f"assign: {self._topic} has no partition(s) {bad}")
        self._positions = self._start_offsets(sorted(set(partitions)))
        self._apply_assignment()

    def _apply_assignment(self) -> None:
        try:
            self._consumer.assign(
                [TopicPartition(self._topic, p, o) for p, o in sorted(self._positions.items())]
            )
        except KafkaException as exc:
            raise LogError(f"kafka assign {self._topic}: {exc}") from exc

    def subscribe(
        self,
        on_assign: OnAssign | None = None,
        on_revoke: OnRevoke | None = None,
        *,
        on_lost: OnRevoke | None = None,
        fetch: bool = True,
    ) -> None:
        """Join the group and receive partitions from it (see the class docstring).

        ``on_lost`` (default: ``on_revoke``) is called instead of ``on_revoke``
        when the session was lost, i.e. another member may already own the
        partitions, so the caller must not write anything for them any more.
        ``fetch=False`` makes this consumer a group *member* only: assigned
        partitions are paused, so polling it just serves the group protocol
        (heartbeats, rebalance callbacks) and returns no records; the caller
        reads the partitions through other, statically assigned consumers.
        """
        if self._positions and not self._subscribed:
            raise LogError("subscribe: this consumer already has a static assignment")
        self._subscribed = True

        def assigned(consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
            numbers = sorted(tp.partition for tp in partitions)
            starts = self._start_offsets(numbers)
            if on_assign is not None:
                chosen = on_assign(numbers) or {}
                starts.update({p: o for p, o in chosen.items() if p in starts})
            self._positions.update(starts)
            chosen_tps = [TopicPartition(self._topic, p, starts[p]) for p in numbers]
            consumer.assign(chosen_tps)
            if not fetch and chosen_tps:
                consumer.pause(chosen_tps)
            logger.info("kafka %s/%s: assigned %s", self._group, self._topic, numbers)

        def release(
            callback: OnRevoke | None,
            consumer: confluent_kafka.Consumer,
            partitions: list[TopicPartition],
        ) -> None:
            numbers = sorted(tp.partition for tp in partitions)
            try:
                if callback is not None and numbers:
                    callback(numbers)
            finally:
                for partition in numbers:
                    self._positions.pop(partition, None)
                consumer.unassign()
                logger.info("kafka %s/%s: revoked %s", self._group, self._topic, numbers)

        def revoked(consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
            release(on_revoke, consumer, partitions)

        def lost(consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
            release(on_lost if on_lost is not None else on_revoke, consumer, partitions)

        try:
            self._consumer.subscribe(
                [self._topic], on_assign=assigned, on_revoke=revoked, on_lost=lost
            )
        except KafkaException as exc:
            raise LogError(f"kafka subscribe {self._topic}: {exc}") from exc

    def assignment(self) -> list[int]:
        return sorted(self._positions)

    # -- reading -------------------------------------------------------------
    def _messages(self, max_records: int, timeout_s: float) -> list[tuple[int, int, Message]]:
        """(partition, offset, message) of the next records, in position order."""
        if max_records <= 0:
            return []
        try:
            # consume() waits for a full batch or the timeout, so wait for the
            # first message with poll() and then take what is already fetched.
            messages = self._consumer.consume(max_records, 0)
            if not messages and timeout_s > 0:
                first = self._consumer.poll(timeout_s)
                if first is not None:
                    messages = [first]
                    if max_records > 1:
                        messages.extend(self._consumer.consume(max_records - 1, 0))
        except KafkaException as exc:
            raise LogError(f"kafka consume {self._topic}: {exc}") from exc
        wanted: list[tuple[int, int, Message]] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.code() in _OUT_OF_RANGE:
                    raise OffsetOutOfRange(
                        f"{self._topic}[{message.partition()}]: position out of range ({error.str()})"
                    )
                if error.fatal() or not error.retriable():
                    raise LogError(f"kafka consume {self._topic}: {error.str()}")
                logger.warning("kafka consume %s: %s (retrying)", self._topic, error.str())
                continue
            partition = int(message.partition() or 0)
            position = self._positions.get(partition)
            offset = int(message.offset() or 0)
            # Stale prefetched records (from before a seek or a revoke) are skipped.
            if position is None or offset < position:
                continue
            self._positions[partition] = offset + 1
            wanted.append((partition, offset, message))
        return wanted

    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[Record]:
        return [
            Record(self._topic, partition, offset, m.timestamp()[1], m.key(), m.value() or b"")
            for partition, offset, m in self._messages(max_records, timeout_s)
        ]

    def poll_batches(self, max_records: int, timeout_s: float = 0.0) -> list[RecordBatch]:
        batches: list[RecordBatch] = []
        current: RecordBatch | None = None
        for partition, offset, message in self._messages(max_records, timeout_s):
            if (
                current is None
                or current.partition != partition
                or current.last_offset + 1 != offset
            ):
                current = RecordBatch(self._topic, partition, offset, [], [])
                batches.append(current)
            current.values.append(message.value() or b"")
            current.timestamps_ms.append(message.timestamp()[1])
        return batches

    def seek(self, partition: int, offset: int) -> None:
        if partition not in self._positions:
            raise LogError(f"seek: partition {partition} of {self._topic} is not assigned")
        if offset < 0:
            raise OffsetOutOfRange(f"seek: negative offset {offset}")
        self._positions[partition] = offset
        try:
            self._consumer.seek(TopicPartition(self._topic, partition, offset))
        except KafkaException:
            # librdkafka refuses to seek a partition whose fetcher has not
            # started yet; re-assigning it at the new offset has the same effect.
            try:
                self._consumer.incremental_unassign([TopicPartition(self._topic, partition)])
                self._consumer.incremental_assign([TopicPartition(self._topic, partition, offset)])
            except KafkaException as exc:
                raise LogError(f"kafka seek {self._topic}[{partition}]: {exc}") from exc

    def position(self, partition: int) -> int:
        if partition not in self._positions:
            raise LogError(f"position: partition {partition} of {self._topic} is not assigned")
        return self._positions[partition]

    # -- offsets ---------------------------------------------------------------
    def commit(self, offsets: dict[int, int]) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit(
                offsets=[TopicPartition(self._topic, p, o) for p, o in sorted(offsets.items())],
                asynchronous=False,
            )
        except KafkaException as exc:
            raise LogError(f"kafka commit {self._group}/{self._topic}: {exc}") from exc

    def _committed_for(self, partitions: Sequence[int]) -> dict[int, int]:
        if not partitions:
            return {}
        try:
            found = self._consumer.committed(
                [TopicPartition(self._topic, p) for p in partitions], timeout=self._log.timeout_s
            )
        except KafkaException as exc:
            raise LogError(f"kafka committed {self._group}/{self._topic}: {exc}") from exc
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}

    def committed(self) -> dict[int, int]:
        return self._committed_for(self.assignment())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Leaves the group now (runs on_revoke), so the others rebalance at once.
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            logger.warning("kafka consumer close %s/%s: %s", self._group, self._topic, exc)


class KafkaLog(Log):
    """Topics on a Kafka cluster. See the module docstring.

    ``client_config`` is passed to every librdkafka client (security settings,
    ``client.id``, tuning); ``producer_config`` and ``consumer_config`` only to
    producers or consumers. ``session_timeout_ms`` is how long a silent group
    member keeps its partitions: after a crash its partitions move after at
    most this long.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        replication_factor: int = 1,
        retention_ms: int | None = None,
        session_timeout_ms: int = 6000,
        flush_timeout_s: float = 30.0,
        timeout_s: float = 10.0,
        client_config: dict[str, Any] | None = None,
        producer_config: dict[str, Any] | None = None,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.replication_factor = replication_factor
        self.retention_ms = retention_ms
        self.timeout_s = timeout_s
        self._flush_timeout_s = flush_timeout_s
        self._client_config: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            **(client_config or {}),
        }
        self._producer_config: dict[str, Any] = {
            **self._client_config,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 2,
            "batch.num.messages": 10_000,
            # A delivery that cannot succeed fails within this time, so flush ends.
            "message.timeout.ms": int(flush_timeout_s * 1000),
            **(producer_config or {}),
        }
        self._consumer_config: dict[str, Any] = {
            **self._client_config,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "error",
            "enable.partition.eof": False,
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(100, session_timeout_ms // 6),
            "fetch.wait.max.ms": 100,
            "isolation.level": "read_committed",
            "allow.auto.create.topics": False,
            **(consumer_config or {}),
        }
        self._admin = AdminClient(self._client_config, logger=_kafka_logger())
        self._partition_counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._offsets_client: confluent_kafka.Consumer | None = None

    # -- topics ------------------------------------------------------------------
    def _topic_partitions(self, topic: str) -> int | None:
        try:
            metadata = self._admin.list_topics(timeout=self.timeout_s)
        except KafkaException as exc:
            raise LogError(f"kafka metadata from {self.bootstrap_servers}: {exc}") from exc
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return None
        return len(found.partitions)

    def create_topic(self, topic: str, partitions: int) -> None:
        if partitions < 1:
            raise LogError(f"create_topic {topic}: partitions must be >= 1, got {partitions}")
        existing = self._topic_partitions(topic)
        if existing is None:
            config = {} if self.retention_ms is None else {"retention.ms": str(self.retention_ms)}
            futures = self._admin.create_topics(
                [NewTopic(topic, partitions, self.replication_factor, config=config)],
                request_timeout=self.timeout_s,
            )
            try:
                futures[topic].result(self.timeout_s)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise LogError(f"kafka create_topic {topic}: {exc}") from exc
            # Metadata propagates asynchronously; wait until the topic is visible.
            deadline = time.monotonic() + self.timeout_s
            while (existing := self._topic_partitions(topic)) is None:
                if time.monotonic() > deadline:
                    raise LogError(f"kafka create_topic {topic}: not visible after creation")
                time.sleep(0.05)
        if existing != partitions:
            raise LogError(
                f"topic {topic} has {existing} partitions, the configuration asks for {partitions}"
            )
        self._partition_counts[topic] = existing

    def partitions(self, topic: str) -> int:
        count = self._partition_counts.get(topic)
        if count is None:
            count = self._topic_partitions(topic)
            if count is None:
                raise LogError(f"topic {topic} does not exist")
            self._partition_counts[topic] = count
        return count

    # -- clients -------------------------------------------------------------------
    def producer(self) -> KafkaProducer:
        return KafkaProducer(dict(self._producer_config), self._flush_timeout_s)

    def consumer(self, group: str, topic: str) -> KafkaConsumer:
        self.partitions(topic)  # LogError if missing
        return KafkaConsumer(self, group, topic, {**self._consumer_config, "group.id": group})

    # -- offsets -----------------------------------------------------------------
    def _offsets(self) -> confluent_kafka.Consumer:
        # Watermark and time lookups need a consumer handle; it never joins a group.
        if self._offsets_client is None:
            self._offsets_client = confluent_kafka.Consumer(
                {**self._consumer_config, "group.id": "strata-offsets"}, logger=_kafka_logger()
            )
        return self._offsets_client

    def _watermarks(self, topic: str) -> dict[int, tuple[int, int]]:
        count = self.partitions(topic)
        with self._lock:
            client = self._offsets()
            try:
                return {
                    p: client.get_watermark_offsets(
                        TopicPartition(topic, p), timeout=self.timeout_s, cached=False
                    )
                    for p in range(count)
                }
            except KafkaException as exc:
                raise LogError(f"kafka watermarks of {topic}: {exc}") from exc

    def beginning_offsets(self, topic: str) -> dict[int, int]:
        return {p: low for p, (low, _) in self._watermarks(topic).items()}

    def end_offsets(self, topic: str) -> dict[int, int]:
        return {p: high for p, (_, high) in self._watermarks(topic).items()}

    def committed_offsets(self, group: str, topic: str) -> dict[int, int]:
        from confluent_kafka import ConsumerGroupTopicPartitions

        count = self.partitions(topic)
        request = ConsumerGroupTopicPartitions(
            group, [TopicPartition(topic, p) for p in range(count)]
        )
        try:
            futures = self._admin.list_consumer_group_offsets(
                [request], request_timeout=self.timeout_s
            )
            result = futures[group].result(self.timeout_s)
        except KafkaException as exc:
            raise LogError(f"kafka committed offsets of {group}/{topic}: {exc}") from exc
        return {
            tp.partition: tp.offset
            for tp in result.topic_partitions
            if tp.topic == topic and tp.offset >= 0
        }

    def offset_for_time(self, topic: str, partition: int, timestamp_ms: int) -> int:
        with self._lock:
            try:
                found = self._offsets().offsets_for_times(
                    [TopicPartition(topic, partition, timestamp_ms)], timeout=self.timeout_s
                )
            except KafkaException as exc:
                raise LogError(f"kafka offsets_for_times {topic}[{partition}]: {exc}") from exc
        offset = found[0].offset
        if offset < 0 or offset == OFFSET_INVALID:
            return self.end_offsets(topic)[partition]
        return int(offset)

    def apply_retention(self, now_ms: int | None = None) -> RetentionReport:
        report = RetentionReport()
        report.details.append("kafka: retention is enforced by the broker (topic retention.ms)")
        return report

    def close(self) -> None:
        with self._lock:
            if self._offsets_client is not None:
                self._offsets_client.close()
                self._offsets_client = None
