"""The embedded log's batch index stays bounded as segments pile up, and its
sidecar files are a cache: lookups by offset and by time answer exactly what
reading the whole log says, with sidecars missing, torn, corrupt or stale,
after a reopen and while another process appends (decision 099)."""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from bisect import bisect_left
from pathlib import Path

from strata.log.base import Consumer
from strata.log.embedded import _CACHED_SEALED_INDEXES, EmbeddedLog

SEGMENT_BYTES = 2048
HEADER_SIZE = 40
# The smallest batch written here: one record of a 9-byte value and no key.
MIN_BATCH = HEADER_SIZE + 8 + 9
MAX_BATCHES_PER_SEGMENT = SEGMENT_BYTES // MIN_BATCH + 1


def open_log(path: Path) -> EmbeddedLog:
    return EmbeddedLog(path, fsync="never", segment_bytes=SEGMENT_BYTES, retention_ms=None)


def value_of(offset: int) -> bytes:
    return b"r%08d" % offset


def write(log: EmbeddedLog, batches: int, seed: int) -> None:
    """``batches`` flushes of 1-7 records to partition 0 of topic "t", the
    only writer, so each value names its offset; timestamps vary by a few ms."""
    rng = random.Random(seed)
    producer = log.producer()
    offset = log.end_offsets("t")[0]
    for batch in range(batches):
        count = rng.randint(1, 7)
        producer.produce_many("t", 0, [(None, value_of(offset + i)) for i in range(count)])
        producer.flush()
        offset += count
        if batch % 4 == 0:
            time.sleep(0.001)
    producer.close()


def reference(log: EmbeddedLog) -> list[tuple[bytes, int]]:
    """(value, timestamp) per offset from 0, read front to back."""
    consumer = log.consumer("reference", "t")
    consumer.assign([0])
    consumer.seek(0, 0)
    records = []
    while batch := consumer.poll(10_000):
        records.extend(batch)
    consumer.close()
    assert [record.offset for record in records] == list(range(len(records)))
    return [(record.value, record.timestamp_ms) for record in records]


def offset_for_time(expected: list[tuple[bytes, int]], timestamp_ms: int) -> int:
    return bisect_left([timestamp for _, timestamp in expected], timestamp_ms)


def record_at(consumer: Consumer, offset: int) -> tuple[int, bytes, int]:
    consumer.seek(0, offset)
    (record,) = consumer.poll(1, timeout_s=5)
    return record.offset, record.value, record.timestamp_ms


def check_lookups(log: EmbeddedLog, expected: list[tuple[bytes, int]], seed: int) -> None:
    """Random seeks and time lookups over all segments match ``expected``."""
    rng = random.Random(seed)
    consumer = log.consumer("lookups", "t")
    consumer.assign([0])
    for offset in rng.sample(range(len(expected)), 150) + [0, len(expected) - 1]:
        assert record_at(consumer, offset) == (offset, *expected[offset])
    consumer.close()
    stamps = sorted({timestamp for _, timestamp in expected})
    probes = rng.sample(stamps, min(len(stamps), 150)) + [stamps[0], stamps[-1]]
    for stamp in probes:
        for probe in (stamp - 1, stamp, stamp + 1):
            assert log.offset_for_time("t", 0, probe) == offset_for_time(expected, probe), probe
    assert log.offset_for_time("t", 0, 0) == 0
    assert log.offset_for_time("t", 0, stamps[-1] + 10**6) == len(expected)


def index_files(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted((path / "t" / "0").glob("*.index"))}


def segment_names(path: Path) -> list[str]:
    return sorted(file.name for file in (path / "t" / "0").glob("*.seg"))


def bound() -> int:
    return MAX_BATCHES_PER_SEGMENT * (1 + _CACHED_SEALED_INDEXES)


