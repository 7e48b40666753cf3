"""The embedded log backend on real files: formats, recovery, processes, retention."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.log.base import Consumer, LogError, LogFull, OffsetOutOfRange, Record, RecordBatch
from strata.log.embedded import EmbeddedLog

HEADER_SIZE = 40


def open_log(path: Path, **options: object) -> EmbeddedLog:
    options.setdefault("fsync", "never")
    return EmbeddedLog(path, **options)  # type: ignore[arg-type]


def read_all(log: EmbeddedLog, topic: str, partition: int, group: str = "reader") -> list[Record]:
    consumer = log.consumer(group, topic)
    consumer.assign([partition])
    consumer.seek(partition, log.beginning_offsets(topic)[partition])
    records: list[Record] = []
    while batch := consumer.poll(1000):
        records.extend(batch)
    consumer.close()
    return records


def segment_files(path: Path, topic: str, partition: int) -> list[Path]:
    return sorted((path / topic / str(partition)).glob("*.seg"))


def encoded_size(records: list[tuple[bytes | None, bytes]]) -> int:
    """Bytes of one batch holding ``records``, per the documented format."""
    return HEADER_SIZE + sum(8 + len(value) + len(key or b"") for key, value in records)


def wait_for_next_millisecond() -> None:
    start = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == start:
        time.sleep(0.001)


# --- basics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_round_trip_with_and_without_keys(tmp_path: Path, fsync: str) -> None:
    log = EmbeddedLog(tmp_path, fsync=fsync, fsync_interval_ms=10)  # type: ignore[arg-type]
    log.create_topic("events", 2)
    producer = log.producer()
    sent = {0: [], 1: []}  # type: dict[int, list[tuple[bytes | None, bytes]]]
    for i in range(50):
        partition = i % 2
        key = None if i % 3 == 0 else f"user-{i}".encode()
        value = f"value-{i}".encode() * (i % 5)
        producer.produce("events", partition, key, value)
        sent[partition].append((key, value))
    producer.produce("events", 0, b"", b"")
    sent[0].append((b"", b""))
    producer.flush()
    producer.close()
    log.close()

    log = EmbeddedLog(tmp_path, fsync=fsync)  # type: ignore[arg-type]
    assert log.partitions("events") == 2
    assert log.end_offsets("events") == {0: 26, 1: 25}
    assert log.beginning_offsets("events") == {0: 0, 1: 0}
    for partition in (0, 1):
        records = read_all(log, "events", partition)
        assert [(r.key, r.value) for r in records] == sent[partition]
        assert [r.offset for r in records] == list(range(len(sent[partition])))
        assert {(r.topic, r.partition) for r in records} == {("events", partition)}
        assert all(isinstance(r.timestamp_ms, int) and r.timestamp_ms > 0 for r in records)
        first = records[0]
        assert first == Record("events", partition, 0, first.timestamp_ms, *sent[partition][0])
    log.close()


def test_offsets_are_contiguous_across_flushes(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.create_topic("t", 3)
    producer = log.producer()
    for round_number in range(20):
        for partition in range(3):
            producer.produce_many(
                "t", partition, [(None, f"{round_number}-{i}".encode()) for i in range(partition)]
            )
            producer.produce("t", partition, None, b"x")
        producer.flush()
    assert log.end_offsets("t") == {0: 20, 1: 40, 2: 60}
    for partition in range(3):
        records = read_all(log, "t", partition)
        assert [r.offset for r in records] == list(range(20 * (partition + 1)))
        timestamps = [r.timestamp_ms for r in records]
        assert timestamps == sorted(timestamps)
    log.close()


def test_batches_bigger_than_the_read_ahead(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=2**20)
    log.create_topic("t", 1)
    producer = log.producer()
    values = [bytes([i]) * 300_000 for i in range(12)]
    producer.produce_many("t", 0, [(None, value) for value in values[:2]])
    producer.flush()
    producer.produce_many("t", 0, [(b"k", value) for value in values[2:]])
    producer.flush()
    assert [r.value for r in read_all(log, "t", 0)] == values
    consumer = log.consumer("g", "t")
    consumer.assign([0])
    consumer.seek(0, 5)
    batches = consumer.poll_batches(3)
    assert [(b.first_offset, b.last_offset) for b in batches] == [(5, 7)]
    assert batches[0].values == values[5:8]
    log.close()


def test_topics_are_created_once(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.create_topic("t", 4)
    log.create_topic("t", 4)
    with pytest.raises(LogError):
        log.create_topic("t", 2)
    with pytest.raises(LogError):
        log.partitions("missing")
    with pytest.raises(LogError):
        log.create_topic("../escape", 1)
    assert log.topics() == ["t"]
    assert log.end_offsets("t") == {0: 0, 1: 0, 2: 0, 3: 0}
    producer = log.producer()
    with pytest.raises(LogError):
        producer.produce("t", 4, None, b"x")
    with pytest.raises(TypeError):
        producer.produce("t", 0, None, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # all of them or none
        producer.produce_many("t", 1, [(None, b"ok"), (None, "not bytes")])  # type: ignore[list-item]
    producer.produce_many("t", 2, [])
    producer.flush()
    producer.produce_many("t", 2, [(None, b"x")])
    producer.flush()
    assert log.end_offsets("t") == {0: 0, 1: 0, 2: 1, 3: 0}
    assert [r.value for r in read_all(log, "t", 2)] == [b"x"]
    log.close()
    with pytest.raises(LogError):
        log.end_offsets("t")


def test_segments_roll_and_reads_cross_them(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=300)
    log.create_topic("t", 1)
    producer = log.producer()
    values = [f"record-{i:04d}".encode() for i in range(200)]
    for start in range(0, 200, 7):
        producer.produce_many("t", 0, [(None, value) for value in values[start : start + 7]])
        producer.flush()
    files = segment_files(tmp_path, "t", 0)
    assert len(files) > 5
    bases = [int(file.name[:-4]) for file in files]
    assert bases[0] == 0 and bases == sorted(bases)
    assert [r.value for r in read_all(log, "t", 0)] == values
    log.close()

    log = open_log(tmp_path, segment_bytes=300)
    assert [r.value for r in read_all(log, "t", 0)] == values
    # Seeking into a middle segment, then reading across the following ones.
    consumer = log.consumer("g", "t")
    consumer.assign([0])
    consumer.seek(0, bases[3] + 1)
    records = consumer.poll(1000)
    assert [r.offset for r in records] == list(range(bases[3] + 1, 200))
    log.close()


def test_seek_inside_a_batch_and_partial_polls(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.create_topic("t", 1)
    producer = log.producer()
    producer.produce_many("t", 0, [(str(i).encode(), f"v{i}".encode()) for i in range(10)])
    producer.flush()
    producer.produce_many("t", 0, [(None, f"v{i}".encode()) for i in range(10, 20)])
    producer.flush()

    consumer = log.consumer("g", "t")
    consumer.assign([0])
    assert consumer.position(0) == 0
    consumer.seek(0, 5)
    assert [r.offset for r in consumer.poll(3)] == [5, 6, 7]
    assert consumer.position(0) == 8
    records = consumer.poll(4)
    assert [(r.offset, r.key, r.value) for r in records] == [
        (8, b"8", b"v8"),
        (9, b"9", b"v9"),
        (10, None, b"v10"),
        (11, None, b"v11"),
    ]
    assert [r.value for r in consumer.poll(100)] == [f"v{i}".encode() for i in range(12, 20)]
    assert consumer.poll(100) == []
    consumer.seek(0, 20)  # the end offset is a valid position
    with pytest.raises(OffsetOutOfRange):
        consumer.seek(0, 21)
    with pytest.raises(OffsetOutOfRange):
        consumer.seek(0, -1)
    log.close()


def test_poll_batches_matches_the_interface_default(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.create_topic("t", 2)
    producer = log.producer()
    for partition in (0, 1):
        producer.produce_many(
            "t", partition, [(b"k", f"{partition}-{i}".encode()) for i in range(6)]
        )
        producer.flush()
        producer.produce_many(
            "t", partition, [(None, f"{partition}-{i}".encode()) for i in range(6, 9)]
        )
        producer.flush()

    def read_batches(poll_batches: Callable[[Consumer, int], list[RecordBatch]]) -> list:
        consumer = log.consumer("g", "t")
        consumer.assign([0, 1])
        consumer.seek(1, 2)
        batches: list[RecordBatch] = []
        while batch := poll_batches(consumer, 4):
            assert sum(len(b.values) for b in batch) <= 4
            batches.extend(batch)
        assert consumer.position(0) == 9 and consumer.position(1) == 9
        return [
            (b.topic, b.partition, b.first_offset, b.last_offset, b.values, b.timestamps_ms)
            for b in batches
        ]

    fast = read_batches(lambda consumer, n: consumer.poll_batches(n))
    default = read_batches(lambda consumer, n: Consumer.poll_batches(consumer, n))
    assert fast == default
    for partition, first in ((0, 0), (1, 2)):
        values = [value for b in fast if b[1] == partition for value in b[4]]
        assert values == [f"{partition}-{i}".encode() for i in range(first, 9)]
    log.close()


def test_poll_waits_for_new_records_and_times_out(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.create_topic("t", 1)
    consumer = log.consumer("g", "t")
    consumer.assign([0])
    assert consumer.poll(10, timeout_s=0.05) == []

    def produce_later() -> None:
        time.sleep(0.05)
        producer = log.producer()
        producer.produce("t", 0, None, b"late")
        producer.flush()

    thread = threading.Thread(target=produce_later)
    thread.start()
    records = consumer.poll(10, timeout_s=30)
    thread.join()
    assert [r.value for r in records] == [b"late"]
    log.close()


def test_offset_for_time(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=100)
    log.create_topic("t", 1)
    producer = log.producer()
    for batch in range(6):
        producer.produce_many("t", 0, [(None, f"{batch}-{i}".encode() * 5) for i in range(3)])
        producer.flush()
        wait_for_next_millisecond()
    records = read_all(log, "t", 0)
    first_offset_by_time: dict[int, int] = {}
    for record in records:
        first_offset_by_time.setdefault(record.timestamp_ms, record.offset)
    assert len(first_offset_by_time) == 6
    for timestamp, offset in first_offset_by_time.items():
        assert log.offset_for_time("t", 0, timestamp) == offset
        assert log.offset_for_time("t", 0, timestamp - 1) <= offset
    times = sorted(first_offset_by_time)
    assert log.offset_for_time("t", 0, times[2] + 1) == first_offset_by_time[times[3]]
    assert log.offset_for_time("t", 0, 0) == 0
    assert log.offset_for_time("t", 0, times[-1] + 1) == 18
    log.close()


def test_group_commits_persist_across_reopen(tmp_path: Path) -> None:
    log = open_log(tmp_path, fsync="always")
    log.create_topic("t", 3)
    producer = log.producer()
    for partition in range(3):
        producer.produce_many("t", partition, [(None, b"x")] * 10)
    producer.flush()
    consumer = log.consumer("loader", "t")
    consumer.assign([0, 1])
    assert consumer.committed() == {}
    consumer.poll(100)
    consumer.commit({0: 4})
    consumer.commit({1: 10})
    consumer.commit({0: 7})
    assert consumer.committed() == {0: 7, 1: 10}
    assert log.committed_offsets("loader", "t") == {0: 7, 1: 10}
    with pytest.raises(LogError):
        consumer.commit({5: 1})
    log.close()

    log = open_log(tmp_path)
    assert log.groups("t") == ["loader"]
    assert log.committed_offsets("loader", "t") == {0: 7, 1: 10}
    assert log.committed_offsets("other", "t") == {}
    consumer = log.consumer("loader", "t")
    consumer.assign([0, 1, 2])
    assert [consumer.position(p) for p in (0, 1, 2)] == [7, 10, 0]
    assert consumer.committed() == {0: 7, 1: 10}
    records = consumer.poll(100)
    assert sorted((r.partition, r.offset) for r in records) == [(0, 7), (0, 8), (0, 9)] + [
        (2, i) for i in range(10)
    ]
    log.close()


def test_producers_in_threads_share_a_partition(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=2000)
    log.create_topic("t", 1)

    def produce(worker: int) -> None:
        producer = log.producer()
        for seq in range(500):
            producer.produce("t", 0, None, f"{worker}:{seq}".encode())
            if seq % 10 == 9:
                producer.flush()
        producer.close()

    threads = [threading.Thread(target=produce, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = read_all(log, "t", 0)
    assert [r.offset for r in records] == list(range(2000))
    assert sorted(r.value for r in records) == sorted(
        f"{w}:{s}".encode() for w in range(4) for s in range(500)
    )
    log.close()


def test_a_forked_child_must_open_its_own_log(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.create_topic("t", 1)
    producer = log.producer()
    producer.produce("t", 0, None, b"parent")
    producer.flush()
    pid = os.fork()
    if pid == 0:  # the child: the inherited log refuses, a new one works
        code = 1
        try:
            producer.produce("t", 0, None, b"inherited")
            try:
                producer.flush()
            except LogError:
                child_log = open_log(tmp_path)
                child_producer = child_log.producer()
                child_producer.produce("t", 0, None, b"child")
                child_producer.close()
                child_log.close()
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r.value for r in read_all(log, "t", 0)] == [b"parent", b"child"]
    log.close()


# --- crash recovery ------------------------------------------------------------------------------


def _write_batches(path: Path, batches: list[list[tuple[bytes | None, bytes]]]) -> None:
    log = open_log(path)
    log.create_topic("t", 1)
    producer = log.producer()
    for batch in batches:
        producer.produce_many("t", 0, batch)
        producer.flush()
    log.close()


BATCHES: list[list[tuple[bytes | None, bytes]]] = [
    [(None, b"first-%d" % i) for i in range(5)],
    [(b"key", b"second-%d" % i) for i in range(4)],
    [(None, b"third-%d" % i) for i in range(6)],
]


@pytest.mark.parametrize("cut_into_last_batch", [1, 20, HEADER_SIZE, HEADER_SIZE + 3, -1])
def test_torn_tail_is_truncated_on_open(tmp_path: Path, cut_into_last_batch: int) -> None:
    _write_batches(tmp_path, BATCHES)
    (segment,) = segment_files(tmp_path, "t", 0)
    last_batch_size = encoded_size(BATCHES[-1])
    size = segment.stat().st_size
    keep = cut_into_last_batch if cut_into_last_batch > 0 else last_batch_size - 1
    os.truncate(segment, size - last_batch_size + keep)

    log = open_log(tmp_path)
    assert log.end_offsets("t") == {0: 9}  # first use of the partition recovers it
    assert segment.stat().st_size == size - last_batch_size
    expected = [value for batch in BATCHES[:-1] for _, value in batch]
    assert [r.value for r in read_all(log, "t", 0)] == expected
    producer = log.producer()
    producer.produce("t", 0, None, b"after-recovery")
    producer.flush()
    records = read_all(log, "t", 0)
    assert [r.value for r in records] == [*expected, b"after-recovery"]
    assert [r.offset for r in records] == list(range(10))
    log.close()


@pytest.mark.parametrize("where", ["header", "payload"])
def test_corrupt_tail_batch_is_dropped_on_open(tmp_path: Path, where: str) -> None:
    _write_batches(tmp_path, BATCHES)
    (segment,) = segment_files(tmp_path, "t", 0)
    data = bytearray(segment.read_bytes())
    last_start = len(data) - encoded_size(BATCHES[-1])
    # A byte of the timestamp in the header, or one in the middle of the payload.
    position = last_start + 30 if where == "header" else len(data) - 10
    data[position] ^= 0xFF
    segment.write_bytes(bytes(data))

    log = open_log(tmp_path)
    expected = [value for batch in BATCHES[:-1] for _, value in batch]
    assert [r.value for r in read_all(log, "t", 0)] == expected
    producer = log.producer()
    producer.produce_many("t", 0, [(None, b"new-1"), (None, b"new-2")])
    producer.flush()
    records = read_all(log, "t", 0)
    assert [r.value for r in records] == [*expected, b"new-1", b"new-2"]
    assert [r.offset for r in records] == list(range(11))
    log.close()


def test_reader_raises_on_corruption_in_the_middle(tmp_path: Path) -> None:
    _write_batches(tmp_path, BATCHES)
    (segment,) = segment_files(tmp_path, "t", 0)
    data = bytearray(segment.read_bytes())
    data[encoded_size(BATCHES[0]) - 3] ^= 0xFF  # inside the first batch's payload
    segment.write_bytes(bytes(data))
    log = open_log(tmp_path)
    consumer = log.consumer("g", "t")
    consumer.assign([0])
    with pytest.raises(LogError, match="CRC"):
        consumer.poll(100)
    log.close()


# --- several processes ---------------------------------------------------------------------------


def _append_worker(path: str, worker: int, count: int, partitions: int) -> None:
    log = EmbeddedLog(path, fsync="never", segment_bytes=4096)
    producer = log.producer()
    for seq in range(count):
        producer.produce("t", seq % partitions, None, f"{worker}:{seq}".encode())
        if seq % 7 == 6:
            producer.flush()
    producer.close()
    log.close()


def test_processes_append_to_the_same_partitions(tmp_path: Path) -> None:
    workers, count, partitions = 4, 2000, 2
    log = open_log(tmp_path, segment_bytes=4096)
    log.create_topic("t", partitions)
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_append_worker, args=(str(tmp_path), worker, count, partitions))
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0

    seen: dict[tuple[int, int], int] = {}
    for partition in range(partitions):
        records = read_all(log, "t", partition)
        assert [r.offset for r in records] == list(range(len(records)))
        last_seq: dict[int, int] = {}
        for record in records:
            worker, seq = map(int, record.value.split(b":"))
            assert seq % partitions == partition
            assert seq > last_seq.get(worker, -1)  # each producer's order is kept
            last_seq[worker] = seq
            seen[(worker, seq)] = seen.get((worker, seq), 0) + 1
    assert seen == {(w, s): 1 for w in range(workers) for s in range(count)}
    assert sum(log.end_offsets("t").values()) == workers * count
    assert len(segment_files(tmp_path, "t", 0)) > 1
    log.close()


def _read_worker(path: str, expected: int, ready: object, results: object) -> None:
    log = EmbeddedLog(path, fsync="never")
    consumer = log.consumer("remote", "t")
    consumer.assign([0])
    ready.set()  # type: ignore[attr-defined]
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(values) < expected and time.monotonic() < deadline:
        values.extend(r.value for r in consumer.poll(1000, timeout_s=0.2))
    results.put(values)  # type: ignore[attr-defined]
    log.close()


def test_reader_in_another_process_sees_later_appends(tmp_path: Path) -> None:
    log = open_log(tmp_path, segment_bytes=500)
    log.create_topic("t", 1)
    context = multiprocessing.get_context("spawn")
    ready, results = context.Event(), context.Queue()
    expected = [f"value-{i}".encode() for i in range(300)]
    reader = context.Process(
        target=_read_worker, args=(str(tmp_path), len(expected), ready, results)
    )
    reader.start()
    assert ready.wait(timeout=60)
    producer = log.producer()
    for start in range(0, len(expected), 25):
        producer.produce_many("t", 0, [(None, value) for value in expected[start : start + 25]])
        producer.flush()
    values = results.get(timeout=90)
    reader.join(timeout=30)
    assert values == expected
    assert len(segment_files(tmp_path, "t", 0)) > 1
    log.close()


# --- retention and limits ------------------------------------------------------------------------


def _one_segment_per_flush(path: Path, *, partitions: int = 1, **options: object) -> EmbeddedLog:
    """Five single-batch segments of ten records per partition, each a millisecond newer."""
    log = open_log(path, segment_bytes=1, **options)
    log.create_topic("t", partitions)
    producer = log.producer()
    for batch in range(5):
        for partition in range(partitions):
            producer.produce_many(
                "t", partition, [(None, b"%d-%d" % (batch, i)) for i in range(10)]
            )
        producer.flush()
        wait_for_next_millisecond()
    return log


def _batch_times(log: EmbeddedLog) -> list[int]:
    return sorted({r.timestamp_ms for r in read_all(log, "t", 0)})


def test_retention_by_time_deletes_only_old_inactive_segments(tmp_path: Path) -> None:
    log = _one_segment_per_flush(tmp_path, retention_ms=1000)
    times = _batch_times(log)
    assert len(segment_files(tmp_path, "t", 0)) == 5

    report = log.apply_retention(now_ms=times[2] + 1000)
    assert (report.deleted_segments, report.deleted_records) == (2, 20)
    assert report.deleted_bytes > 0 and report.dropped_uncommitted_records == 0
    assert log.beginning_offsets("t") == {0: 20}
    assert [r.offset for r in read_all(log, "t", 0)] == list(range(20, 50))

    report = log.apply_retention(now_ms=times[-1] + 10**9)
    assert report.deleted_segments == 2  # never the active segment
    assert [file.name for file in segment_files(tmp_path, "t", 0)] == [f"{40:020d}.seg"]
    assert log.beginning_offsets("t") == {0: 40} and log.end_offsets("t") == {0: 50}
    log.close()


def test_retention_keeps_records_a_group_has_not_committed(tmp_path: Path) -> None:
    log = _one_segment_per_flush(tmp_path, partitions=2, retention_ms=1000)
    consumer = log.consumer("slow", "t")
    consumer.assign([0, 1])
    consumer.commit({0: 15})  # partition 1: no commit, so all of it is protected
    far_future = _batch_times(log)[-1] + 10**9

    report = log.apply_retention(now_ms=far_future)
    assert report.deleted_segments == 1 and report.deleted_records == 10
    assert report.dropped_uncommitted_records == 0
    assert any("kept" in line for line in report.details)
    assert log.beginning_offsets("t") == {0: 10, 1: 0}
    log.close()

    log = open_log(tmp_path, segment_bytes=1, retention_ms=1000, allow_drop_uncommitted=True)
    report = log.apply_retention(now_ms=far_future)
    # Partition 0: offsets 10..39 (5 of segment [10, 20) were uncommitted, then 20 more);
    # partition 1: offsets 0..39, none committed.
    assert report.deleted_segments == 3 + 4
    assert report.dropped_uncommitted_records == 25 + 40
    assert log.beginning_offsets("t") == {0: 40, 1: 40}

    consumer = log.consumer("slow", "t")
    consumer.assign([0])
    assert consumer.position(0) == 15
    with pytest.raises(OffsetOutOfRange):
        consumer.poll(10)
    with pytest.raises(OffsetOutOfRange):
        consumer.seek(0, 39)
    consumer.seek(0, 40)
    assert [r.offset for r in consumer.poll(100)] == list(range(40, 50))
    log.close()


def test_retention_by_size(tmp_path: Path) -> None:
    log = _one_segment_per_flush(tmp_path)
    segment_size = segment_files(tmp_path, "t", 0)[0].stat().st_size
    log.close()

    log = open_log(
        tmp_path, segment_bytes=1, retention_ms=None, retention_bytes=segment_size * 5 // 2
    )
    report = log.apply_retention()
    assert report.deleted_segments == 3 and report.deleted_records == 30
    assert report.deleted_bytes == 3 * segment_size
    assert len(segment_files(tmp_path, "t", 0)) == 2
    assert log.size_bytes() == 2 * segment_size
    assert log.apply_retention().deleted_segments == 0
    log.close()


def test_flush_beyond_max_bytes_raises_log_full_and_appends_nothing(tmp_path: Path) -> None:
    log = open_log(tmp_path, max_bytes=1000)
    log.create_topic("t", 2)
    producer = log.producer()
    producer.produce_many("t", 0, [(None, b"a" * 100)] * 5)
    producer.flush()
    size = log.size_bytes()
    assert size == encoded_size([(None, b"a" * 100)] * 5)

    producer.produce_many("t", 0, [(None, b"b" * 100)] * 2)
    producer.produce_many("t", 1, [(None, b"c" * 100)] * 2)
    with pytest.raises(LogFull):
        producer.flush()
    assert log.end_offsets("t") == {0: 5, 1: 0}
    assert log.size_bytes() == size
    producer.flush()  # the failed flush's records were dropped from the buffer
    assert log.end_offsets("t") == {0: 5, 1: 0}

    producer.produce("t", 1, None, b"fits")
    producer.flush()
    assert log.end_offsets("t") == {0: 5, 1: 1}
    log.close()


# --- a property: what was flushed is what is read --------------------------------------------------

_operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("produce"),
            st.integers(0, 1),
            st.one_of(st.none(), st.binary(max_size=6)),
            st.binary(max_size=30),
        ),
        st.tuples(st.just("flush")),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("tear"), st.integers(0, 1), st.integers(0, 10**6)),
        st.tuples(st.just("corrupt"), st.integers(0, 1), st.integers(0, 10**6)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=_operations)
def test_reading_from_zero_yields_exactly_the_flushed_records(operations: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory)
        log = open_log(path, segment_bytes=150)
        log.create_topic("t", 2)
        producer = log.producer()
        flushed: dict[int, list[list[tuple[bytes | None, bytes]]]] = {0: [], 1: []}
        pending: dict[int, list[tuple[bytes | None, bytes]]] = {0: [], 1: []}

        def check() -> None:
            for partition in (0, 1):
                expected = [record for batch in flushed[partition] for record in batch]
                records = read_all(log, "t", partition)
                assert [(r.key, r.value) for r in records] == expected
                assert [r.offset for r in records] == list(range(len(expected)))
                assert log.end_offsets("t")[partition] == len(expected)

        for operation in operations:
            kind = operation[0]
            if kind == "produce":
                _, partition, key, value = operation
                producer.produce("t", partition, key, value)
                pending[partition].append((key, value))
            elif kind == "flush":
                producer.flush()
                for partition in (0, 1):
                    if pending[partition]:
                        flushed[partition].append(pending[partition])
                    pending[partition] = []
            else:
                # Closing without flushing: buffered records were never acknowledged.
                log.close()
                pending = {0: [], 1: []}
                if kind in ("tear", "corrupt"):
                    _, partition, where = operation
                    files = segment_files(path, "t", partition)
                    # A crash can only damage the newest segment's last batch.
                    if flushed[partition] and files and files[-1].stat().st_size > 0:
                        size = files[-1].stat().st_size
                        batch_size = encoded_size(flushed[partition][-1])
                        if kind == "tear":
                            os.truncate(files[-1], size - 1 - where % (batch_size - 1))
                        else:
                            data = bytearray(files[-1].read_bytes())
                            data[size - batch_size + where % batch_size] ^= 0x5A
                            files[-1].write_bytes(bytes(data))
                        flushed[partition].pop()
                log = open_log(path, segment_bytes=150)
                producer = log.producer()
                check()
        producer.flush()
        for partition in (0, 1):
            if pending[partition]:
                flushed[partition].append(pending[partition])
        check()
        log.close()
