"""The loader's insert path (chDB reading the Arrow batch in place, decision
101) stores exactly the rows the reference path stores: clickhouse-connect's
``insert_arrow`` of the same decoded batch, the path the loader used before.

The corpus is awkward on purpose: unicode everywhere, nested and huge-number
properties, nulls and missing fields in log records, client retries (a
repeated event_id in a later batch) and late events; loaded in micro-batches
of a few records, so rows cross batch boundaries, and once more after a
crash between an insert and its checkpoint."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pytest

from strata.config import load_config
from strata.events import Normalizer, now_ms
from strata.loader.loader import Loader
from strata.loader.sinks import EVENTS_SINK, LATE_EVENTS_SINK, WINDOW_RESULTS_SINK, Sink
from strata.log import open_log
from strata.store import Store

PARTITIONS = 3
HOUR_MS = 3_600_000


def _raw_events(now: int) -> list[dict[str, object]]:
    """Client events, as the SDK would send them."""
    nested = {
        "a": {"b": [1, None, 1e308, -0.0, "x"]},
        "big": 2**70,
        "neg": -(2**63),
        "unicode": "grüße 🚀 \u202e",
        "empty": {},
        "list": [[], [{}]],
    }
    events: list[dict[str, object]] = []
    for i in range(40):
        event: dict[str, object] = {
            "event_id": f"e-{i:03d}-ü",
            "event_type": ["page_view", "purchase", "signup", "ß事件"][i % 4],
            "user_id": f"user-{i % 7}-日本",
            "timestamp": now - (i % 5) * 1_000,
        }
        if i % 3 == 0:
            event["properties"] = nested
        if i % 4 == 1:
            event["revenue"] = [0.1, 1e15, 12345.678, 0.0][i // 4 % 4]
            event["currency"] = "EUR"
        if i % 5 == 0:
            event.update(
                country="DE",
                platform="ios",
                os="iOS 17",
                app_version="1.2.3",
                path='/a b/ç?q=1&x="y"',
                referrer="https://例え.jp/",
            )
        events.append(event)
    events.append({"event_type": "page_view", "anonymous_id": "anon-only", "timestamp": now})
    # Late: event time hours behind the others (stored raw all the same).
    events.append(
        {
            "event_id": "late-1",
            "event_type": "page_view",
            "user_id": "user-1-日本",
            "timestamp": now - 20 * HOUR_MS,
        }
    )
    return events


def _hand_written_records(now: int) -> list[bytes]:
    """Log records not from today's normalizer: nulls, missing fields, extra
    fields (an older or newer writer of the topic)."""
    records: list[dict[str, object]] = [
        {
            "event_id": "hand-null",
            "event_type": "page_view",
            "user_id": "h1",
            "anonymous_id": None,
            "distinct_id": "h1",
            "session_id": None,
            "ts": now,
            "received_at": now,
            "country": None,
            "platform": None,
            "os": None,
            "app_version": None,
            "path": None,
            "referrer": None,
            "revenue": None,
            "currency": None,
            "properties": None,
        },
        {
            "event_id": "hand-missing",
            "event_type": "page_view",
            "distinct_id": "h2",
            "ts": now,
            "received_at": now,
        },
        {
            "event_id": "hand-extra",
            "event_type": "purchase",
            "user_id": "h3",
            "distinct_id": "h3",
            "ts": now,
            "received_at": now,
            "revenue": 9_007_199_254_740_993,
            "properties": '{"k":"\\u0000 null byte"}',
            "unknown_field": {"x": [1, 2]},
        },
    ]
    encoded = [msgspec.json.encode(record) for record in records]
    # Written by hand: whitespace, another key order, escapes, exponents.
    encoded += [
        b'{ "received_at" : %d , "ts":%d, "distinct_id":"h4", "event_type" : "page_view",'
        rb' "event_id":"hand-text", "path":"\\back\\slash \"q\" \ud83d\ude80 \u00e9\t",'
        rb' "revenue": 1.5E3, "properties":"{\"n\":-0.0,\"s\":\"\u2028\"}" }' % (now, now),
        b'{"event_id":"hand-tiny","event_type":"purchase","distinct_id":"h5","ts":%d,'
        b'"received_at":%d,"revenue":-4.9e-324,"currency":"'
        % (now, now)
        + ("x" * 5000).encode()
        + b'"}',
    ]
    return encoded


def _produce_corpus(log, now: int) -> None:
    normalizer = Normalizer(
        partitions=PARTITIONS, max_future_skew_ms=600_000, max_event_age_ms=86_400_000
    )
    raw = [msgspec.json.encode(e) for e in _raw_events(now)]
    accepted, rejected = normalizer.normalize(raw, sent_at_ms=None, received_at_ms=now)
    assert not rejected
    producer = log.producer()
    for partition, value, _ in accepted:
        producer.produce("events", partition, None, value)
    for i, value in enumerate(_hand_written_records(now)):
        producer.produce("events", i % PARTITIONS, None, value)
    # Client retries: the same records again, later in the log.
    for partition, value, _ in accepted[:12]:
        producer.produce("events", partition, None, value)
    producer.flush()


def _reference_rows(log, store: Store) -> list[tuple]:
    """The rows the loader must store: every record of the topic decoded by
    the sink, the first of each event_id per partition kept, inserted with
    clickhouse-connect's insert_arrow into a copy of the table."""
    store.command("DROP TABLE IF EXISTS events_reference")
    store.command("CREATE TABLE events_reference AS events")
    consumer = log.consumer("equivalence-reference", "events")
    consumer.assign(list(range(PARTITIONS)))
    tables = []
    for partition in range(PARTITIONS):
        consumer.seek(partition, 0)
    batches = consumer.poll_batches(10_000, timeout_s=0)
    for batch in batches:
        table = EVENTS_SINK.decode(batch.values)
        offsets = np.arange(batch.first_offset, batch.first_offset + len(batch.values))
        seen: set[str] = set()
        keep = []
        for event_id in table.column("event_id").to_pylist():
            keep.append(event_id not in seen)
            seen.add(event_id)
        mask = np.array(keep)
        table = table.filter(pa.array(mask))
        tables.append(
            EVENTS_SINK.finish(table, np.full(table.num_rows, batch.partition), offsets[mask])
        )
    consumer.close()
    store.insert_arrow("events_reference", pa.concat_tables(tables).combine_chunks())
    return _rows(store, "events_reference")


