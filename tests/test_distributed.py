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
   and its partitions move, with their checkpoints and journals, to the other;
   afterwards an embedded `strata serve` is fed the same events and every
   result is compared (see that test's docstring).

3. Fencing (decision 090): a superseded partition owner in-process, and a
   `strata process --group` member stopped with SIGSTOP past its session
   timeout and resumed after the other member took over.
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


def served_windows(
    redis_url: str, prefix: str = "dist:"
) -> tuple[dict[tuple[str, int, str], tuple[int, int]], list[Any]]:
    """The serving store's windows merged over shards (what the query layer
    shows), and the raw per-shard states."""
    from strata.metrics import compile_metrics
    from strata.serving.redis import RedisServingStore
    from strata.serving.state import finalize, merge_values

    store = RedisServingStore(redis_url, prefix=prefix)
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


def latest_checkpoint(directory: Path) -> tuple[int, dict[str, Any]]:
    """(owner epoch, contents) of a partition's newest checkpoint: group
    members write ``checkpoint-e<epoch>.msgpack`` (decision 090)."""
    from strata.processor.engine import decode_snapshot

    files = {
        int(path.name.removeprefix("checkpoint-e").removesuffix(".msgpack")): path
        for path in directory.glob("checkpoint-e*.msgpack")
    }
    assert files, f"no checkpoint in {directory}"
    epoch = max(files)
    return epoch, decode_snapshot(files[epoch].read_bytes())


def metric_configs() -> list[Any]:
    import tomllib

    from strata.config import MetricConfig

    return [MetricConfig(**m) for m in tomllib.loads(METRICS_TOML)["metrics"]]


# --- comparing a shape's results (distributed run vs. the embedded shape) ------------------------

DIMENSION = {"events_by_type": "event_type", "views_by_country": "country"}
COUNT_ALIAS = {"events_by_type": "events", "views_by_country": "views"}


def lake_event_ids(lake: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [
        i
        for f in sorted(lake.rglob("*.parquet"))
        for i in pq.read_table(f, columns=["event_id"])["event_id"].to_pylist()
    ]


def shape_results(query: Any, lake: Path, redis_url: str, prefix: str) -> dict[str, Any]:
    """Everything the issue compares between shapes, read from one shape:
    the raw event ids, the rollups (count and distinct users per 5 min and
    per day and dimension), the live windows merged over shards, the final
    window results merged over shards, and the lake's event ids.

    ``window_results`` rows are the values the live path showed at each
    window's *final* firing; when a window turns final depends on the
    shard's watermark (per partition in the group, the minimum over all
    partitions in the embedded processor), so an event can be folded into
    the final value in one shape and arrive as a late event (a `late_events`
    row, a revision) in the other. Compared are therefore, per (metric,
    window_start, window_end, dimension value): event_count and every
    aggregate of the final rows summed over the shards (distinct users add
    up, since a user's events all live in one partition), for the windows
    that no late event touched in either shape and for which every shard
    holding the window has fired it final. Not compared: id and shard (they
    name the shard), watermark and emitted_at (wall-clock and per-shard),
    _partition/_offset (positions in the window_results topic). Within each
    shape, every final window's served count must equal its `window_results`
    event_count plus its `late_events` rows (``final_plus_late``), so the
    windows that late events touched are accounted for too."""
    import json

    results: dict[str, Any] = {}
    results["event_ids"] = sorted(r[0] for r in query("SELECT event_id FROM events"))
    dims_of = {
        r[0]: {"event_type": r[1], "country": r[2]}
        for r in query("SELECT event_id, event_type, country FROM events")
    }
    for metric, dimension in DIMENSION.items():
        for granularity in ("5m", "1d"):
            rows = query(
                f"SELECT toUnixTimestamp(window_start), {dimension}, "
                f"countMerge({COUNT_ALIAS[metric]}), uniqCombinedMerge(users) "
                f"FROM rollup_{metric}_{granularity} GROUP BY 1, 2"
            )
            results[f"rollup_{metric}_{granularity}"] = {
                (int(r[0]), r[1]): (int(r[2]), int(r[3])) for r in rows
            }
    served, states = served_windows(redis_url, prefix)
    results["served"] = served
    holders: dict[tuple[str, int, str], set[str]] = {}
    for state in states:
        holders.setdefault((state.metric, state.window_start, state.dims[0]), set()).add(
            state.shard
        )
    embedded = {state.shard for state in states} == {"all"}
    late_rows = query(
        "SELECT metric, toUnixTimestamp64Milli(window_start), event_id, source_partition "
        "FROM late_events"
    )
    late = {(r[0], int(r[1]), dims_of[r[2]][DIMENSION[r[0]]]) for r in late_rows}
    # Per shard and window: served count = count at the final firing + late events.
    late_counts: dict[tuple[str, tuple[str, int, str]], int] = {}
    for metric, start, event_id, partition in late_rows:
        shard = "all" if embedded else f"p{partition}"
        key = (metric, int(start), dims_of[event_id][DIMENSION[metric]])
        late_counts[(shard, key)] = late_counts.get((shard, key), 0) + 1
    final_counts: dict[tuple[str, tuple[str, int, str]], int] = {}
    finals: dict[tuple[str, int, int, str], list[tuple[str, int, dict[str, int]]]] = {}
    for metric, start, end, dims, shard, aggregates, event_count in query(
        "SELECT metric, toUnixTimestamp64Milli(window_start), toUnixTimestamp64Milli(window_end),"
        " dims, shard, aggregates, event_count FROM window_results"
    ):
        value = json.loads(dims)[DIMENSION[metric]]
        finals.setdefault((metric, int(start), int(end), value), []).append(
            (shard, int(event_count), json.loads(aggregates))
        )
        final_counts[(shard, (metric, int(start), value))] = int(event_count)
    results["final_plus_late"] = {
        (state.shard, (state.metric, state.window_start, state.dims[0])): (
            state.count,
            final_counts.get((state.shard, (state.metric, state.window_start, state.dims[0])), 0)
            + late_counts.get((state.shard, (state.metric, state.window_start, state.dims[0])), 0),
        )
        for state in states
        if state.final
    }
    merged = {}
    for (metric, start, end, value), rows in finals.items():
        key = (metric, start, value)
        if not holders.get(key, set()) <= {shard for shard, _, _ in rows}:
            continue  # some shard's part of this window is not final yet
        totals: dict[str, int] = {"event_count": sum(count for _, count, _ in rows)}
        for _, _, aggregates in rows:
            for alias, number in aggregates.items():
                totals[alias] = totals.get(alias, 0) + int(number)
        merged[(metric, start, end, value)] = totals
    results["window_results"] = merged
    results["late_windows"] = late
    results["lake_ids"] = sorted(lake_event_ids(lake))
    return results


def assert_same_results(distributed: dict[str, Any], embedded: dict[str, Any]) -> None:
    """The comparison of ``shape_results`` the issue asks for."""
    for shape in (distributed, embedded):
        # Within each shape: every final window's served count is its count
        # at the final firing plus the late events folded in afterwards.
        mismatched = {k: v for k, v in shape["final_plus_late"].items() if v[0] != v[1]}
        assert shape["final_plus_late"] and not mismatched, list(mismatched.items())[:10]
    assert distributed["event_ids"] == embedded["event_ids"]
    for name in sorted(distributed):
        if name.startswith("rollup_"):
            assert distributed[name] == embedded[name], (
                name,
                differences(distributed[name], embedded[name]),
            )
    assert distributed["served"] == embedded["served"], differences(
        distributed["served"], embedded["served"]
    )
    touched = distributed["late_windows"] | embedded["late_windows"]
    comparable = {
        key
        for key in set(distributed["window_results"]) & set(embedded["window_results"])
        if key[:2] + key[3:] not in touched
    }
    # The generated traffic sends ~3 % of events 1-20 s out of order, so most
    # 2 s windows receive a late event in one shape or the other; about 15
    # (metric, window, value) finals stay comparable in a run.
    assert len(comparable) >= 5, (len(comparable), len(touched))
    got = {k: distributed["window_results"][k] for k in comparable}
    want = {k: embedded["window_results"][k] for k in comparable}
    assert got == want, differences(got, want)
    assert distributed["lake_ids"] == embedded["lake_ids"]


def embedded_config(path: Path, redis_url: str, lake: Path) -> Path:
    """The embedded shape (`strata serve`: embedded log, one processor over
    every partition, chDB) with the distributed test's metrics. Its live
    windows go to Redis under their own prefix only so that the test can read
    them per window; the memory and Redis backends pass one contract suite."""
    path.write_text(
        f"""
[log]
partitions = 4

[serving]
backend = "redis"
redis_url = "{redis_url}"
redis_prefix = "emb:"

[processor]
checkpoint_interval = "1s"

[lake]
path = "{lake}"
roll_interval = "1s"

[query]
sql_max_rows = 1000000
{METRICS_TOML}
"""
    )
    return path


def feed_embedded(server: Any, records: list[dict[str, Any]]) -> None:
    """Post the distributed log's records (client retries included), in log
    order per partition, as client events with their event_ids and their
    corrected event times (no ``sent_at``, so no second skew correction)."""
    import json

    def event(record: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in record.items() if k not in ("ts", "received_at", "distinct_id")}
        out["timestamp"] = record["ts"]
        out["properties"] = json.loads(record["properties"] or "{}")
        for key in ("user_id", "anonymous_id"):
            if not out[key]:
                del out[key]
        return out

    for start in range(0, len(records), 500):
        response = server.post_batch([event(r) for r in records[start : start + 500]])
        assert response.status_code == 200, response.text
        assert not response.json()["rejected"], response.json()["rejected"][:3]


@pytest.fixture
def own_broker() -> Iterator[str]:
    # A broker of its own: the other test's events must not be in this log.
    with running_broker() as bootstrap:
        yield bootstrap


@pytest.mark.slow
def test_processor_group_archiver_and_query_api_survive_a_processor_kill(
    own_broker: str, redis_url: str, tmp_path: Path, server_factory: Any
) -> None:
    """tansu + redis-server + 2 `strata ingest` + 2 `strata process` (one
    consumer group, Redis serving) + 1 `strata archive` + 1 `strata query-api`.

    One processor is killed with -9 while traffic flows; the group moves its
    partitions to the other, which restores their checkpoints and re-executes
    their journals.

    First reference, an *independent computation from the log records*: per
    metric, 2 s window and dimension value, the serving store's windows
    merged over the partition shards must equal count() and exact distinct
    users over the records the processors and the loader both read (late
    events are still folded into their held windows, so every record counts
    once; client retries are in the log twice and count once, as in the raw
    table). Every final window that was not revised later must be in
    `window_results` once with the same count. The raw table and the lake
    must hold exactly the acknowledged event_ids.

    Second reference, the *embedded shape fed the same events*: the
    distributed roles stop, and one `strata serve` gets the distributed
    log's records (retries included) as client events with the same
    event_ids and event times; its raw ids, rollups, live windows, final
    window results and lake must equal the distributed run's
    (``shape_results`` says exactly what is compared and why).
    """
    import pyarrow.parquet as pq

    from strata.processor.engine import window_result_id

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
            _, checkpoint = latest_checkpoint(tmp_path / "processor-state" / f"p{partition}")
            checkpoints.update(checkpoint["offsets"])
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

        # The embedded shape fed the same events equals the distributed one.
        distributed = shape_results(lambda q: sql(api, q), lake, redis_url, "dist:")
        for role in roles:
            role.stop()
        server = server_factory(
            "embedded",
            workers=1,
            config_path=embedded_config(tmp_path / "embedded.toml", redis_url, tmp_path / "lake-e"),
        ).start()
        feed_embedded(server, records)
        server.wait_caught_up(180, include_archiver=True)
        wait_for(
            "the embedded processor to serve every window",
            lambda: served_windows(redis_url, "emb:")[0] == expected,
            detail=lambda: differences(served_windows(redis_url, "emb:")[0], expected),
        )
        wait_for(
            "the embedded archiver",
            lambda: len(set(lake_event_ids(tmp_path / "lake-e"))) >= len(acknowledged),
        )
        embedded = shape_results(
            lambda q: server.sql(q)["rows"], tmp_path / "lake-e", redis_url, "emb:"
        )
        assert_same_results(distributed, embedded)
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


# --- fencing of a superseded partition owner (decision 090) -----------------------------------


def test_a_superseded_owner_is_fenced_out_of_the_serving_store_and_its_files(
    tmp_path: Path, redis_url: str
) -> None:
    """Two fenced processors of partition 0 over one state directory (what two
    group members see when the first stalls past its session timeout): the
    second claims a newer owner epoch and takes over from the first's
    checkpoint; the first, resumed, reads on and tries to write. Its serving
    writes are rejected atomically in Redis (FencedError), its checkpoint is
    refused, its dedup appends go to files the newer owner reads only up to
    its checkpointed lengths, and a third owner restoring the newer owner's
    checkpoint serves exactly what an unfenced processor fed the same records
    serves."""
    from fixtures_processor import fill_log, make_events
    from strata.config import load_config
    from strata.log import open_log
    from strata.processor.runner import Processor
    from strata.serving import FencedError
    from strata.serving.memory import MemoryServingStore
    from strata.serving.redis import RedisServingStore

    config = load_config(
        overrides={"data_dir": str(tmp_path), "log.partitions": 2, "log.fsync": "never"}
    )
    events = make_events(6_000, span_ms=600_000, late_share=0.01)
    fill_log(config, events[:3_000])
    log_ = open_log(config)
    serving = RedisServingStore(redis_url, prefix=f"fence{os.getpid()}:")
    directory = tmp_path / "state" / "p0"

    def cycles(processor: Processor) -> None:
        while processor.lag():
            processor.run_once(wait_s=0)

    def served(store: Any) -> dict[Any, Any]:
        return {
            (s.metric, s.window_start, tuple(s.dims)): (s.count, s.values, s.final)
            for m in ("page_views_by_country", "events_by_type", "active_users")
            for s in store.windows(m, 0, 2**62)
            if s.shard == "p0"
        }

    def drop_fields(windows: dict[Any, Any]) -> dict[Any, Any]:
        return {k: (count, values) for k, (count, values, _) in windows.items()}

    stale = Processor(config, log_, serving, partitions=[0], directory=directory, fenced=True)
    newer = None
    try:
        assert stale.fence is not None
        cycles(stale)
        stale.flush()
        assert served(serving), "the first owner served nothing"
        newer = Processor(config, log_, serving, partitions=[0], directory=directory, fenced=True)
        assert newer.fence is not None and newer.fence.epoch == stale.fence.epoch + 1
        fill_log(config, events[3_000:])
        cycles(newer)
        newer.flush()
        before = served(serving)

        # The stale owner resumes: it reads the new records (admitting them
        # into its own epoch's dedup files) and its first write is rejected.
        with pytest.raises(FencedError, match="superseded"):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                stale.run_once(wait_s=0.05)
        with pytest.raises(FencedError):
            stale.flush()
        assert served(serving) == before, "a fenced write reached Redis"
        checkpoints = sorted(p.name for p in directory.glob("checkpoint*"))
        assert checkpoints == [f"checkpoint-e{newer.fence.epoch}.msgpack"], checkpoints
        assert any(directory.glob(f"dedup/*.e{stale.fence.epoch}.u64"))
    finally:
        stale.close()
        if newer is not None:
            newer.close()

    # A third owner restores the newer owner's checkpoint: the stale appends
    # do not leak into its dedup index or windows.
    third = Processor(config, log_, serving, partitions=[0], directory=directory, fenced=True)
    try:
        cycles(third)
        third.flush()
        restored = served(serving)
    finally:
        third.close()
    memory = MemoryServingStore()
    reference = Processor(config, log_, memory, partitions=[0], directory=tmp_path / "reference")
    try:
        cycles(reference)
        reference.flush()
        expected = served(memory)
    finally:
        reference.close()
    log_.close()
    serving.clear()
    serving.close()
    assert expected and drop_fields(restored) == drop_fields(expected)


@pytest.mark.slow
def test_a_stalled_group_member_is_fenced_when_it_resumes(
    own_broker: str, redis_url: str, tmp_path: Path
) -> None:
    """tansu + redis-server + 2 `strata process --group`. One member is
    stopped with SIGSTOP (alive, holding its session, until the session
    times out), the other takes over its partitions and processes more
    records, then the stalled member is resumed with SIGCONT.

    While it resumes and notices, the served windows never regress from the
    new owner's values; the resumed member logs that it was fenced; the
    group then splits the partitions again, and afterwards every partition's
    newest checkpoint is that of the shard's current owner epoch in Redis,
    and the served windows equal the reference computed from the records."""
    import redis

    from fixtures_processor import fill_log, make_events
    from strata.config import load_config

    prefix = "stall:"
    state_dir = tmp_path / "processor-state"
    config = tmp_path / "strata.toml"
    config.write_text(
        f"""
[log]
backend = "kafka"
partitions = 4
kafka_bootstrap_servers = "{own_broker}"
kafka_session_timeout_ms = 6000

[serving]
backend = "redis"
redis_url = "{redis_url}"
redis_prefix = "{prefix}"

[processor]
embedded = false
state_dir = "{state_dir}"
checkpoint_interval = "1s"
{METRICS_TOML}
"""
    )
    settings = load_config(config)
    events = make_events(6_000, seed=11, span_ms=120_000, late_share=0.01)
    expected = reference_windows(unique_by_event_id(events))
    members = [
        Role(tmp_path, f"process-{i}", ["process", "--group"], config, http=False) for i in range(2)
    ]
    client = redis.Redis.from_url(redis_url)
    try:
        for member in members:
            member.start(ready_line="joined consumer group")
        wait_for(
            "the group to split the partitions",
            lambda: (
                sorted(sum((owned(m) or [] for m in members), [])) == [0, 1, 2, 3]
                and all(owned(m) for m in members)
            ),
        )
        stalled, survivor = members
        stalled_shards = {f"p{p}" for p in owned(stalled) or []}
        fill_log(settings, events[:3_000])
        wait_for(
            "the member to be stalled to serve windows",
            lambda: any(s.shard in stalled_shards for s in served_windows(redis_url, prefix)[1]),
        )
        assert stalled.process is not None
        os.killpg(stalled.process.pid, signal.SIGSTOP)
        try:
            wait_for("the survivor to own every partition", lambda: owned(survivor) == [0, 1, 2, 3])
            fill_log(settings, events[3_000:])
            wait_for(
                "the survivor to process every record",
                lambda: served_windows(redis_url, prefix)[0] == expected,
                detail=lambda: differences(served_windows(redis_url, prefix)[0], expected),
            )
        finally:
            os.killpg(stalled.process.pid, signal.SIGCONT)

        # Nothing new flows: whatever the resumed member tries, the served
        # windows stay the new owner's.
        def noticed() -> bool:
            served = served_windows(redis_url, prefix)[0]
            assert served == expected, differences(served, expected)
            return "fenced (shard p" in stalled.log_path.read_text(errors="replace")

        wait_for("the resumed member to log that it was fenced", noticed, detail=stalled.log_tail)
        wait_for(
            "the group to split the partitions again",
            lambda: (
                sorted((owned(stalled) or []) + (owned(survivor) or [])) == [0, 1, 2, 3]
                and bool(owned(stalled))
            ),
            detail=lambda: (owned(stalled), owned(survivor)),
        )
        for member in members:
            member.stop()  # graceful: checkpoints every owned partition
            assert member.process is not None and member.process.returncode == 0
        served = served_windows(redis_url, prefix)[0]
        assert served == expected, differences(served, expected)
        read = 0
        for partition in range(4):
            directory = state_dir / f"p{partition}"
            epoch, checkpoint = latest_checkpoint(directory)
            assert epoch == int(client.get(f"{prefix}owner:p{partition}") or 0)
            assert checkpoint["owner_epoch"] == epoch
            assert len(list(directory.glob("checkpoint*"))) == 1
            read += sum(int(o) for o in checkpoint["offsets"].values())
        assert read == len(events)
    finally:
        for member in members:
            if member.process is not None and member.process.poll() is None:
                os.killpg(member.process.pid, signal.SIGCONT)
            member.stop()
        client.close()
