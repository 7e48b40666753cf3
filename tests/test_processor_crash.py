"""Exactly once: a `strata process` subprocess is killed with SIGKILL at
least five times while it works through a fixed log. Its final windows, its
output topics (deduplicated by id, as the loader stores them) and the Redis
serving store equal those of one uninterrupted run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.fixtures_processor import fill_log, make_events, read_topic

from strata.config import load_config
from strata.log import open_log
from strata.processor.engine import decode_snapshot
from strata.serving.redis import RedisServingStore

ALL = "all"


def write_config(data_dir: Path, redis: str, prefix: str) -> Path:
    path = data_dir.parent / f"{data_dir.name}.toml"
    path.write_text(
        f"""
data_dir = "{data_dir}"
[log]
partitions = 4
fsync = "never"
[processor]
max_batch_events = 200
checkpoint_interval = "300ms"
early_firing_interval = "100ms"
[serving]
backend = "redis"
redis_url = "{redis}"
redis_prefix = "{prefix}"
"""
    )
    return path


def start(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "strata.processor", "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def progress(data_dir: Path) -> int:
    """Records covered by the processor's checkpoint."""
    path = data_dir / "processor" / ALL / "checkpoint.msgpack"
    try:
        checkpoint = decode_snapshot(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return 0
    return sum(int(o) for o in checkpoint["offsets"].values())


def wait_ready(process: subprocess.Popen[bytes], log_path: Path, starts: int) -> None:
    """Until the ``starts``-th start has logged that it runs (signals are
    handled from then on)."""
    deadline = time.monotonic() + 120
    while log_path.read_text().count("processor all: partitions") < starts:
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.02)


def run_to_end(
    config_path: Path, data_dir: Path, total: int, kills: int, rng: random.Random
) -> int:
    log_path = data_dir.parent / f"{data_dir.name}-processor.log"
    killed = starts = 0
    process = start(config_path, log_path)
    starts += 1
    try:
        while True:
            wait_ready(process, log_path, starts)
            if killed >= kills or progress(data_dir) >= total:
                break
            time.sleep(rng.uniform(0.05, 0.5))
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
            killed += 1
            process = start(config_path, log_path)
            starts += 1
        deadline = time.monotonic() + 240
        while progress(data_dir) < total:
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            assert process.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    return killed


def serving_contents(store: RedisServingStore, metrics: list[str]) -> dict:
    return {
        name: (
            [
                (s.key, s.count, s.values, s.final, s.revision)
                for s in store.windows(name, 0, 2**62)
            ],
            store.revised(name, 0, 2**62),
        )
        for name in metrics
    } | {"progress": store.progress()}


def without_emit_time(records: dict[str, dict]) -> dict[str, dict]:
    # emitted_at is the cycle's wall-clock time: it differs between two runs
    # (but not between a crashed cycle and its replay).
    return {k: {f: v for f, v in r.items() if f != "emitted_at"} for k, r in records.items()}


@pytest.mark.slow
def test_kill_9_five_times_equals_an_uninterrupted_run(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    reference_config_path = write_config(reference_dir, redis_url, "ref:")
    crashed_config_path = write_config(crashed_dir, redis_url, "crash:")
    reference_config = load_config(reference_config_path)
    crashed_config = load_config(crashed_config_path)
    events = make_events(40_000, seed=11, late_share=0.02)
    fill_log(reference_config, events)
    shutil.copytree(reference_dir / "log", crashed_dir / "log")
    total = len(events)

    kills = run_to_end(crashed_config_path, crashed_dir, total, kills=6, rng=random.Random(5))
    assert kills >= 5
    run_to_end(reference_config_path, reference_dir, total, kills=0, rng=random.Random(0))

    metrics = [m.name for m in reference_config.metrics]
    reference_store = RedisServingStore(redis_url, prefix="ref:")
    crashed_store = RedisServingStore(redis_url, prefix="crash:")
    try:
        expected = serving_contents(reference_store, metrics)
        assert any(windows for windows, _ in (expected[m] for m in metrics))
        assert serving_contents(crashed_store, metrics) == expected
    finally:
        reference_store.clear()
        crashed_store.clear()
        reference_store.close()
        crashed_store.close()

    for topic in ("window_results", "late"):
        expected_records = without_emit_time(read_topic(reference_config, topic))
        assert expected_records, topic
        assert without_emit_time(read_topic(crashed_config, topic)) == expected_records

    # Final state: the same engine snapshot (watermarks, windows, sketches).
    def final_state(data_dir: Path) -> dict:
        snapshot = decode_snapshot(
            (data_dir / "processor" / ALL / "checkpoint.msgpack").read_bytes()
        )
        return snapshot["engine"]["metrics"]

    assert final_state(crashed_dir) == final_state(reference_dir)
    log = open_log(crashed_config)
    assert sum(log.end_offsets("window_results").values()) >= len(
        read_topic(crashed_config, "window_results")
    )
    log.close()
