"""The distributed shape on one machine, many processes, real engines.

    tansu (Kafka protocol) <-- 2 x `strata ingest` (one worker each, own ports)
                           --> 1 x `strata query-api` (loaders + query API, owns chDB)

with ``log.backend = "kafka"``. Generated traffic (with duplicate batches) is
sent to both ingest nodes; the query-api is killed with -9 mid-run and
restarted. Afterwards the raw table holds every acknowledged event exactly
once and the rollups agree with it.

Not covered here (see docs/deploy.md): `strata process` in a consumer group
with Redis serving, and `strata archive`; those roles belong to other stages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures_kafka import free_port, running_broker
from strata.generate import GeneratorStats, run

WRITE_KEY = "wk_distributed"
ADMIN_TOKEN = "at_distributed"


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    # Its own broker: the topics of this shape ("events", ...) have fixed names.
    with running_broker() as bootstrap:
        yield bootstrap


class Role:
    """One `strata <role>` process with its own data directory and port."""

    def __init__(self, tmp: Path, name: str, argv: list[str], config: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [
            sys.executable,
            "-m",
            "strata.cli",
            *argv,
            "--config",
            str(config),
            "--data-dir",
            str(tmp / name),
            "--port",
            str(self.port),
        ]
        self.log_path = tmp / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_path: str = "/healthz") -> Role:
        env = {**os.environ, "STRATA_WRITE_KEYS": WRITE_KEY, "STRATA_ADMIN_TOKENS": ADMIN_TOKEN}
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, f"{self.name} exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"{self.name} not ready:\n{self.log_tail()}"
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill9(self) -> None:
        """SIGKILL the whole process group (the role and its workers)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


def sql(api: Role, query: str) -> list[list[Any]]:
    response = httpx.post(
        f"{api.url}/v1/sql",
        json={"sql": query},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    rows: list[list[Any]] = response.json()["rows"]
    return rows


def send(url: str, events: int, seed: int, out: list[GeneratorStats]) -> None:
    out.append(
        run(
            url,
            WRITE_KEY,
            rate=4_000,
            duration=0,
            total_events=events,
            batch_size=100,
            duplicate_share=0.05,
            concurrency=4,
            seed=seed,
            progress=False,
            keep_ids=True,
        )
    )


@pytest.mark.slow
def test_ingest_and_query_api_processes_on_kafka_store_every_event_once(
    broker: str, tmp_path: Path
) -> None:
    config = tmp_path / "strata.toml"
    config.write_text(
        f"""
[log]
backend = "kafka"
partitions = 4
kafka_bootstrap_servers = "{broker}"

[server]
host = "127.0.0.1"

[query]
sql_max_rows = 1000000
"""
    )
    api = Role(tmp_path, "query-api", ["query-api"], config).start("/readyz")
    ingest = [
        Role(tmp_path, f"ingest-{i}", ["ingest", "--workers", "1"], config).start()
        for i in range(2)
    ]
    roles = [api, *ingest]
    try:
        # An ingest node answers only ingest routes.
        elsewhere = httpx.get(f"{ingest[0].url}/v1/status", timeout=10)
        assert elsewhere.status_code == 404 and "query-api" in elsewhere.json()["error"]

        stats: list[GeneratorStats] = []
        senders = [
            threading.Thread(target=send, args=(node.url, 6_000, seed, stats))
            for seed, node in enumerate(ingest)
        ]
        for sender in senders:
            sender.start()
        # Crash the store's only writer while traffic flows; restart it.
        deadline = time.monotonic() + 60
        while not sql(api, "SELECT count() FROM events")[0][0]:
            assert time.monotonic() < deadline, api.log_tail()
            time.sleep(0.2)
        api.kill9()
        api.start("/readyz")
        for sender in senders:
            sender.join(300)
        assert len(stats) == 2 and all(s.errors == 0 for s in stats), stats
        assert sum(s.duplicate_batches for s in stats) > 0
        acknowledged = set().union(*(s.acknowledged_ids for s in stats))
        assert len(acknowledged) == 12_000 - sum(s.rejected for s in stats)

        deadline = time.monotonic() + 180
        while (count := sql(api, "SELECT count() FROM events")[0][0]) < len(acknowledged):
            assert time.monotonic() < deadline, f"{count} of {len(acknowledged)} events loaded"
            time.sleep(0.5)
        time.sleep(2)  # anything extra (a duplicate) would arrive by now
        stored = sql(api, "SELECT event_id FROM events")
        assert len(stored) == len(acknowledged)
        assert {row[0] for row in stored} == acknowledged
        raw = dict(map(tuple, sql(api, "SELECT event_type, count() FROM events GROUP BY 1")))
        for granularity in ("5m", "1d"):
            rollup = sql(
                api,
                "SELECT event_type, countMerge(events) "
                f"FROM rollup_events_by_type_{granularity} GROUP BY 1",
            )
            assert dict(map(tuple, rollup)) == raw, granularity
    finally:
        for role in roles:
            role.stop()