def _rows(store: Store, table: str) -> list[tuple]:
    _, rows = store.query_rows(f"SELECT * FROM {table} ORDER BY _partition, _offset")
    return rows


def _loader(config, log, store: Store) -> Loader:
    return Loader(
        log,
        store,
        EVENTS_SINK,
        config.data_path / "loader" / "events",
        dedup_horizon_ms=86_400_000,
        max_batch_events=5,
    )


@pytest.fixture
def corpus(tmp_path: Path):
    config = load_config(
        overrides={"data_dir": str(tmp_path), "log.partitions": PARTITIONS, "log.fsync": "never"},
        environ={},
    )
    log = open_log(config)
    store = Store.open(config)
    _produce_corpus(log, now_ms())
    yield config, log, store
    store.close()
    log.close()


def _drain(loader: Loader) -> None:
    while loader.run_once(timeout_s=0):
        pass


def _rollup_events(store: Store) -> int:
    return int(store.scalar("SELECT countMerge(events) FROM rollup_events_by_type_5m"))


def test_loader_stores_the_rows_the_reference_path_stores(corpus) -> None:
    config, log, store = corpus
    loader = _loader(config, log, store)
    _drain(loader)
    loader.close()
    stored = _rows(store, "events")
    assert loader.stats.batches > 10  # many micro-batch boundaries
    assert loader.stats.duplicate_rows == 12
    reference = _reference_rows(log, store)
    assert len(reference) == 47  # 42 normalized + 5 hand-written, retries dropped
    assert stored == reference
    columns, _ = store.query_rows("SELECT * FROM events LIMIT 0")
    by_id = {row[columns.index("event_id")]: dict(zip(columns, row, strict=True)) for row in stored}
    # Not just equal: the awkward values themselves survive.
    nested = msgspec.json.decode(by_id["e-000-ü"]["properties"])
    assert nested["big"] == 2**70 and nested["unicode"] == "grüße 🚀 \u202e"
    assert by_id["e-003-ü"]["event_type"] == "ß事件"
    assert by_id["hand-null"]["anonymous_id"] == "" and by_id["hand-null"]["revenue"] == 0.0
    assert by_id["hand-missing"]["properties"] == ""
    assert by_id["hand-extra"]["properties"] == '{"k":"\\u0000 null byte"}'
    assert by_id["e-005-ü"]["path"] == '/a b/ç?q=1&x="y"'
    assert "late-1" in by_id
    assert by_id["hand-text"]["path"] == '\\back\\slash "q" 🚀 é\t'
    assert by_id["hand-text"]["revenue"] == 1500.0
    assert by_id["hand-tiny"]["revenue"] == -5e-324 and len(by_id["hand-tiny"]["currency"]) == 5000
    assert _rollup_events(store) == len(stored)


