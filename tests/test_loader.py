"""The loader over a real embedded log and chDB: exactly once across
re-executed plans, client retries, and restarts."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pyarrow as pa
import pytest

from strata.config import load_config
from strata.events import Normalizer, now_ms
from strata.loader.loader import Loader
from strata.loader.sinks import EVENTS_SINK
from strata.log import open_log
from strata.store import Store


@pytest.fixture
def setup(tmp_path: Path):
    """(config, log, store, accepted events, producer); the store is closed
    at the end: chDB opens one data path per process at a time."""
    config, log, store, accepted, producer = _setup(tmp_path)
    yield config, log, store, accepted, producer
    store.close()
    log.close()


def _setup(tmp_path: Path, events: int = 3_000):
    config = load_config(overrides={"data_dir": str(tmp_path), "log.partitions": 4,
                                    "log.fsync": "never"}, environ={})
    log = open_log(config)
    store = Store.open(config)
    normalizer = Normalizer(partitions=4, max_future_skew_ms=600_000, max_event_age_ms=86_400_000)
    raw = [msgspec.json.encode({"event_type": "page_view", "user_id": f"u{i % 97}",
                                "event_id": f"e{i}"}) for i in range(events)]
    accepted, _ = normalizer.normalize(raw, sent_at_ms=None, received_at_ms=now_ms())
    producer = log.producer()
    for partition, value, _ in accepted:
        producer.produce("events", partition, None, value)
    producer.flush()
    return config, log, store, accepted, producer


def _loader(config, log, store) -> Loader:
    return Loader(log, store, EVENTS_SINK, config.data_path / "loader" / "events",
                  dedup_horizon_ms=86_400_000, max_batch_events=500)


def _drain(loader: Loader) -> None:
    while loader.run_once(timeout_s=0):
        pass


def test_a_plan_re_executed_after_its_insert_is_stored_once(setup) -> None:
    config, log, store, accepted, _ = setup
    loader = _loader(config, log, store)
    # A cycle that crashes after its insert but before its checkpoint: the
    # plan is on disk and the rows are in the table and the rollups.
    batches = loader.consumer.poll_batches(500, timeout_s=0)
    ranges = {b.partition: (b.first_offset, b.last_offset) for b in batches}
    loader._write_checkpoint(ranges)
    rows = []
    for batch in batches:
        table = EVENTS_SINK.decode(batch.values)
        offsets = pa.array(range(batch.first_offset, batch.last_offset + 1)).to_numpy()
        rows.append(EVENTS_SINK.finish(table, offsets * 0 + batch.partition, offsets))
    data = pa.concat_tables(rows).combine_chunks()
    store.insert_arrow("events", data, dedup_token=loader.dedup_token(ranges))
    loader.close()
    restarted = _loader(config, log, store)  # re-executes the pending plan
    _drain(restarted)
    assert store.scalar("SELECT count() FROM events") == len(accepted)
    assert store.scalar("SELECT uniqExact(event_id) FROM events") == len(accepted)
    for granularity in ("5m", "1d"):
        assert store.scalar(
            f"SELECT countMerge(events) FROM rollup_events_by_type_{granularity}"
        ) == len(accepted)


def test_a_deduplicated_block_still_reaches_rollups_that_missed_it(setup) -> None:
    """Why a pending plan is re-inserted with its token rather than skipped
    when its rows are already in `events`: if a crash left the raw part but
    not a rollup's part, the store drops the repeated raw block yet still
    feeds it to every materialized view, and each rollup keeps it once."""
    config, log, store, accepted, _ = setup
    raw = EVENTS_SINK.finish(
        EVENTS_SINK.decode([value for _, value, _ in accepted[:100]]),
        pa.array([0] * 100).to_numpy(),
        pa.array(range(100)).to_numpy(),
    )
    store.insert_arrow("events", raw, dedup_token="plan-token")
    # A rollup that did not get the block: created after the first insert.
    store.command(
        "CREATE TABLE probe_rollup (n AggregateFunction(count)) ENGINE = AggregatingMergeTree "
        "ORDER BY tuple() SETTINGS non_replicated_deduplication_window = 100"
    )
    store.command("CREATE MATERIALIZED VIEW probe_view TO probe_rollup AS SELECT countState() AS n FROM events")
    store.insert_arrow("events", raw, dedup_token="plan-token")  # the re-executed plan
    store.insert_arrow("events", raw, dedup_token="plan-token")  # and once more
    assert store.scalar("SELECT count() FROM events") == 100
    assert store.scalar("SELECT countMerge(n) FROM probe_rollup") == 100
    assert store.scalar("SELECT countMerge(events) FROM rollup_events_by_type_5m") == 100


def test_a_re_executed_plan_keeps_other_partitions_positions(setup) -> None:
    config, log, store, accepted, _ = setup
    loader = _loader(config, log, store)
    batches = loader.consumer.poll_batches(500, timeout_s=0)
    # The plan covers one partition only; the others must still be read from
    # their checkpointed offsets after the plan is re-executed.
    first = batches[0]
    loader._write_checkpoint({first.partition: (first.first_offset, first.last_offset)})
    loader.close()
    restarted = _loader(config, log, store)
    _drain(restarted)
    assert store.scalar("SELECT count() FROM events") == len(accepted)
    assert store.scalar("SELECT uniqExact(event_id) FROM events") == len(accepted)


def test_retries_are_dropped_across_restarts(setup) -> None:
    config, log, store, accepted, producer = setup
    loader = _loader(config, log, store)
    _drain(loader)
    loader.close()
    for partition, value, _ in accepted[::7]:  # client retries, same ids, later offsets
        producer.produce("events", partition, None, value)
    producer.flush()
    restarted = _loader(config, log, store)
    _drain(restarted)
    assert store.scalar("SELECT count() FROM events") == len(accepted)
    assert restarted.stats.duplicate_rows == len(accepted[::7])
    assert restarted.lag() == 0
