"""The archiver: exactly once by event_id into a local or S3 lake, after
kill -9 at any moment, with client retries, and drained on a graceful stop."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest

from fixtures_lake import (
    DAY_MS,
    config_for,
    create_bucket,
    day_start_ms,
    make_events,
    moto_s3,
    produce,
)
from strata.events import now_ms
from strata.lake.base import Lake
from strata.log import open_log

PARTITIONS = 4


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def lake_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Config overrides (dotted) selecting a local or an S3 lake."""
    if request.param == "local":
        return {}
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"lake-{random.randrange(10**9)}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    create_bucket(endpoint, bucket)
    return {
        "lake.path": f"s3://{bucket}/hot",
        "lake.cold_path": f"s3://{bucket}/cold",
        "lake.s3_endpoint": endpoint,
    }


def _env(tmp_path: Path, settings: dict[str, str], **extra: object) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "STRATA_DATA_DIR": str(tmp_path),
            "STRATA_LOG__PARTITIONS": str(PARTITIONS),
            "STRATA_LOG__FSYNC": '"never"',
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }
    )
    for dotted, value in {**settings, **extra}.items():
        section, field = dotted.split(".")
        env[f"STRATA_{section.upper()}__{field.upper()}"] = json.dumps(value)
    return env


def _checkpoint_offsets(tmp_path: Path) -> int:
    try:
        state = json.loads((tmp_path / "archiver" / "checkpoint.json").read_text())
    except (FileNotFoundError, ValueError):
        return 0
    return sum(state.get("offsets", {}).values())


def test_kill9_five_times_leaves_every_event_exactly_once(
    tmp_path: Path, lake_settings: dict[str, str]
) -> None:
    config = config_for(tmp_path, **lake_settings)
    log = open_log(config)
    # Received now: retries fall inside the dedup horizon (24 h by received_at).
    events = make_events(
        1500, start_ms=day_start_ms("2026-03-01"), span_ms=2 * DAY_MS, seed=7,
        received_at_ms=now_ms(),
    )
    produce(log, events, PARTITIONS)
    # Client retries: the same event_ids again, later in the log.
    produce(log, events[:200] + events[1000:1100], PARTITIONS)
    total = sum(log.end_offsets("events").values())
    log.close()

    env = _env(
        tmp_path, lake_settings, **{"lake.roll_bytes": 2000, "lake.poll_events": 25}
    )
    command = [sys.executable, "-m", "strata.lake.archiver"]
    rng = random.Random(3)
    kills = 0
    while kills < 5:
        before = _checkpoint_offsets(tmp_path)
        process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        # Kill only once this run has made progress, at a random moment after.
        while _checkpoint_offsets(tmp_path) == before and time.monotonic() < deadline:
            if process.poll() is not None:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is not None:
            break  # finished everything before this kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    assert kills >= 5, "the archiver finished before it could be killed five times"
    assert _checkpoint_offsets(tmp_path) < total, "the kills should interrupt the work"

    done = subprocess.run(command + ["--drain"], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    config = config_for(tmp_path, **lake_settings)
    lake = Lake.open(config)
    table = lake.read(lake.files())
    ids = table.column("event_id").to_pylist()
    assert len(ids) == len(set(ids)), "an event was archived twice"
    assert set(ids) == {e.event_id for e in events}
    # Partition layout: every row sits under the date and type of its event.
    for lake_file in lake.files():
        rows = lake.read_file(lake_file)
        assert set(rows.column("event_type").to_pylist()) == {lake_file.event_type}
        days = pc.cast(rows.column("ts"), "int64").to_numpy() // DAY_MS
        assert {int(d) for d in days} == {
            (day_start_ms(lake_file.day.isoformat())) // DAY_MS
        }


def test_graceful_stop_of_the_pipeline_drains_the_archiver(tmp_path: Path) -> None:
    from strata.server.pipeline import Pipeline

    # A long roll interval and a large roll size: only the drain on stop writes.
    config = config_for(tmp_path, **{"lake.roll_interval": "1h"})
    pipeline = Pipeline.open(config)
    assert "archiver" in pipeline.components
    pipeline.start()
    events = make_events(1500, start_ms=day_start_ms("2026-03-05"), seed=11)
    produce(pipeline.log, events, PARTITIONS)
    time.sleep(0.5)
    status = pipeline.components["archiver"].status()
    assert "lag_events" in status
    pipeline.stop()

    lake = Lake.open(config)
    ids = lake.read(lake.files()).column("event_id").to_pylist()
    assert sorted(ids) == sorted(e.event_id for e in events)


def test_file_names_are_deterministic_and_rewrites_identical(
    tmp_path: Path, lake_settings: dict[str, str]
) -> None:
    """Re-executing a plan (what recovery does) overwrites the same keys with
    the same bytes."""
    from strata.lake.archiver import Archiver

    config = config_for(tmp_path, **lake_settings)
    log = open_log(config)
    produce(log, make_events(400, start_ms=day_start_ms("2026-03-07"), seed=5), PARTITIONS)
    archiver = Archiver.from_config(config, log)
    archiver.drain()
    lake = Lake.open(config)
    first = {f.relpath: lake.read_bytes(f.relpath) for f in lake.files()}
    archiver.close()
    # Forget everything and archive the same log again from offset 0.
    for path in (tmp_path / "archiver").rglob("*"):
        if path.is_file():
            path.unlink()
    again = Archiver.from_config(config, log)
    again.drain()
    second = {f.relpath: lake.read_bytes(f.relpath) for f in lake.files()}
    assert second == first
    again.close()
    log.close()