def test_the_index_held_in_memory_stays_bounded_as_segments_are_added(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.create_topic("t", 1)
    held, known = [], []
    for round_number in range(8):
        write(log, 150, seed=round_number)
        expected = reference(log)
        check_lookups(log, expected, seed=round_number)  # fills the LRU with old segments
        stats = log.index_stats()
        held.append(stats["batches"])
        known.append(stats["segments"])
        assert stats["segments"] == len(segment_names(tmp_path))
        # Lookups in old segments went through the LRU, which stays at its size.
        assert stats["cached_segments"] == _CACHED_SEALED_INDEXES
        assert stats["batches"] <= bound()
    # 1200 batches in ~60 segments; every process used to hold all of them.
    assert known[-1] >= 6 * known[0] and known[-1] >= 50
    assert 1200 > 2 * bound() >= 2 * max(held)
    # Every sealed segment got its sidecar from the writer that rolled it.
    sealed = segment_names(tmp_path)[:-1]
    assert sorted(index_files(tmp_path)) == [name.replace(".seg", ".index") for name in sealed]
    log.close()

    reopened = open_log(tmp_path)
    check_lookups(reopened, expected, seed=99)
    assert reopened.index_stats()["batches"] <= bound()
    reopened.close()


def test_lookups_survive_missing_torn_corrupt_and_stale_sidecars(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.create_topic("t", 1)
    write(log, 400, seed=1)
    expected = reference(log)
    log.close()
    good = index_files(tmp_path)
    assert len(good) >= 20
    other = tmp_path / "other"
    other_log = open_log(other)
    other_log.create_topic("t", 1)
    write(other_log, 60, seed=2)  # different batches: its segment 0 differs from ours
    other_log.close()
    first = "00000000000000000000.index"
    stale = (other / "t" / "0" / first).read_bytes()
    assert stale != good[first]

    def damage(name: str, data: bytes, how: str) -> bytes | None:
        if how == "truncated":
            return data[: len(data) // 2]
        if how == "corrupted":
            flipped = bytearray(data)
            flipped[len(data) // 2] ^= 0x40
            return bytes(flipped)
        if how == "header":
            return b"\0" * 36 + data[36:]
        if how == "stale":
            return stale if name == first else good[sorted(good)[-1]]  # another segment's
        return None  # deleted

    directory = tmp_path / "t" / "0"
    for how in ("deleted", "truncated", "corrupted", "header", "stale"):
        for name, data in good.items():
            damaged = damage(name, data, how)
            if damaged is None:
                (directory / name).unlink()
            else:
                (directory / name).write_bytes(damaged)
        reopened = open_log(tmp_path)
        check_lookups(reopened, expected, seed=len(how))
        # One seek into every segment rebuilds every sidecar it needed, byte for byte.
        consumer = reopened.consumer("sweep", "t")
        consumer.assign([0])
        for name in good:
            consumer.seek(0, int(name.split(".")[0]) + 1)
            assert consumer.poll(1, timeout_s=5)
        consumer.close()
        assert reopened.index_stats()["batches"] <= bound()
        reopened.close()
        assert index_files(tmp_path) == good, how


def test_retention_deletes_sidecars_with_their_segments(tmp_path: Path) -> None:
    log = EmbeddedLog(tmp_path, fsync="always", segment_bytes=SEGMENT_BYTES, retention_ms=None)
    log.create_topic("t", 1)
    write(log, 200, seed=3)
    expected = reference(log)
    log.close()
    segments = segment_names(tmp_path)
    directory = tmp_path / "t" / "0"
    # An orphan, as a reader that rebuilt a sidecar while retention ran could leave.
    orphan = directory / f"{10**12:020d}.index"
    orphan.write_bytes(b"orphan")
    # A sidecar write that crashed before its rename, long ago, and one under way.
    crashed = directory / f".{0:020d}.index.123.456.tmp"
    crashed.write_bytes(b"partial")
    os.utime(crashed, (time.time() - 7200, time.time() - 7200))
    under_way = directory / f".{0:020d}.index.123.789.tmp"
    under_way.write_bytes(b"partial")
    log = EmbeddedLog(tmp_path, fsync="always", segment_bytes=SEGMENT_BYTES, retention_bytes=1)
    report = log.apply_retention()
    assert report.deleted_segments == len(segments) - 1
    assert segment_names(tmp_path) == segments[-1:]
    assert index_files(tmp_path) == {}
    assert not crashed.exists() and under_way.exists()
    begin = log.beginning_offsets("t")[0]
    consumer = log.consumer("after", "t")
    consumer.assign([0])
    assert record_at(consumer, begin) == (begin, *expected[begin])
    stats = log.index_stats()
    assert (stats["segments"], stats["cached_segments"]) == (1, 0)
    log.close()


def _append_worker(path: str, batches: int) -> None:
    log = open_log(Path(path))
    write(log, batches, seed=7)
    log.close()


def test_lookups_while_another_process_appends(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.create_topic("t", 1)
    write(log, 50, seed=5)
    context = multiprocessing.get_context("spawn")
    writer = context.Process(target=_append_worker, args=(str(tmp_path), 1500))
    writer.start()
    rng = random.Random(11)
    consumer = log.consumer("concurrent", "t")
    consumer.assign([0])
    time_answers: list[tuple[int, int]] = []
    lookups = 0
    deadline = time.monotonic() + 180
    while writer.is_alive() and time.monotonic() < deadline:
        end = log.end_offsets("t")[0]
        for offset in (rng.randrange(end), rng.randrange(max(1, end - 20), end), 0):
            found, value, timestamp = record_at(consumer, offset)
            assert (found, value) == (offset, value_of(offset))
            # Timestamps already written never change, so this answer is final.
            time_answers.append((timestamp, log.offset_for_time("t", 0, timestamp)))
        lookups += 1
        assert log.index_stats()["batches"] <= bound()
    writer.join(timeout=60)
    assert writer.exitcode == 0
    consumer.close()
    assert lookups >= 5  # the writer was still appending while we looked up
    expected = reference(log)
    assert len(expected) > 1500
    for timestamp, answer in time_answers:
        assert answer == offset_for_time(expected, timestamp)
    check_lookups(log, expected, seed=12)
    assert log.index_stats()["batches"] <= bound()
    log.close()


def test_offset_for_time_with_an_empty_newest_segment(tmp_path: Path) -> None:
    """A writer creates the next segment, then writes its first batch; a
    reader in between (or after a crash in between) sees an empty newest
    segment. It holds the end offset and must not hide the older ones from
    the time search (which answered the end offset here before decision 099)."""
    log = open_log(tmp_path)
    log.create_topic("t", 1)
    write(log, 20, seed=4)
    expected = reference(log)
    log.close()
    segments = segment_names(tmp_path)
    end = len(expected)
    (tmp_path / "t" / "0" / f"{end:020d}.seg").touch()
    reopened = open_log(tmp_path)
    assert segment_names(tmp_path) == [*segments, f"{end:020d}.seg"]
    for _, timestamp in expected:
        assert reopened.offset_for_time("t", 0, timestamp) == offset_for_time(expected, timestamp)
    assert reopened.offset_for_time("t", 0, expected[-1][1] + 1) == end
    reopened.close()
