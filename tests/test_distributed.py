"""The distributed shape on one machine, many processes, real engines.

1. ``test_ingest_and_query_api_processes_on_kafka_store_every_event_once``:

       tansu (Kafka protocol) <-- 2 x `strata ingest` (one worker each, own ports)
                              --> 1 x `strata query-api` (loaders + query API, owns chDB)

   Generated traffic (with duplicate batches) goes to both ingest nodes; the
   query-api is killed with -9 mid-run and restarted. Afterwards the raw table
   holds every acknowledged event exactly once and the rollups agree with it.

2. ``test_processor_group_archiver_and_query_api_survive_a_processor_kill``:
   the whole issue-7 shape, tansu + redis-server + 2 `strata ingest` +
   2 `strata process --group` (one consumer group, Redis serving) +
   1 `strata archive` + 1 `strata query-api`; one processor is killed with -9
   and its partitions move, with their checkpoints and journals, to the other
   (see that test's docstring for what the results are compared with).
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

    def __init__(
        self, tmp: Path, name: str, argv: list[str], config: Path, *, http: bool = True
    ) -> None:
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
            *(["--port", str(self.port)] if http else []),
        ]
        self.log_path = tmp / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_path: str = "/healthz", *, ready_line: str | None = None) -> Role:
        """Start and wait until ``ready_path`` answers 200 (or, for roles
        without HTTP, until the output contains ``ready_line``)."""
        env = {**os.environ, "STRATA_WRITE_KEYS": WRITE_KEY, "STRATA_ADMIN_TOKENS": ADMIN_TOKEN}
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, f"{self.name} exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"{self.name} not ready:\n{self.log_tail()}"
            if ready_line is not None:
                if ready_line in self.log_path.read_text(errors="replace"):
                    return self
            else:
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


# --- the full issue-7 shape: processors in a consumer group, archiver, kill -9 -------------------

METRICS_TOML = """
[[metrics]]
name = "events_by_type"
dimensions = ["event_type"]
aggregations = { events = "count()", users = "uniq(distinct_id)" }
window = "2s"
out_of_orderness = "1s"

[[metrics]]
name = "views_by_country"
filter = "event_type = 'page_view'"
dimensions = ["country"]
aggregations = { views = "count()", users = "uniq(distinct_id)" }
window = "2s"
out_of_orderness = "1s"
"""

METRIC_NAMES = ("events_by_type", "views_by_country")
WINDOW_MS = 2_000


def owned(role: Role) -> list[int] | None:
    """The partitions a `strata process --group` member last announced."""
    lines = [
        line
        for line in role.log_path.read_text(errors="replace").splitlines()
        if line.startswith("strata process: owns partitions ")
    ]
    if not lines:
        return None
    text = lines[-1].removeprefix("strata process: owns partitions ").strip("[] ")
    return [int(p) for p in text.split(",") if p.strip()]


def wait_for(what: str, check: Any, timeout_s: float = 180, detail: Any = None) -> Any:
    """Poll ``check()`` until it returns a truthy value (a generous deadline
    against hangs on a loaded machine, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}: {detail() if detail else ''}")
        time.sleep(0.5)


def differences(got: dict[Any, Any], want: dict[Any, Any]) -> list[Any]:
    keys = sorted(set(got) | set(want), key=repr)
    return [(k, got.get(k), want.get(k)) for k in keys if got.get(k) != want.get(k)][:20]


def loader_offsets(api: Role) -> dict[int, int]:
    """Next offset per partition of `events` that the query-api's loader has read."""
    response = httpx.get(
        f"{api.url}/v1/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
    )
    assert response.status_code == 200, response.text
    offsets = response.json()["consumers"]["loader-events"]["committed_offsets"]
    return {int(p): int(o) for p, o in offsets.items()}


