"""Disk faults, simulated honestly: real write failures under a real
`strata serve`.

* ``test_disk_full_*``: the data directory sits on a small tmpfs mounted for
  the test (needs root and ``mount``; skipped where the machine forbids it).
  A filler file takes the last free bytes (ENOSPC for every process), then
  goes away again.
* ``test_file_size_limit_*``: RLIMIT_FSIZE lowered on the running
  `strata serve` and every child (``prlimit``): the active log segment
  cannot grow past it (EFBIG). Raising it again is "space returns". Works
  without root.

In both: ingest answers 503 with Retry-After, never 2xx, for what it could
not make durable; the pipeline recovers by itself (no restart by the test);
every acknowledged event is stored exactly once; the log reads back with
every CRC valid.
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import StrataServer

from strata.config import load_config
from strata.log import open_log

BATCH = 200


def _batch(tag: str) -> list[dict[str, Any]]:
    return [{"event_id": f"{tag}-{uuid.uuid4()}", "event_type": "disk_fault",
             "user_id": f"u{i % 37}", "properties": {"pad": "x" * 300}} for i in range(BATCH)]


def _post(srv: StrataServer, batch: list[dict[str, Any]]) -> int:
    response = srv.post_batch(batch)
    if response.status_code >= 300:
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
    return response.status_code


def _post_until_acked(srv: StrataServer, batch: list[dict[str, Any]], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _post(srv, batch) != 200:
        assert time.monotonic() < deadline, "ingest did not recover once space returned"
        time.sleep(0.5)


def _audit(srv: StrataServer, acked: list[str]) -> None:
    """Every acked id exactly once in the raw table; nothing else of this test there."""
    srv.wait_caught_up(timeout=180)
    rows = srv.sql("SELECT event_id, count() FROM events WHERE event_type = 'disk_fault' "
                   "GROUP BY event_id")["rows"]
    stored = {row[0]: int(row[1]) for row in rows}
    assert set(acked) <= stored.keys(), f"{len(set(acked) - stored.keys())} acknowledged lost"
    assert all(n == 1 for n in stored.values()), "duplicates in the raw table"
    raw = srv.scalar("SELECT count() FROM events")
    assert srv.scalar("SELECT countMerge(events) FROM rollup_events_by_type_5m") == raw


def _log_reads_back(data_dir: Path, partitions: int = 8) -> int:
    """Read every record of topic events from offset 0 (CRC checked by the
    reader, which raises on corruption); returns how many."""
    config = load_config(overrides={"data_dir": str(data_dir), "log.partitions": partitions})
    log = open_log(config)
    try:
        consumer = log.consumer("disk-fault-audit", "events")
        partitions = list(range(log.partitions("events")))
        consumer.assign(partitions)
        for partition in partitions:
            consumer.seek(partition, 0)
        total = 0
        idle = 0
        while idle < 3:
            records = consumer.poll(10_000, timeout_s=0.2)
            total += len(records)
            idle = 0 if records else idle + 1
        consumer.close()
        return total
    finally:
        log.close()


def _fault_then_recover(srv: StrataServer, fault_on: Any, fault_off: Any) -> list[str]:
    acked: list[str] = []
    for i in range(3):
        batch = _batch(f"before{i}")
        _post_until_acked(srv, batch)
        acked += [e["event_id"] for e in batch]
    fault_on()
    refused: list[list[dict[str, Any]]] = []
    for i in range(40):
        batch = _batch(f"during{i}")
        if _post(srv, batch) == 200:
            acked += [e["event_id"] for e in batch]
        else:
            refused.append(batch)
        if len(refused) >= 3:
            break
    assert refused, "no write failed: the fault was not injected"
    fault_off()
    for batch in refused:  # the client's retries, same event_ids
        _post_until_acked(srv, batch)
        acked += [e["event_id"] for e in batch]
    batch = _batch("after")
    _post_until_acked(srv, batch)
    acked += [e["event_id"] for e in batch]
    return acked


# -- a full filesystem ----------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(path: Path) -> None:
    chunk = b"\0" * 2**20
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(chunk)
        except OSError:
            pass
        # The last few KiB too: any write now fails with ENOSPC.
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError:
            pass


def test_disk_full_answers_503_and_recovers_when_space_returns(
    server_factory: Any, small_fs: Path
) -> None:
    srv: StrataServer = server_factory(
        "unused", workers=1, env={"STRATA_LAKE__ROLL_INTERVAL": '"1s"',
                                  "STRATA_LOG__SEGMENT_BYTES": str(2**20)},
    )
    srv.data_dir = small_fs / "data"  # the whole data directory on the small filesystem
    srv.start()
    filler = small_fs / "filler"
    acked = _fault_then_recover(srv, lambda: _fill(filler), filler.unlink)
    _audit(srv, acked)
    srv.stop()
    assert _log_reads_back(srv.data_dir) >= len(acked)


# -- a file size limit ----------------------------------------------------------------
LIMIT = 3 * 2**20


def test_file_size_limit_answers_503_and_recovers_when_lifted(server_factory: Any) -> None:
    # One partition, so that its active segment reaches the limit quickly.
    srv: StrataServer = server_factory(
        workers=1, env={"STRATA_LAKE__ROLL_INTERVAL": '"1s"', "STRATA_LOG__PARTITIONS": "1"},
    ).start()

    def tree() -> list[int]:
        serve = json.loads((srv.data_dir / "run" / "serve.json").read_text())
        return [serve["pid"], *serve["children"].values()]

    def set_limit(soft: int) -> None:
        for pid in tree():
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))

    set_limit(LIMIT)
    acked: list[str] = []
    refused: list[list[dict[str, Any]]] = []
    for i in range(200):
        batch = _batch(f"grow{i}")
        if _post(srv, batch) == 200:
            acked += [e["event_id"] for e in batch]
        else:
            refused.append(batch)
            if len(refused) >= 3:
                break
    assert refused, "the file size limit was never reached"
    set_limit(resource.RLIM_INFINITY)  # space returns
    for batch in refused:  # the client's retries, same event_ids
        _post_until_acked(srv, batch)
        acked += [e["event_id"] for e in batch]
    _audit(srv, acked)
    srv.stop()
    assert _log_reads_back(srv.data_dir, partitions=1) >= len(acked)


# -- retention by size and uncommitted data ---------------------------------------------
def _counter(rendered: str, name: str) -> float:
    for line in rendered.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_retention_by_size_keeps_uncommitted_data_unless_allowed(tmp_path: Path) -> None:
    """Size retention through the policy `strata serve` applies
    (strata.lake.retention.apply): a lagging consumer group pins its data;
    with log.allow_drop_uncommitted the drop happens, counted in the report
    and in /metrics' counter."""
    from strata.lake.retention import apply
    from strata.telemetry import REGISTRY

    overrides: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"), "log.partitions": 1, "log.segment_bytes": 4096,
        "log.retention_bytes_per_partition": 16_384, "log.fsync": "never",
    }
    config = load_config(overrides=overrides)
    log = open_log(config)
    producer = log.producer()
    for _ in range(20):
        producer.produce_many("events", 0, [(None, b"x" * 400) for _ in range(10)])
        producer.flush()
    end = log.end_offsets("events")[0]
    slow = log.consumer("slow-reader", "events")
    slow.assign([0])
    slow.commit({0: 0})  # has read nothing yet
    report = apply(config, store=None, lake=None, log_=log)
    assert report.log_deleted_records == 0
    assert report.log_dropped_uncommitted_records == 0
    assert any("not committed" in line for line in report.log_details), report.log_details
    assert log.beginning_offsets("events")[0] == 0
    log.close()

    before = _counter(REGISTRY.render(), "strata_log_dropped_uncommitted_records_total")
    config = load_config(overrides={**overrides, "log.allow_drop_uncommitted": True})
    log = open_log(config)
    report = apply(config, store=None, lake=None, log_=log)
    beginning = log.beginning_offsets("events")[0]
    assert 0 < beginning < end
    assert report.log_deleted_records == beginning
    assert report.log_dropped_uncommitted_records == beginning  # none had been committed
    assert report.as_dict()["log"]["dropped_uncommitted_records"] == beginning
    after = _counter(REGISTRY.render(), "strata_log_dropped_uncommitted_records_total")
    assert after - before == beginning
    log.close()