def test_a_replay_after_a_crash_between_insert_and_checkpoint_stores_the_same_rows(
    corpus,
) -> None:
    config, log, store = corpus
    loader = _loader(config, log, store)
    for _ in range(3):
        loader.run_once(timeout_s=0)
    insert = loader._insert

    def insert_then_crash(data: pa.Table, token: str) -> None:
        insert(data, token)
        raise SystemExit("simulated crash after the insert, before the checkpoint")

    loader._insert = insert_then_crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        loader.run_once(timeout_s=0)
    loader.close()
    restarted = _loader(config, log, store)  # re-executes the pending plan
    _drain(restarted)
    restarted.close()
    stored = _rows(store, "events")
    assert stored == _reference_rows(log, store)
    assert restarted.stats.repaired_missing_rows == 0
    assert restarted.stats.repaired_duplicate_rows == 0
    assert _rollup_events(store) == len(stored)


def _record_of(sink: Sink, i: int, now: int) -> dict[str, object]:
    """A record of ``sink`` with every field set from its type; some left
    out or null."""
    record: dict[str, object] = {}
    for field in sink.schema:
        if pa.types.is_string(field.type):
            value: object = f"{field.name}-{i % 4}-ß🚀" if field.name != sink.id_field else f"id{i}"
        elif pa.types.is_boolean(field.type):
            value = i % 2 == 0
        elif field.type == pa.uint16():
            value = 65_535 - i
        elif field.type == pa.uint64():
            value = 2**64 - 1 - i
        elif pa.types.is_floating(field.type):
            value = i / 3
        else:
            value = now - i * 1_000
        record[field.name] = value
    if i % 3 == 1:
        # Not the times: a row at 1970 would be dropped by the table's TTL.
        optional = [
            f.name
            for f in sink.schema
            if f.name not in sink.key_fields and f.name not in sink.timestamp_fields
        ]
        record[optional[i % len(optional)]] = None
        record.pop(optional[(i + 1) % len(optional)], None)
    return record


@pytest.mark.parametrize("sink", [WINDOW_RESULTS_SINK, LATE_EVENTS_SINK], ids=lambda s: s.topic)
def test_other_sinks_store_the_rows_of_the_reference_path(tmp_path: Path, sink: Sink) -> None:
    config = load_config(
        overrides={"data_dir": str(tmp_path), "log.partitions": 2, "log.fsync": "never"},
        environ={},
    )
    log = open_log(config)
    store = Store.open(config)
    try:
        now = now_ms()
        values = [msgspec.json.encode(_record_of(sink, i, now)) for i in range(30)]
        producer = log.producer()
        for i, value in enumerate(values):
            producer.produce(sink.topic, i % 2, None, value)
        producer.flush()
        loader = Loader(
            log, store, sink, tmp_path / "loader", dedup_horizon_ms=86_400_000, max_batch_events=4
        )
        while loader.run_once(timeout_s=0):
            pass
        loader.close()
        store.command(f"CREATE TABLE {sink.table}_reference AS {sink.table}")
        tables = []
        for partition in range(2):
            part = [v for i, v in enumerate(values) if i % 2 == partition]
            tables.append(
                sink.finish(sink.decode(part), np.full(len(part), partition), np.arange(len(part)))
            )
        store.insert_arrow(f"{sink.table}_reference", pa.concat_tables(tables))
        order = "ORDER BY _partition, _offset"
        _, stored = store.query_rows(f"SELECT * FROM {sink.table} {order}")
        _, reference = store.query_rows(f"SELECT * FROM {sink.table}_reference {order}")
        assert len(stored) == 30
        assert stored == reference
    finally:
        store.close()
        log.close()
