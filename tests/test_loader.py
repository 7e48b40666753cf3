"""The loader over a real embedded log and chDB: exactly once across
re-executed plans, client retries, and restarts."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
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


def _pending_plan(config, log, store) -> tuple[pa.Table, str]:
    """A loader that wrote its plan to the checkpoint and then died, before
    inserting: returns the plan's rows, as the loader inserts them, and its
    token."""
    loader = _loader(config, log, store)
    batches = loader.consumer.poll_batches(500, timeout_s=0)
    ranges = {b.partition: (b.first_offset, b.last_offset) for b in batches}
    loader._write_checkpoint(ranges)
    rows = []
    for batch in batches:
        table = EVENTS_SINK.decode(batch.values)
        offsets = pa.array(range(batch.first_offset, batch.last_offset + 1)).to_numpy()
        rows.append(EVENTS_SINK.finish(table, offsets * 0 + batch.partition, offsets))
    token = loader.dedup_token(ranges)
    loader.close()
    return pa.concat_tables(rows).combine_chunks(), token


def _views(store: Store) -> list[str]:
    _, rows = store.query_rows(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        "AND engine = 'MaterializedView'"
    )
    return [row[0] for row in rows]


def _insert_raw_only(store: Store, data: pa.Table, token: str) -> None:
    """Insert into `events` with every rollup view detached: the store writes
    the raw part (and records the token) and nothing else, as a kill -9 does
    in the middle of an insert (chDB commits the raw part, then each view's)."""
    views = _views(store)
    for view in views:
        store.command(f"DETACH TABLE {view}")
    try:
        store.insert_arrow("events", data, dedup_token=token)
    finally:
        for view in views:
            store.command(f"ATTACH TABLE {view}")


def _assert_exactly_once(store: Store, n: int) -> None:
    assert store.scalar("SELECT count() FROM events") == n
    assert store.scalar("SELECT uniqExact(_partition, _offset) FROM events") == n
    assert store.scalar("SELECT uniqExact(event_id) FROM events") == n
    for granularity in ("5m", "1d"):
        assert store.scalar(
            f"SELECT countMerge(events) FROM rollup_events_by_type_{granularity}"
        ) == n


def test_a_repeated_plan_is_dropped_only_if_it_is_chunked_the_same(setup) -> None:
    """Why the loader sends every plan as one Arrow chunk (combine_chunks):
    chDB derives a block's deduplication id from the token *and* the
    insert's chunk structure. The same rows with the same token are dropped
    when re-sent as one chunk, even past the default max_insert_block_size
    (1,048,449 rows), but stored again when re-sent in three chunks."""
    _, _, store, _, _ = setup
    store.command("CREATE TABLE probe (o UInt64) ENGINE = MergeTree ORDER BY o "
                  "SETTINGS non_replicated_deduplication_window = 100")
    n = 1_100_000
    data = pa.table({"o": pa.array(range(n), pa.uint64())})
    store.insert_arrow("probe", data, dedup_token="plan")
    store.insert_arrow("probe", data, dedup_token="plan")
    store.insert_arrow("probe", data.slice(0, 1000), dedup_token="plan")  # other rows, one chunk
    assert store.scalar("SELECT count() FROM probe") == n
    chunked = pa.Table.from_batches(data.to_batches(max_chunksize=n // 3 + 1))
    assert chunked.column(0).num_chunks == 3
    store.insert_arrow("probe", chunked, dedup_token="plan")
    assert store.scalar("SELECT count() FROM probe") == 2 * n


def test_a_plan_whose_token_was_recorded_but_whose_part_was_not_is_restored(setup) -> None:
    """kill -9 between the two steps of a chDB insert: the token is in the
    table's deduplication log, the part never got its final name (start-up
    deletes it). Re-inserting with the token is dropped, so the loader must
    find the rows missing and attach them, without feeding the rollups twice."""
    config, log, store, accepted, _ = setup
    data, token = _pending_plan(config, log, store)
    _insert_raw_only(store, data, token)
    _, rows = store.query_rows("SELECT DISTINCT path FROM system.parts "
                               "WHERE table = 'events' AND active")
    store.close()
    for (path,) in rows:  # the plan is the table's only insert so far
        shutil.rmtree(path)
    reopened = Store.open(config)
    try:
        assert reopened.scalar("SELECT count() FROM events") == 0
        restarted = _loader(config, log, reopened)  # re-executes the pending plan
        assert restarted.stats.repaired_missing_rows == data.num_rows
        _drain(restarted)
        _assert_exactly_once(reopened, len(accepted))
    finally:
        reopened.close()


def test_a_plan_whose_part_was_committed_without_its_token_is_stored_once(setup) -> None:
    """The other order (upstream ClickHouse records the token after the
    part): a kill -9 between them leaves the rows without their token, so
    the re-execution stores them again; the loader removes the copies."""
    config, log, store, accepted, _ = setup
    data, token = _pending_plan(config, log, store)
    _insert_raw_only(store, data, "a token the store never recorded")
    restarted = _loader(config, log, store)
    assert restarted.stats.repaired_duplicate_rows == data.num_rows
    _drain(restarted)
    _assert_exactly_once(store, len(accepted))


@pytest.mark.parametrize("daily_1d_partitions", [False, True])
def test_rollup_partitions_of_a_re_executed_plan_are_rebuilt_from_raw(
    setup, daily_1d_partitions: bool
) -> None:
    """A rollup that lost the plan's block while keeping its token (the
    re-execution is dropped there) is rebuilt from the raw table; a
    month-partitioned daily rollup keeps the month's other days, and a data
    directory from before decision 080 (daily rollups by day) works too."""
    from strata.store import ddl

    config, log, store, accepted, _ = setup
    if daily_1d_partitions:
        for metric in store.metrics:
            store.command(f"DROP TABLE mv_{metric.name}_1d")
            store.command(f"DROP TABLE {metric.rollup_table('1d')}")
            for statement in ddl.rollup_statements(metric, "1d", rollup_5m_ttl_seconds=1):
                store.command(statement.replace("toYYYYMM(window_start)",
                                                "toYYYYMMDD(window_start)"))
    today = time.gmtime(now_ms() // 1000)
    other = f"{today.tm_year:04d}-{today.tm_mon:02d}-{1 if today.tm_mday >= 3 else 28:02d}"
    store.command("INSERT INTO rollup_events_by_type_1d (window_start, event_type, events) "
                  f"SELECT toDateTime('{other}', 'UTC'), 'signup', countState() "
                  "FROM numbers(7)")
    data, token = _pending_plan(config, log, store)
    store.insert_arrow("events", data, dedup_token=token)
    plan_days = {time.strftime("%Y-%m-%d", time.gmtime(t // 1000))
                 for t in data.column("ts").cast(pa.int64()).to_pylist()}
    for granularity in ("5m", "1d"):  # the parts are gone, the tokens are not
        store.command(f"ALTER TABLE rollup_events_by_type_{granularity} DELETE WHERE "
                      "toDate(window_start) IN {days:Array(Date)} SETTINGS mutations_sync = 2",
                      {"days": sorted(plan_days)})
    restarted = _loader(config, log, store)  # re-executes the pending plan
    assert restarted.stats.repaired_missing_rows == restarted.stats.repaired_duplicate_rows == 0
    assert restarted.stats.repaired_rollup_partitions >= 2 * len(store.metrics)
    _drain(restarted)
    assert store.scalar("SELECT countMerge(events) FROM rollup_events_by_type_1d "
                        f"WHERE window_start = toDateTime('{other}', 'UTC')") == 7
    store.command("ALTER TABLE rollup_events_by_type_1d DELETE WHERE event_type = 'signup' "
                  "SETTINGS mutations_sync = 2")
    _assert_exactly_once(store, len(accepted))


_KILLED_LOADER = """
import sys
from pathlib import Path
from strata.config import load_config
from strata.loader.loader import Loader
from strata.loader.sinks import EVENTS_SINK
from strata.log import open_log
from strata.store import Store

config = load_config(overrides={"data_dir": sys.argv[1], "log.partitions": 4,
                                "log.fsync": "never"}, environ={})
log, store = open_log(config), Store.open(config)
loader = Loader(log, store, EVENTS_SINK, config.data_path / "loader" / "events",
                dedup_horizon_ms=86_400_000, max_batch_events=500)
loader.run_once(timeout_s=0)
print("not killed")
"""


def _kill_loader_at_commit(tmp_path: Path, table: str, level: int):
    """Run a loader cycle in a child process that strace kills with SIGKILL
    as chDB enters the rename committing the insert's part of ``table``
    (after the insert's token was written to that table's deduplication
    log). Returns (config, accepted events)."""
    config, log, store, accepted, _ = _setup(tmp_path)
    _, rows = store.query_rows("SELECT data_paths[1] FROM system.tables WHERE name = {t:String}",
                               {"t": table})
    table_dir = rows[0][0]
    store.close()
    log.close()
    days = {time.strftime("%Y%m%d", time.gmtime(msgspec.json.decode(value)["ts"] // 1000))
            for _, value, _ in accepted}
    if len(days) != 1:
        pytest.skip("the events straddle midnight: more than one part per insert")
    (day,) = days
    part = f"{table_dir}tmp_insert_{day}_1_1_{level}/"
    trace = tmp_path / "strace.out"
    child = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=rename", "-P", part,
         "-e", "inject=rename:signal=KILL:when=1",
         sys.executable, "-c", _KILLED_LOADER, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == -signal.SIGKILL or "killed by SIGKILL" in trace.read_text(), (
        child.stdout + child.stderr)
    return config, accepted


def _strace_works() -> bool:
    """strace is installed and this machine lets it trace (ptrace may be denied)."""
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


needs_strace = pytest.mark.skipif(not _strace_works(),
                                  reason="needs a working strace (syscall fault injection)")


@needs_strace
def test_a_real_kill_9_between_the_token_and_the_raw_part_is_repaired(tmp_path: Path) -> None:
    """The crash itself, not a rebuilt state: SIGKILL as chDB commits the
    first insert's part of `events`. The restarted loader re-executes the
    plan, the store drops the re-sent raw rows (their token is recorded)
    and the loader attaches them; the rollups got them from the re-sent
    insert."""
    config, accepted = _kill_loader_at_commit(tmp_path, "events", 0)
    log, store = open_log(config), Store.open(config)
    try:
        assert store.scalar("SELECT count() FROM events") == 0
        restarted = _loader(config, log, store)  # re-executes the pending plan
        assert restarted.stats.repaired_missing_rows > 0
        _drain(restarted)
        _assert_exactly_once(store, len(accepted))
    finally:
        store.close()
        log.close()


@needs_strace
def test_a_real_kill_9_between_the_token_and_a_rollup_part_is_rebuilt(tmp_path: Path) -> None:
    """SIGKILL as chDB commits the 5-minute rollup's part (its token is
    already recorded): the re-executed plan is dropped there as a duplicate,
    so the loader rebuilds the rollup partitions the plan touches from the
    (exact) raw table, in both granularities."""
    config, accepted = _kill_loader_at_commit(tmp_path, "rollup_events_by_type_5m", 1)
    log, store = open_log(config), Store.open(config)
    try:
        restarted = _loader(config, log, store)  # re-executes the pending plan
        # Every rollup table of every metric: one day (5m), one month (1d).
        assert restarted.stats.repaired_rollup_partitions == 2 * len(store.metrics)
        _drain(restarted)
        _assert_exactly_once(store, len(accepted))
    finally:
        store.close()
        log.close()
