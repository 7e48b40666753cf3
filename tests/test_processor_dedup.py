"""Client retries (the same event_id again, later in the log) count once in
the processor's windows, as in the raw table and the rollups, also across a
restart from the checkpoint; deleted users are masked."""

from __future__ import annotations

import pytest
from tests.fixtures_processor import fill_log, make_events

from strata.config import load_config
from strata.events import now_ms
from strata.log import open_log
from strata.masking import DeletedUsers
from strata.processor.runner import Processor
from strata.serving.memory import MemoryServingStore
from strata.serving.state import merge_values


def _total(processor: Processor, serving: MemoryServingStore, metric: str) -> int:
    states = serving.windows(metric, 0, 2**62)
    count, _ = merge_values(processor.metrics_by_name[metric], states)
    return count


def _drain(processor: Processor) -> None:
    while processor.lag():
        processor.run_once(wait_s=0)
    processor.flush()


@pytest.mark.parametrize("restart", [False, True])
def test_retried_event_ids_count_once(tmp_path, restart: bool) -> None:
    config = load_config(overrides={"data_dir": str(tmp_path), "log.partitions": 4,
                                    "log.fsync": "never",
                                    "processor.final_retention": "30d"}, environ={})
    events = make_events(4_000, late_share=0.0)
    for event in events:  # received now: inside the dedup horizon
        event["received_at"] = now_ms()
    fill_log(config, events[:2_000])
    log = open_log(config)
    serving = MemoryServingStore()
    processor = Processor(config, log, serving)
    _drain(processor)
    if restart:
        processor.close()
        processor = Processor(config, log, serving)
    # The second half, with every tenth event of the first half retried.
    fill_log(config, events[2_000:] + events[:2_000:10])
    _drain(processor)
    assert _total(processor, serving, "events_by_type") == len(events)
    processor.close()


def test_deleted_users_are_masked(tmp_path) -> None:
    config = load_config(overrides={"data_dir": str(tmp_path), "log.partitions": 2,
                                    "log.fsync": "never",
                                    "processor.final_retention": "30d"}, environ={})
    events = make_events(1_000, late_share=0.0)
    victim = events[0]["distinct_id"]
    mine = sum(1 for e in events if e["distinct_id"] == victim or e.get("user_id") == victim)
    assert mine > 0
    DeletedUsers(config.data_path).add(victim, 2**62)
    fill_log(config, events)
    serving = MemoryServingStore()
    processor = Processor(config, open_log(config), serving)
    _drain(processor)
    assert _total(processor, serving, "events_by_type") == len(events) - mine
    processor.close()
