"""The retry-dedup index with event-time slots (decision 094): hot slots in
memory, cold slots in run files read with pread, durability through the
append files and checkpointed lengths."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.loader import dedup as dedup_module
from strata.loader.dedup import BLOCK, HOUR_MS, SLOT_MS, DedupIndex, hash_ids

DAY = 86_400_000
T0 = 1_764_300_000_000 - 1_764_300_000_000 % HOUR_MS  # an hour boundary
MINUTE = 60_000


def ids(prefix: str, n: int) -> np.ndarray:
    return hash_ids([f"{prefix}-{i}" for i in range(n)])


def at(ts: int, n: int) -> np.ndarray:
    return np.full(n, ts, dtype=np.int64)


def index(directory: Path, **kwargs: int) -> DedupIndex:
    return DedupIndex(directory, DAY, hot_window_ms=5 * MINUTE, **kwargs)


def seen(idx: DedupIndex, hashes: np.ndarray, ts: int, partition: int = 0) -> np.ndarray:
    return ~idx.first_unseen(partition, hashes, at(ts, len(hashes)))


def test_retry_within_hot_window_found_whatever_its_event_time(tmp_path: Path) -> None:
    idx = index(tmp_path)
    original = ids("a", 100)
    idx.add(0, original, at(T0, 100), at(T0, 100))
    # No client timestamp: the retry's ts is its own receive time, 4 min later.
    assert seen(idx, original, T0 + 4 * MINUTE).all()
    assert not seen(idx, ids("b", 100), T0).any()
    assert not seen(idx, original, T0, partition=1).any()
    # In-batch duplicates: the first one wins.
    batch = np.concatenate([ids("c", 3), ids("c", 3)])
    assert idx.first_unseen(0, batch, at(T0, 6)).tolist() == [True] * 3 + [False] * 3


def test_cold_slot_read_from_disk_and_memory_stays_bounded(tmp_path: Path) -> None:
    idx = index(tmp_path)
    early = ids("early", 50_000)
    idx.add(0, early, at(T0 + 1_000, len(early)), at(T0 + 1_000, len(early)))
    assert idx.size() == len(early)
    # Two hours of traffic later, the early minute is cold: a run file with
    # fences in memory, its ids no longer held.
    later = ids("later", 1_000)
    idx.add(0, later, at(T0 + 2 * HOUR_MS, len(later)), at(T0 + 2 * HOUR_MS, len(later)))
    assert T0 // SLOT_MS in idx.cold_slots_of(0)
    assert idx.hot_slots_of(0) == [(T0 + 2 * HOUR_MS) // SLOT_MS]
    fences = -(-len(early) // BLOCK)
    assert idx.size() == len(later) + fences
    assert idx.memory_bytes() < len(early)  # < 1 B per cold id
    assert (tmp_path / f"p0-m{T0 // SLOT_MS}.run").exists()
    # A retry with its client timestamp (network delay differs by 20 s).
    assert seen(idx, early, T0 + 21_000).all()
    assert not seen(idx, ids("fresh", 1_000), T0 + 1_000).any()
    # Without a client timestamp (ts = receive time, hours later) a cold id
    # is not recognised: the documented limit.
    assert not seen(idx, early[:100], T0 + 2 * HOUR_MS).any()
    # Mixed batch: cold lookups, hot lookups and fresh ids together.
    batch = np.concatenate([early[:10], later[:10], ids("fresh2", 10)])
    times = np.concatenate([at(T0, 10), at(T0 + 2 * HOUR_MS, 10), at(T0, 10)])
    assert idx.first_unseen(0, batch, times).tolist() == [False] * 20 + [True] * 10


def test_neighbour_slot_within_tolerance(tmp_path: Path) -> None:
    idx = index(tmp_path)
    boundary = T0 + 10 * MINUTE
    before = ids("before", 500)
    after = ids("after", 500)
    idx.add(0, before, at(boundary - 10_000, 500), at(boundary, 500))
    idx.add(0, after, at(boundary + 5_000, 500), at(boundary, 500))
    idx.add(0, ids("now", 10), at(T0 + 3 * HOUR_MS, 10), at(T0 + 3 * HOUR_MS, 10))
    assert {boundary // SLOT_MS - 1, boundary // SLOT_MS} <= set(idx.cold_slots_of(0))
    # The retry crossed the slot boundary either way: still found.
    assert seen(idx, before, boundary + 40_000).all()
    assert seen(idx, after, boundary - 50_000).all()
    # Beyond the tolerance (and the hot window) it is not.
    assert not seen(idx, before, boundary + 3 * MINUTE).any()


def test_late_ids_of_a_cold_slot_go_to_the_receive_hour_journal(tmp_path: Path) -> None:
    idx = index(tmp_path)
    slot_ts = T0 + 30_000
    idx.add(0, ids("on-time", 2_000), at(slot_ts, 2_000), at(slot_ts, 2_000))
    idx.add(0, ids("now", 10), at(T0 + HOUR_MS, 10), at(T0 + HOUR_MS, 10))
    name = f"p0-m{slot_ts // SLOT_MS}.u64"
    assert idx.lengths()[name] == 16_000
    late = ids("late", 300)
    # Late ids of many minutes: one journal append (one fsync) per receive hour.
    spread = slot_ts + (np.arange(300) % 30) * MINUTE
    idx.add(0, late, spread, at(T0 + HOUR_MS, 300))
    journal = f"p0-l{(T0 + HOUR_MS) // HOUR_MS}.u64"
    assert idx.lengths()[name] == 16_000
    assert idx.lengths()[journal] == 300 * 12
    assert len(idx.lengths()) == 3
    assert slot_ts // SLOT_MS in idx.cold_slots_of(0)
    assert not idx.first_unseen(0, late, spread).any()
    late = late[::30]
    assert seen(idx, late, slot_ts).all()
    assert seen(idx, ids("on-time", 2_000), slot_ts).all()
    # After a restart the tail beyond the run is read from the append file.
    again = index(tmp_path)
    again.load(idx.lengths())
    assert seen(again, late, slot_ts).all()
    assert seen(again, ids("on-time", 2_000), slot_ts).all()
    # In memory: the on-time slot's 10 late ids beyond its run and its 4
    # fences; the 29 minutes only the journal held got runs (1 fence each);
    # the 10 hot ids.
    assert again.size() == 10 + -(-2_000 // BLOCK) + 29 + 10
    # The journal's ids are looked up by their own slot, not by receive time.
    assert not seen(again, ids("late", 300)[1:2], T0 + HOUR_MS).any()


def test_tails_over_budget_are_merged_into_runs(tmp_path: Path) -> None:
    idx = index(tmp_path)
    idx.add(0, ids("x", 10), at(T0, 10), at(T0, 10))
    idx.add(0, ids("y", 10), at(T0 + HOUR_MS, 10), at(T0 + HOUR_MS, 10))
    late = ids("late", dedup_module.TAIL_BUDGET + 1_000)
    idx.add(0, late, at(T0, len(late)), at(T0 + HOUR_MS, len(late)))
    assert idx.size() < len(late) // 100
    assert seen(idx, late[::997], T0).all()
    assert seen(idx, ids("x", 10), T0).all()


def test_load_cuts_back_to_checkpoint_and_rebuilds_runs(tmp_path: Path) -> None:
    idx = index(tmp_path)
    committed = ids("committed", 3_000)
    idx.add(0, committed, at(T0, 3_000), at(T0, 3_000))
    checkpoint = idx.lengths()
    # Crash between append and checkpoint: more ids in the same slot, and
    # the slot went cold, so its run covers ids the checkpoint never saw.
    uncommitted = ids("uncommitted", 1_000)
    idx.add(0, uncommitted, at(T0, 1_000), at(T0, 1_000))
    idx.add(0, ids("jump", 5), at(T0 + HOUR_MS, 5), at(T0 + HOUR_MS, 5))
    run = tmp_path / f"p0-m{T0 // SLOT_MS}.run"
    assert run.exists()

    restored = index(tmp_path)
    restored.load(checkpoint)
    assert restored.lengths() == checkpoint
    assert sorted(p.name for p in tmp_path.glob("*.u64")) == list(checkpoint)
    assert seen(restored, committed, T0).all()
    assert not seen(restored, uncommitted, T0).any()
    assert not seen(restored, ids("jump", 5), T0 + HOUR_MS).any()

    # The slot is hot again after the cut (it is the newest); make it cold
    # with a run, then lose the run: load rebuilds it.
    restored.add(0, ids("next", 5), at(T0 + HOUR_MS, 5), at(T0 + HOUR_MS, 5))
    checkpoint = restored.lengths()
    assert run.exists()
    run.unlink()
    rebuilt = index(tmp_path)
    rebuilt.load(checkpoint)
    assert run.exists()
    assert seen(rebuilt, committed, T0).all()

    # A stale run (covers more than the file holds: unsynced appends lost)
    # and a torn one are rebuilt too.
    for damage in ("stale", "torn"):
        data = run.read_bytes()
        if damage == "stale":
            # The covered length of the run's one append file (after its name).
            covered = (len(committed) * 8 + 8).to_bytes(8, "little")
            run.write_bytes(data[:32 + 56] + covered + data[32 + 64:])
        else:
            run.write_bytes(data[: len(data) // 2])
        reloaded = index(tmp_path)
        reloaded.load(checkpoint)
        assert seen(reloaded, committed, T0).all()
        assert not seen(reloaded, uncommitted, T0).any()
        assert run.stat().st_size == len(data)


def test_expiry_by_last_write(tmp_path: Path) -> None:
    idx = index(tmp_path)
    old = ids("old", 100)
    revived = ids("revived", 100)
    idx.add(0, old, at(T0, 100), at(T0, 100))
    idx.add(0, revived, at(T0 + 5 * MINUTE, 100), at(T0, 100))
    # A late event in the second slot, 20 h later, keeps that slot.
    idx.add(0, ids("late", 1), at(T0 + 5 * MINUTE, 1), at(T0 + 20 * HOUR_MS, 1))
    idx.expire(T0 + DAY + HOUR_MS)
    assert not seen(idx, old, T0).any()
    assert seen(idx, revived, T0 + 5 * MINUTE).all()
    assert not (tmp_path / f"p0-m{T0 // SLOT_MS}.u64").exists()
    assert f"p0-m{T0 // SLOT_MS}.u64" not in idx.lengths()
    idx.expire(T0 + 2 * DAY)
    assert idx.size() == 0
    assert list(tmp_path.iterdir()) == []


def test_epoch_tagged_files(tmp_path: Path) -> None:
    first = index(tmp_path, epoch=1)
    first.add(0, ids("one", 100), at(T0, 100), at(T0, 100))
    first.add(0, ids("two", 100), at(T0 + HOUR_MS, 100), at(T0 + HOUR_MS, 100))
    checkpoint = first.lengths()
    assert set(checkpoint) == {f"p0-m{T0 // SLOT_MS}.e1.u64",
                               f"p0-m{(T0 + HOUR_MS) // SLOT_MS}.e1.u64"}
    # The stale owner keeps appending after the takeover's checkpoint.
    first.add(0, ids("stale", 10), at(T0 + HOUR_MS, 10), at(T0 + HOUR_MS, 10))

    second = index(tmp_path, epoch=2)
    second.load(checkpoint)
    assert seen(second, ids("one", 100), T0).all()
    assert seen(second, ids("two", 100), T0 + HOUR_MS).all()
    assert not seen(second, ids("stale", 10), T0 + HOUR_MS).any()
    # Epoch 1's file is read, never cut; the reader's run carries its epoch.
    newest = f"p0-m{(T0 + HOUR_MS) // SLOT_MS}.e1.u64"
    assert (tmp_path / newest).stat().st_size == 880
    assert (tmp_path / f"p0-m{T0 // SLOT_MS}.e2.run").exists()
    second.add(0, ids("three", 10), at(T0 + HOUR_MS, 10), at(T0 + HOUR_MS, 10))
    second.add(0, ids("four", 10), at(T0, 10), at(T0 + HOUR_MS, 10))
    assert {f"p0-m{(T0 + HOUR_MS) // SLOT_MS}.e2.u64",
            f"p0-l{(T0 + HOUR_MS) // HOUR_MS}.e2.u64"} <= set(second.lengths())
    assert seen(second, ids("three", 10), T0 + HOUR_MS).all()
    assert seen(second, ids("four", 10), T0).all()
    assert (tmp_path / newest).stat().st_size == 880
    third = index(tmp_path, epoch=3)
    third.load(second.lengths())
    assert seen(third, ids("one", 100), T0).all()
    assert seen(third, ids("four", 10), T0).all()
    assert not (tmp_path / f"p0-m{T0 // SLOT_MS}.e2.run").exists()


def test_pre_094_received_hour_files_still_load(tmp_path: Path) -> None:
    hour = T0 // HOUR_MS
    legacy = ids("legacy", 200)
    (tmp_path / f"p0-{hour}.u64").write_bytes(legacy.tobytes() + ids("cut", 5).tobytes())
    (tmp_path / f"p1-{hour}.e3.u64").write_bytes(legacy.tobytes())
    idx = index(tmp_path)
    idx.load({f"p0-{hour}.u64": legacy.nbytes})
    assert (tmp_path / f"p0-{hour}.u64").stat().st_size == legacy.nbytes
    # No event time was recorded: checked by every lookup of the partition.
    assert seen(idx, legacy, T0 + 7 * HOUR_MS).all()
    assert not seen(idx, ids("cut", 5), T0).any()
    idx.add(0, ids("new", 10), at(T0 + 2 * HOUR_MS, 10), at(T0 + 3 * HOUR_MS, 10))
    assert seen(idx, legacy, T0 + 2 * HOUR_MS).all()
    assert f"p0-{hour}.u64" in idx.lengths()
    idx.expire(T0 + DAY + 2 * HOUR_MS)
    assert not (tmp_path / f"p0-{hour}.u64").exists()
    assert seen(idx, ids("new", 10), T0 + 2 * HOUR_MS).all()


# -- property: the index answers like a set, where it promises to ---------------------------

events = st.lists(
    st.tuples(
        st.integers(0, 4 * HOUR_MS),  # gap to the previous original (ms)
        st.booleans(),  # has a client timestamp
        st.integers(-5_000, 5_000),  # client skew after correction
        st.lists(  # retries: (delay after the original, network-delay difference)
            st.tuples(st.integers(0, 2 * HOUR_MS), st.integers(-70_000, 70_000)), max_size=2
        ),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events, batch_size=st.integers(1, 16), reload_at=st.integers(0, 40),
       gap_scale=st.sampled_from([1, 100, 1000]))
def test_matches_a_set_where_promised(
    events: list[tuple[int, bool, int, list[tuple[int, int]]]],
    batch_size: int,
    reload_at: int,
    gap_scale: int,
) -> None:
    # Every arrival: (received, ts, id, original ts or None, guaranteed-by-timestamp).
    arrivals: list[tuple[int, int, str, int | None, bool]] = []
    received = T0
    for n, (gap, timestamped, skew, retries) in enumerate(events):
        received += gap // gap_scale
        ts = received + skew if timestamped else received
        arrivals.append((received, ts, f"e{n}", None, False))
        for delay, delay_difference in retries:
            retry_received = received + delay
            retry_ts = ts + delay_difference if timestamped else retry_received
            close = timestamped and abs(delay_difference) <= dedup_module.TOLERANCE_MS
            arrivals.append((retry_received, retry_ts, f"e{n}", ts, close))
    arrivals.sort(key=lambda a: a[0])

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        idx = index(directory)
        reference: set[str] = set()
        newest_slot: int | None = None
        answers: dict[int, list[bool]] = {}
        # A crash: the checkpoint of batch ``saved`` is restored at batch
        # ``reload_at`` and the batches in between are replayed; they must
        # be decided exactly as the first time.
        saved = max(0, reload_at - 2)
        snapshot: tuple[dict[str, int], set[str], int | None] | None = None
        crashed = False
        number = 0
        while number * batch_size < len(arrivals):
            if number == saved and snapshot is None:
                snapshot = (idx.lengths(), set(reference), newest_slot)
            if number == reload_at and not crashed and snapshot is not None:
                crashed = True
                lengths, reference, newest_slot = snapshot
                reference = set(reference)
                idx = index(directory)
                idx.load(lengths)
                number = saved
            batch = arrivals[number * batch_size : (number + 1) * batch_size]
            hashes = hash_ids([a[2] for a in batch])
            times = np.array([a[1] for a in batch], dtype=np.int64)
            keep = idx.first_unseen(0, hashes, times)
            assert answers.setdefault(number, keep.tolist()) == keep.tolist()
            batch_seen: set[str] = set()
            for answer, (_, _, event_id, original_ts, close) in zip(keep, batch, strict=True):
                in_batch = event_id in batch_seen
                batch_seen.add(event_id)
                if in_batch:
                    assert not answer, f"in-batch duplicate {event_id} kept"
                    continue
                if event_id not in reference:
                    assert answer, f"{event_id} is new but the index saw it"
                    continue
                assert original_ts is not None and newest_slot is not None
                hot = original_ts // SLOT_MS >= newest_slot - idx.hot_slots
                if close or hot:
                    assert not answer, f"retry of {event_id} not recognised"
            received_ms = np.array([a[0] for a in batch], dtype=np.int64)
            idx.add(0, hashes[keep], times[keep], received_ms[keep])
            reference |= batch_seen
            top = int(times[keep].max() // SLOT_MS) if keep.any() else None
            if top is not None:
                newest_slot = top if newest_slot is None else max(newest_slot, top)
            number += 1
        assert all(not name.endswith(".tmp") for name in os.listdir(directory))


# -- the loader over a real embedded log and chDB -----------------------------------------------


def test_loader_drops_a_retry_hours_later_from_a_cold_slot(tmp_path: Path) -> None:
    import msgspec

    from strata.config import load_config
    from strata.events import Normalizer, now_ms
    from strata.loader.loader import Loader
    from strata.loader.sinks import EVENTS_SINK
    from strata.log import open_log
    from strata.store import Store

    config = load_config(overrides={"data_dir": str(tmp_path), "log.partitions": 2,
                                    "log.fsync": "never"}, environ={})
    log = open_log(config)
    store = Store.open(config)
    normalizer = Normalizer(partitions=2, max_future_skew_ms=600_000,
                            max_event_age_ms=86_400_000)
    producer = log.producer()
    now = now_ms()

    def send(prefix: str, n: int, timestamp: int, received: int) -> None:
        raw = [msgspec.json.encode({"event_type": "page_view", "user_id": f"u{i % 7}",
                                    "event_id": f"{prefix}{i}", "timestamp": timestamp})
               for i in range(n)]
        # The SDK stamps sent_at at every attempt: 150 ms of network delay.
        accepted, _ = normalizer.normalize(raw, sent_at_ms=received - 150,
                                           received_at_ms=received)
        for partition, value, _ in accepted:
            producer.produce("events", partition, None, value)
        producer.flush()

    def loader() -> Loader:
        return Loader(log, store, EVENTS_SINK, config.data_path / "loader" / "events",
                      dedup_horizon_ms=DAY, max_batch_events=1_000)

    def drain(target: Loader) -> None:
        while target.run_once(timeout_s=0):
            pass

    try:
        first = loader()
        send("old", 2_000, now - 3 * HOUR_MS, now - 3 * HOUR_MS)
        send("new", 100, now, now)
        drain(first)
        assert first.dedup is not None
        assert first.dedup.size() < 2_000  # the old minute is a run on disk
        first.close()
        # Hours later, after a restart: retries with the same client timestamp.
        second = loader()
        send("old", 2_000, now - 3 * HOUR_MS, now + 60_000)
        send("new", 100, now, now + 60_000)
        drain(second)
        assert store.scalar("SELECT count() FROM events") == 2_100
        assert second.stats.duplicate_rows == 2_100
        second.close()
    finally:
        store.close()
        log.close()
