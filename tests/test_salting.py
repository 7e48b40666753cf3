"""Hot partitions: salting a viral user_id spreads it, and metrics stay exact.

One user makes 50 % of the traffic. Without salting, that user's partition
holds at least half of all events. With ``ingest.hot_user_ids`` (8 salt
buckets over 8 partitions) the stated imbalance bound is: no partition holds
more than 1.25x the mean (12.5 % of the events) -- the salt is derived from
the event_id, so the hot user's events split evenly over its buckets.

Then the same events, partitioned with and without salting, go through the
log and the Loader into two chDB stores (one process each: chDB allows one
data directory per process), and the raw table and every rollup agree.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from strata.config import load_config, parse_duration_ms
from strata.events import Normalizer
from strata.generate import TrafficModel

PARTITIONS = 8
SALT_BUCKETS = 8
EVENTS = 20_000
HOT_USER = "viral-user"
MAX_IMBALANCE = 1.25  # max partition load / mean partition load, with salting


def make_events() -> list[bytes]:
    # A uniform user population, so the viral user is the only hot key.
    model = TrafficModel(users=5_000, zipf_s=0.0, seed=42)
    events = model.batch(EVENTS, now_ms=int(time.time() * 1000))
    for event in events[::2]:
        event["user_id"] = HOT_USER
    return [msgspec.json.encode(event) for event in events]


def normalize(
    raw: list[bytes], hot_user_ids: list[str], received_at_ms: int
) -> list[tuple[int, bytes]]:
    config = load_config(
        overrides={
            "ingest.hot_user_ids": hot_user_ids,
            "ingest.hot_key_salt_buckets": SALT_BUCKETS,
            "log.partitions": PARTITIONS,
        },
        environ={},
    )
    normalizer = Normalizer(
        partitions=config.log.partitions,
        max_future_skew_ms=parse_duration_ms(config.ingest.max_future_skew),
        max_event_age_ms=parse_duration_ms(config.ingest.max_event_age),
        hot_keys=config.ingest.hot_user_ids,
        salt_buckets=config.ingest.hot_key_salt_buckets,
    )
    accepted, rejected = normalizer.normalize(raw, sent_at_ms=None, received_at_ms=received_at_ms)
    assert rejected == []
    return [(partition, value) for partition, value, _ in accepted]


def load_and_summarize(data_dir: str, records: list[tuple[int, bytes]]) -> dict[str, Any]:
    """In a fresh process: log -> Loader -> chDB, then the raw counts and every
    rollup, finalized, in a deterministic order."""
    from strata.loader.loader import Loader
    from strata.loader.sinks import SINKS
    from strata.log import open_log
    from strata.metrics import compile_metrics
    from strata.store import Store

    config = load_config(
        overrides={"data_dir": data_dir, "log.partitions": PARTITIONS, "log.fsync": "never"},
        environ={},
    )
    log = open_log(config)
    producer = log.producer()
    for partition, value in records:
        producer.produce("events", partition, None, value)
    producer.flush()
    store = Store.open(config)
    loader = Loader(
        log,
        store,
        SINKS["events"],
        config.data_path / "loader" / "events",
        dedup_horizon_ms=parse_duration_ms(config.loader.dedup_horizon),
    )
    loaded = 0
    while loaded < len(records):
        count = loader.run_once(timeout_s=1.0)
        assert count, f"loader stalled after {loaded} of {len(records)} records"
        loaded += count
    summary: dict[str, Any] = {
        "per_partition": dict(sorted(log.end_offsets("events").items())),
        "raw": store.query_rows(
            "SELECT event_type, count(), uniqExact(event_id), uniqExact(distinct_id), "
            "round(sum(revenue), 6) FROM events GROUP BY event_type ORDER BY event_type"
        )[1],
    }
    for metric in compile_metrics(config.metrics):
        for granularity in ("5m", "1d"):
            keys = ["window_start", *metric.dimensions]
            finals = [
                f"round(toFloat64({a.merge_expression(a.alias)}), 6)" for a in metric.aggregations
            ]
            sql = (
                f"SELECT {', '.join(keys + finals)} FROM {metric.rollup_table(granularity)} "
                f"GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
            )
            summary[f"{metric.name}_{granularity}"] = store.query_rows(sql)[1]
    loader.close()
    store.close()
    log.close()
    return summary


def summarize_in_subprocess(data_dir: Path, records: list[tuple[int, bytes]]) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(load_and_summarize, str(data_dir), records).result(timeout=300)


def test_salting_spreads_a_viral_user_and_keeps_metrics_exact(tmp_path: Path) -> None:
    raw = make_events()
    received_at_ms = int(time.time() * 1000)
    plain = normalize(raw, [], received_at_ms)
    salted = normalize(raw, [HOT_USER], received_at_ms)
    # Salting changes where an event goes, never what it is.
    assert [value for _, value in plain] == [value for _, value in salted]

    mean = EVENTS / PARTITIONS
    plain_load = Counter(partition for partition, _ in plain)
    salted_load = Counter(partition for partition, _ in salted)
    assert max(plain_load.values()) >= EVENTS // 2
    assert len(salted_load) == PARTITIONS
    assert max(salted_load.values()) <= MAX_IMBALANCE * mean, salted_load
    hot_partitions = {
        partition
        for (partition, _), event in zip(salted, raw, strict=True)
        if msgspec.json.decode(event)["user_id"] == HOT_USER
    }
    assert len(hot_partitions) == min(SALT_BUCKETS, PARTITIONS)

    plain_summary = summarize_in_subprocess(tmp_path / "plain", plain)
    salted_summary = summarize_in_subprocess(tmp_path / "salted", salted)
    assert plain_summary.pop("per_partition") == dict(sorted(plain_load.items()))
    assert salted_summary.pop("per_partition") == dict(sorted(salted_load.items()))
    assert sum(row[1] for row in plain_summary["raw"]) == EVENTS
    assert plain_summary["page_views_by_country_5m"], "the seed metric has rollup rows"
    assert salted_summary == plain_summary