def unique_by_event_id(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first record of each event_id, in log order (what dedup keeps)."""
    seen: set[str] = set()
    out = []
    for record in records:
        if record["event_id"] not in seen:
            seen.add(record["event_id"])
            out.append(record)
    return out


def log_records(config: Path, upto: dict[int, int]) -> list[dict[str, Any]]:
    """The records of `events` below ``upto`` per partition, read from the broker."""
    import json

    from strata.config import load_config
    from strata.log import open_log

    log_ = open_log(load_config(config), create_topics=False)
    records: list[dict[str, Any]] = []
    try:
        for partition, end in sorted(upto.items()):
            consumer = log_.consumer(f"reference-{os.getpid()}-{time.monotonic_ns()}", "events")
            consumer.assign([partition])
            consumer.seek(partition, 0)
            got = 0
            deadline = time.monotonic() + 120
            while got < end:
                assert time.monotonic() < deadline, f"partition {partition}: {got} of {end}"
                for record in consumer.poll(end - got, timeout_s=0.5):
                    records.append(json.loads(record.value))
                    got += 1
            consumer.close()
    finally:
        log_.close()
    return records


def reference_windows(records: list[dict[str, Any]]) -> dict[tuple[str, int, str], tuple[int, int]]:
    """(metric, window_start, dim) -> (count, distinct users) over log records:
    what any processor fed these records must show (late events are folded
    into their held windows, so every record counts)."""
    groups: dict[tuple[str, int, str], list[str]] = {}
    for record in records:
        start = record["ts"] // WINDOW_MS * WINDOW_MS
        key = ("events_by_type", start, record["event_type"])
        groups.setdefault(key, []).append(record["distinct_id"])
        if record["event_type"] == "page_view":
            key = ("views_by_country", start, record["country"])
            groups.setdefault(key, []).append(record["distinct_id"])
    return {key: (len(ids), len(set(ids))) for key, ids in groups.items()}


def served_windows(redis_url: str) -> tuple[dict[tuple[str, int, str], tuple[int, int]], list[Any]]:
    """The serving store's windows merged over shards (what the query layer
    shows), and the raw per-shard states."""
    from strata.metrics import compile_metrics
    from strata.serving.redis import RedisServingStore
    from strata.serving.state import finalize, merge_values

    store = RedisServingStore(redis_url, prefix="dist:")
    try:
        states = [s for m in METRIC_NAMES for s in store.windows(m, 0, 2**62)]
    finally:
        store.close()
    metrics = {m.name: m for m in compile_metrics(metric_configs())}
    groups: dict[tuple[str, int, str], list[Any]] = {}
    for state in states:
        groups.setdefault((state.metric, state.window_start, state.dims[0]), []).append(state)
    merged = {}
    for key, group in groups.items():
        metric = metrics[key[0]]
        values = finalize(metric, *merge_values(metric, group))
        merged[key] = (int(values[metric.aggregations[0].alias]), int(values["users"]))
    return merged, states


def metric_configs() -> list[Any]:
    import tomllib

    from strata.config import MetricConfig

    return [MetricConfig(**m) for m in tomllib.loads(METRICS_TOML)["metrics"]]


@pytest.fixture
def own_broker() -> Iterator[str]:
    # A broker of its own: the other test's events must not be in this log.
    with running_broker() as bootstrap:
        yield bootstrap


@pytest.mark.slow
def test_processor_group_archiver_and_query_api_survive_a_processor_kill(
    own_broker: str, redis_url: str, tmp_path: Path
) -> None:
    """tansu + redis-server + 2 `strata ingest` + 2 `strata process` (one
    consumer group, Redis serving) + 1 `strata archive` + 1 `strata query-api`.

    One processor is killed with -9 while traffic flows; the group moves its
    partitions to the other, which restores their checkpoints and re-executes
    their journals.

    The windowed reference is an *independent computation from the log
    records* (not a separate embedded run): per metric, 2 s window and
    dimension value, the serving store's windows merged over the partition
    shards must equal count() and exact distinct users over the records the
    processors and the loader both read (late events are still folded into
    their held windows, so every record counts once; client retries are in
    the log twice and count once, as in the raw table). Every final window that was not revised later must
    be in `window_results` once with the same count. The raw table and the
    lake must hold exactly the acknowledged event_ids.
    """
    import pyarrow.parquet as pq

    from strata.processor.engine import decode_snapshot, window_result_id

    lake = tmp_path / "lake"
    config = tmp_path / "strata.toml"
    config.write_text(
        f"""
