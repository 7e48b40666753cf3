"""The Log contract (``strata.log.base``), one suite over both backends.

Every test here runs against the embedded log (segment files in a tmp dir) and
the Kafka backend (confluent-kafka against a real tansu broker). Semantics the
test broker cannot show are skipped for Kafka with the tansu limitation named;
they are covered on the embedded log in ``test_log_embedded.py``. Consumer-group
rebalancing (``KafkaConsumer.subscribe``) is a Kafka-only extension and is
tested at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures_kafka import kafka_broker, unique_name  # noqa: F401
from strata.log.base import Consumer, Log, LogError, Record

TANSU_NO_END_OFFSETS = (
    "tansu 0.6.0 answers ListOffsets(latest) with a wrong high watermark; "
    "end offsets are covered on the embedded log"
)
TANSU_NO_TIME_INDEX = (
    "tansu 0.6.0 does not implement offsets_for_times (always answers 0); "
    "covered on the embedded log"
)


@dataclass
class Backend:
    name: str
    open: Callable[[], Log]  # a new handle on the same log (a "restart")
    log: Log

    def topic(self, partitions: int) -> str:
        name = unique_name("contract")
        self.log.create_topic(name, partitions)
        return name


@pytest.fixture(params=["embedded", "kafka"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opened: list[Log] = []
    if request.param == "embedded":
        from strata.log.embedded import EmbeddedLog

        def open_() -> Log:
            log = EmbeddedLog(tmp_path / "log", fsync="never")
            opened.append(log)
            return log
    else:
        bootstrap = request.getfixturevalue("kafka_broker")
        from strata.log.kafka import KafkaLog

        def open_() -> Log:
            log = KafkaLog(bootstrap, session_timeout_ms=6000)
            opened.append(log)
            return log

    yield Backend(request.param, open_, open_())
    for log in opened:
        log.close()


def produce(log: Log, topic: str, records: list[tuple[int, bytes | None, bytes]]) -> None:
    producer = log.producer()
    for partition, key, value in records:
        producer.produce(topic, partition, key, value)
    producer.flush()
    producer.close()


def read(consumer: Consumer, count: int, timeout_s: float = 30.0) -> list[Record]:
    """Poll until ``count`` records arrived (or fail after ``timeout_s``)."""
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count:
        assert time.monotonic() < deadline, f"got {len(records)} of {count} records"
        records.extend(consumer.poll(count - len(records), timeout_s=0.2))
    return records


def assert_nothing_more(consumer: Consumer, wait_s: float = 1.0) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        assert consumer.poll(100, timeout_s=0.1) == []


# --- topics ------------------------------------------------------------------------------------


def test_create_topic_is_idempotent_and_refuses_a_different_partition_count(
    backend: Backend,
) -> None:
    topic = backend.topic(3)
    backend.log.create_topic(topic, 3)
    assert backend.log.partitions(topic) == 3
    with pytest.raises(LogError):
        backend.log.create_topic(topic, 4)
    with pytest.raises(LogError):
        backend.log.partitions(unique_name("missing"))
    assert backend.open().partitions(topic) == 3


# --- produce, flush, poll --------------------------------------------------------------------


def test_records_come_back_in_order_per_partition_with_keys_and_offsets(backend: Backend) -> None:
    topic = backend.topic(3)
    sent: dict[int, list[tuple[bytes | None, bytes]]] = {0: [], 1: [], 2: []}
    records = []
    for i in range(90):
        partition = (i * 7) % 3
        key = None if i % 4 == 0 else f"user-{i % 11}".encode()
        value = f"event-{i}".encode() * (1 + i % 3)
        records.append((partition, key, value))
        sent[partition].append((key, value))
    before_ms = int(time.time() * 1000) - 60_000
    produce(backend.log, topic, records)

    consumer = backend.log.consumer(unique_name("g"), topic)
    consumer.assign([0, 1, 2])
    got = read(consumer, 90)
    for partition in (0, 1, 2):
        mine = [r for r in got if r.partition == partition]
        assert [r.offset for r in mine] == list(range(len(sent[partition])))
        assert [(r.key, r.value) for r in mine] == sent[partition]
        assert all(r.topic == topic for r in mine)
        assert all(r.timestamp_ms >= before_ms for r in mine)
    assert {p: consumer.position(p) for p in (0, 1, 2)} == {p: len(v) for p, v in sent.items()}
    assert_nothing_more(consumer)
    consumer.close()


def test_poll_respects_max_records_and_batches_hold_consecutive_offsets(backend: Backend) -> None:
    topic = backend.topic(2)
    produce(backend.log, topic, [(i % 2, None, b"%d" % i) for i in range(40)])
    consumer = backend.log.consumer(unique_name("g"), topic)
    consumer.assign([0, 1])
    deadline = time.monotonic() + 30
    seen: dict[int, list[bytes]] = {0: [], 1: []}
    while sum(map(len, seen.values())) < 40:
        assert time.monotonic() < deadline
        batches = consumer.poll_batches(7, timeout_s=0.2)
        assert sum(len(b.values) for b in batches) <= 7
        for batch in batches:
            assert batch.first_offset == len(seen[batch.partition])
            assert len(batch.timestamps_ms) == len(batch.values)
            seen[batch.partition].extend(batch.values)
    assert seen == {p: [b"%d" % i for i in range(p, 40, 2)] for p in (0, 1)}
    consumer.close()


def test_a_consumer_sees_records_appended_after_it_started(backend: Backend) -> None:
    topic = backend.topic(1)
    consumer = backend.log.consumer(unique_name("g"), topic)
    consumer.assign([0])
    assert consumer.poll(10, timeout_s=0.3) == []
    produce(backend.log, topic, [(0, b"k", b"late")])
    (record,) = read(consumer, 1)
    assert (record.offset, record.value) == (0, b"late")
    consumer.close()


def test_a_failed_flush_raises_and_leaves_the_producer_usable(backend: Backend) -> None:
    topic = backend.topic(2)
    producer = backend.log.producer()
    with pytest.raises(LogError):
        producer.produce(topic, 5, None, b"to a partition that does not exist")
        producer.flush()
    producer.produce(topic, 1, None, b"good")
    producer.flush()
    producer.close()
    consumer = backend.log.consumer(unique_name("g"), topic)
    consumer.assign([0, 1])
    assert [r.value for r in read(consumer, 1)] == [b"good"]
    assert_nothing_more(consumer)
    consumer.close()


# --- offsets -----------------------------------------------------------------------------------


def test_beginning_and_end_offsets(backend: Backend) -> None:
    topic = backend.topic(2)
    produce(backend.log, topic, [(0, None, b"a"), (0, None, b"b"), (1, None, b"c")])
    assert backend.log.beginning_offsets(topic) == {0: 0, 1: 0}
    if backend.name == "kafka":
        pytest.skip(TANSU_NO_END_OFFSETS)
    assert backend.log.end_offsets(topic) == {0: 2, 1: 1}


def test_offset_for_time(backend: Backend) -> None:
    if backend.name == "kafka":
        pytest.skip(TANSU_NO_TIME_INDEX)
    topic = backend.topic(1)
    produce(backend.log, topic, [(0, None, b"old")])
    time.sleep(0.01)
    cut = int(time.time() * 1000)
    time.sleep(0.01)
    produce(backend.log, topic, [(0, None, b"new")])
    assert backend.log.offset_for_time(topic, 0, 0) == 0
    assert backend.log.offset_for_time(topic, 0, cut) == 1
    assert backend.log.offset_for_time(topic, 0, cut + 3_600_000) == 2


def test_committed_offsets_survive_a_consumer_and_log_restart(backend: Backend) -> None:
    topic = backend.topic(3)
    produce(backend.log, topic, [(i % 3, None, b"%d" % i) for i in range(30)])
    group = unique_name("g")
    consumer = backend.log.consumer(group, topic)
    consumer.assign([0, 1, 2])
    assert consumer.committed() == {}
    assert {p: consumer.position(p) for p in (0, 1, 2)} == {0: 0, 1: 0, 2: 0}
    read(consumer, 30)
    consumer.commit({0: 4, 1: 10})
    # Commit stores offsets; it does not move positions.
    assert consumer.position(0) == 10
    assert consumer.committed() == {0: 4, 1: 10}
    consumer.close()

    reopened = backend.open()
    assert reopened.committed_offsets(group, topic) == {0: 4, 1: 10}
    again = reopened.consumer(group, topic)
    again.assign([0, 1, 2])
    assert again.committed() == {0: 4, 1: 10}
    assert {p: again.position(p) for p in (0, 1, 2)} == {0: 4, 1: 10, 2: 0}
    rest = read(again, 6 + 0 + 10)
    assert sorted((r.partition, r.offset) for r in rest) == [(0, o) for o in range(4, 10)] + [
        (2, o) for o in range(10)
    ]
    assert_nothing_more(again)
    # Another group's offsets are its own.
    assert reopened.committed_offsets(unique_name("other"), topic) == {}
    again.close()


def test_seek_moves_the_position_backwards_and_forwards(backend: Backend) -> None:
    topic = backend.topic(2)
    produce(backend.log, topic, [(0, None, b"%d" % i) for i in range(20)] + [(1, None, b"x")])
    consumer = backend.log.consumer(unique_name("g"), topic)
    consumer.assign([0, 1])
    consumer.seek(0, 15)
    assert consumer.position(0) == 15
    got = read(consumer, 6)
    assert sorted((r.partition, r.offset) for r in got) == [(0, o) for o in range(15, 20)] + [
        (1, 0)
    ]
    consumer.seek(0, 3)
    assert [r.value for r in read(consumer, 17)] == [b"%d" % i for i in range(3, 20)]
    consumer.seek(0, 19)
    assert [r.offset for r in read(consumer, 1)] == [19]
    assert_nothing_more(consumer)
    consumer.close()


def test_static_assignment_reads_only_the_assigned_partitions(backend: Backend) -> None:
    topic = backend.topic(3)
    produce(backend.log, topic, [(p, None, b"p%d" % p) for p in (0, 1, 2)])
    consumer = backend.log.consumer(unique_name("g"), topic)
    consumer.assign([2, 0])
    assert sorted(consumer.assignment()) == [0, 2]
    got = read(consumer, 2)
    assert sorted(r.partition for r in got) == [0, 2]
    assert_nothing_more(consumer)
    consumer.close()


# --- Kafka only: consumer-group rebalancing ------------------------------------------------------


def _poll_until(
    consumers: list[Consumer], done: Callable[[], bool], sink: list[Record], timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the group did not settle in time"
        for consumer in consumers:
            sink.extend(consumer.poll(100, timeout_s=0.1))


def test_kafka_group_splits_partitions_and_moves_them_when_a_member_leaves(
    kafka_broker: str,  # noqa: F811
) -> None:
    from strata.log.kafka import KafkaConsumer, KafkaLog

    log = KafkaLog(kafka_broker, session_timeout_ms=6000)
    topic = unique_name("rebalance")
    log.create_topic(topic, 4)
    produce(log, topic, [(i % 4, None, b"%d" % i) for i in range(40)])
    group = unique_name("g")
    events: list[tuple[str, str, list[int]]] = []

    def member(name: str) -> KafkaConsumer:
        consumer = log.consumer(group, topic)

        def on_assign(partitions: list[int]) -> dict[int, int] | None:
            events.append((name, "assign", partitions))
            return None

        def on_revoke(partitions: list[int]) -> None:
            events.append((name, "revoke", partitions))
            # Checkpoint what was processed before the partitions move on.
            consumer.commit({p: consumer.position(p) for p in partitions})

        consumer.subscribe(on_assign, on_revoke)
        return consumer

    first = member("first")
    records: list[Record] = []
    _poll_until([first], lambda: sorted(first.assignment()) == [0, 1, 2, 3], records)
    second = member("second")
    _poll_until(
        [first, second],
        lambda: (
            bool(first.assignment())
            and bool(second.assignment())
            and sorted(first.assignment() + second.assignment()) == [0, 1, 2, 3]
        ),
        records,
    )
    assert not set(first.assignment()) & set(second.assignment())
    _poll_until(
        [first, second], lambda: len({(r.partition, r.offset) for r in records}) == 40, records
    )

    # More records while both are members, then one leaves: the other gets its
    # partitions and continues from the committed offsets, missing nothing.
    produce(log, topic, [(i % 4, None, b"%d" % i) for i in range(40, 80)])
    moved = list(second.assignment())
    second.close()
    assert ("second", "revoke", sorted(moved)) in events
    _poll_until([first], lambda: sorted(first.assignment()) == [0, 1, 2, 3], records)
    _poll_until([first], lambda: len({(r.partition, r.offset) for r in records}) == 80, records)
    assert sorted(int(r.value) for r in records if r.offset >= 10) == list(range(40, 80))
    first.close()
    assert log.committed_offsets(group, topic) == {0: 20, 1: 20, 2: 20, 3: 20}
    log.close()


def test_kafka_on_assign_can_choose_start_offsets_from_its_own_checkpoint(
    kafka_broker: str,  # noqa: F811
) -> None:
    from strata.log.kafka import KafkaLog

    log = KafkaLog(kafka_broker, session_timeout_ms=6000)
    topic = unique_name("checkpoint")
    log.create_topic(topic, 2)
    produce(log, topic, [(i % 2, None, b"%d" % i) for i in range(20)])
    group = unique_name("g")
    setup = log.consumer(group, topic)
    setup.assign([0, 1])
    setup.commit({0: 2, 1: 2})  # the group's offsets say 2; our checkpoint says 7
    setup.close()

    consumer = log.consumer(group, topic)
    consumer.subscribe(lambda partitions: {0: 7})
    records: list[Record] = []
    _poll_until([consumer], lambda: len(records) >= 3 + 8, records)
    assert sorted((r.partition, r.offset) for r in records) == [(0, o) for o in range(7, 10)] + [
        (1, o) for o in range(2, 10)
    ]
    consumer.close()
    log.close()