[log]
backend = "kafka"
partitions = 4
kafka_bootstrap_servers = "{own_broker}"
kafka_session_timeout_ms = 6000

[server]
host = "127.0.0.1"

[serving]
backend = "redis"
redis_url = "{redis_url}"
redis_prefix = "dist:"

[processor]
embedded = false
state_dir = "{tmp_path / "processor-state"}"
checkpoint_interval = "1s"

[lake]
path = "{lake}"
roll_interval = "1s"

[query]
sql_max_rows = 1000000
{METRICS_TOML}
"""
    )
    api = Role(tmp_path, "query-api", ["query-api"], config).start("/readyz")
    roles = [api]
    try:
        ingest = [
            Role(tmp_path, f"ingest-{i}", ["ingest", "--workers", "1"], config).start()
            for i in range(2)
        ]
        roles += ingest
        archive = Role(tmp_path, "archive", ["archive"], config, http=False)
        roles.append(archive.start(ready_line="strata archive is running"))
        processors = []
        for i in range(2):
            member = Role(tmp_path, f"process-{i}", ["process", "--group"], config, http=False)
            roles.append(member)
            processors.append(member.start(ready_line="joined consumer group"))
        # The group splits the 4 partitions between the two members.
        wait_for(
            "the group to split the partitions",
            lambda: (
                all(owned(p) for p in processors)
                and sorted(sum((owned(p) or [] for p in processors), [])) == [0, 1, 2, 3]
            ),
        )
        victim, survivor = processors
        victim_shards = {f"p{p}" for p in owned(victim) or []}

        def traffic(seed: int, n: int, out: list[GeneratorStats]) -> list[threading.Thread]:
            threads = [
                threading.Thread(target=send, args=(node.url, n, seed + i, out))
                for i, node in enumerate(ingest)
            ]
            for thread in threads:
                thread.start()
            return threads

        # Traffic before the kill (the victim has state and a journal for its
        # partitions), more while it is dead and the group rebalances, and a
        # last part after the move (its event times close earlier windows).
        stats: list[GeneratorStats] = []
        before = traffic(10, 2_500, stats)
        wait_for(
            "the victim to serve windows",
            lambda: any(s.shard in victim_shards for s in served_windows(redis_url)[1]),
        )
        victim.kill9()
        during = traffic(20, 2_000, stats)
        wait_for("the survivor to own every partition", lambda: owned(survivor) == [0, 1, 2, 3])
        # The survivor took over the victim's partitions from their checkpoints
        # (and re-executed their journals), not from the start of the log.
        restored = survivor.log_path.read_text(errors="replace")
        for shard in victim_shards:
            assert f"processor {shard}: restored checkpoint" in restored, restored[-3000:]
        for sender in before + during:
            sender.join(300)
        for sender in traffic(30, 500, stats):
            sender.join(300)
        assert len(stats) == 6 and all(s.errors == 0 for s in stats), stats
        acknowledged = set().union(*(s.acknowledged_ids for s in stats))
        assert len(acknowledged) == 10_000 - sum(s.rejected for s in stats)

        # Raw counts: exactly the acknowledged ids.
        wait_for(
            "the loader",
            lambda: sql(api, "SELECT count() FROM events")[0][0] >= len(acknowledged),
        )
        time.sleep(2)  # anything extra (a duplicate) would arrive by now
        stored = sql(api, "SELECT event_id FROM events")
        assert len(stored) == len(acknowledged)
        assert {row[0] for row in stored} == acknowledged

        # Windowed metrics: the serving store, merged over the partitions'
        # shards, equals a computation over the very log records the loader
        # read (the whole log once it is caught up).
        def caught_up() -> bool:
            return served_windows(redis_url)[0] == reference_windows(
                unique_by_event_id(log_records(config, loader_offsets(api)))
            )

        wait_for("the processors to catch up", caught_up, timeout_s=120)
        survivor.stop()  # graceful: flushes and checkpoints every partition
        assert survivor.process is not None and survivor.process.returncode == 0
        checkpoints = {}
        for partition in range(4):
            path = tmp_path / "processor-state" / f"p{partition}" / "checkpoint.msgpack"
            checkpoints.update(decode_snapshot(path.read_bytes())["offsets"])
        read = {int(p): int(o) for p, o in checkpoints.items()}
        assert read == loader_offsets(api)  # processors and loader read the same records
        records = log_records(config, read)
        assert {r["event_id"] for r in records} == acknowledged
        assert len(records) > len(acknowledged), "no client retry reached the log"
        served, states = served_windows(redis_url)
        expected = reference_windows(unique_by_event_id(records))
        assert served == expected, differences(served, expected)
        assert {s.shard for s in states} == {"p0", "p1", "p2", "p3"}
        # Client retries are in the log twice; the live windows count each
        # event once, like the raw table.
        served_total = sum(c for (m, _, _), (c, _) in served.items() if m == "events_by_type")
        assert served_total == len(stored)

        # Window results: every final, unrevised window once, same count.
        finals = {
            window_result_id(s.metric, s.shard, s.window_start, s.dims): s.count
            for s in states
            if s.final and s.revision == 0
        }
        assert finals, "no window became final during the run"

        def results() -> dict[str, int] | None:
            rows = sql(api, "SELECT id, event_count FROM window_results")
            loaded = {row[0]: int(row[1]) for row in rows}
            if len(rows) != len(loaded):
                return {"duplicate ids": -1}
            return loaded if set(finals) <= set(loaded) else None

        loaded = wait_for("window_results to load", results)
        assert {i: loaded[i] for i in finals} == finals
        for state in states:  # rows beyond finals are finals later revised by late events
            key = window_result_id(state.metric, state.shard, state.window_start, state.dims)
            if key in loaded and key not in finals:
                assert state.final and state.revision > 0

        # The lake: exactly the acknowledged ids, once each.
        def lake_ids() -> list[str] | None:
            files = sorted(lake.rglob("*.parquet"))
            ids = [
                i
                for f in files
                for i in pq.read_table(f, columns=["event_id"])["event_id"].to_pylist()
            ]
            return ids if len(set(ids)) >= len(acknowledged) else None

        ids = wait_for("the archiver", lake_ids)
        archive.stop()  # drains what the log holds, then exits 0
        assert archive.process is not None and archive.process.returncode == 0
        ids = lake_ids() or []
        assert len(ids) == len(acknowledged)
        assert set(ids) == acknowledged
    finally:
        for role in roles:
            role.stop()


def test_process_group_needs_kafka_and_archive_reports_bad_config(tmp_path: Path) -> None:
    """CLI errors: `--group` on the embedded log, `--group` with `--partitions`,
    and `strata archive` with a missing config file all exit 2 with a message."""
    config = tmp_path / "strata.toml"
    config.write_text('[serving]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:1/0"\n')
    base = [sys.executable, "-m", "strata.cli"]
    data = ["--data-dir", str(tmp_path / "data")]
    cases = [
        (["process", "--group", "--config", str(config), *data], "no consumer groups"),
        (
            ["process", "--group", "--partitions", "0", "--config", str(config), *data],
            "exclude each other",
        ),
        (["archive", "--config", str(tmp_path / "missing.toml"), *data], "missing.toml"),
    ]
    for argv, message in cases:
        done = subprocess.run([*base, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert message in done.stderr, (argv, done.stderr)
