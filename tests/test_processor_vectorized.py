"""The engine's vectorized fast paths give the same answers as the general
ones: in-place hashing of fixed-width strings, fixed-width dimension codes,
selections where no row passes, compacted group keys, and late events
located across runs (docs/benchmarks.md, "Stream processor")."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from strata.config import MetricConfig
from strata.loader.sinks import EVENTS_SINK
from strata.metrics import compile_metric
from strata.processor import engine as engine_module
from strata.processor.engine import WindowEngine
from strata.serving.state import UniqSketch, finalize, hash_strings, hash_strings_at

MIN = 60_000


def metric(name: str, dimensions: list[str], filter: str = "", **aggregations: str):
    return compile_metric(
        MetricConfig(
            name=name,
            filter=filter,
            dimensions=dimensions,
            aggregations=aggregations or {"n": "count()", "users": "uniq(user_id)"},
            window="1m",
            out_of_orderness="0s",
        )
    )


def row(i: int, ts: int, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {name: "" for name in EVENTS_SINK.schema.names}
    out.update(
        event_id=f"e{i}",
        event_type="page_view",
        user_id=f"u{i % 7}",
        distinct_id=f"u{i % 7}",
        ts=ts,
        received_at=ts,
        revenue=0.0,
        properties="{}",
    )
    out.update(fields)
    return out


def table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EVENTS_SINK.schema)


def new_engine(metrics: list, partitions=(0,)) -> WindowEngine:
    return WindowEngine(
        metrics,
        partitions=list(partitions),
        idle_timeout_ms=10**12,
        retention_ms=10 * MIN,
        now_ms=0,
    )


def results(subject: WindowEngine, metrics: list) -> dict[tuple, dict[str, Any]]:
    by_name = {m.name: m for m in metrics}
    out = {}
    for state in subject.all_states():
        values = [UniqSketch.from_bytes(v) if isinstance(v, bytes) else v for v in state.values]
        key = (state.metric, state.window_start, tuple(state.dims))
        out[key] = finalize(by_name[state.metric], state.count, values)
    return out


def expected(events: list[dict[str, Any]], m, keep=lambda e: True) -> dict[tuple, dict[str, Any]]:
    """Counts and exact distinct users per (window, dims), one event at a time."""
    groups: dict[tuple, list] = defaultdict(lambda: [0, set()])
    for e in events:
        if keep(e):
            start = e["ts"] // m.window_ms * m.window_ms
            group = groups[(m.name, start, tuple(e[d] or "" for d in m.dimensions))]
            group[0] += 1
            group[1].add(e["user_id"] or "")
    return {key: {"n": count, "users": len(users)} for key, (count, users) in groups.items()}


@pytest.mark.parametrize(
    "column",
    [
        pa.chunked_array([["abcdefghijk"] * 5 + ["zyxwvutsrqp"], ["ab", "cd", "ef"], ["x", ""]]),
        pa.chunked_array([["12345678"] * 4, ["", ""], pa.array(["a", None, "b"])]),
        pa.chunked_array([pa.array(["q" * 40, "hello world!", "HELLO WORLD!", "ü-1"]).slice(1)]),
        pa.chunked_array([["x" * 17, "y" * 17], ["é" * 8, "ü" * 8], []], type=pa.string()),
        pa.array([f"user-{i:06d}" for i in range(300)]),
    ],
)
def test_hashing_rows_in_place_equals_hashing_taken_values(column) -> None:
    rng = np.random.default_rng(7)
    n = len(column)
    subsets = [None, np.arange(n), np.sort(rng.choice(n, n // 2, replace=False)), np.arange(0)]
    for rows in subsets:
        taken = column if rows is None else column.take(pa.array(rows, type=pa.int64()))
        got = hash_strings_at(column, rows)
        assert got.dtype == np.uint64
        assert np.array_equal(got, hash_strings(taken))


def test_dimension_codes_across_fixed_and_variable_width_batches() -> None:
    """Batch 1 has fixed-width countries and users (the integer codes and
    word hashes); batch 2 brings new values, other widths and nulls (the
    general path); then fixed widths 2, 3, 8 (two-byte characters too),
    mixed widths past 8, and empty user ids."""
    m = metric("m", ["country"])
    batches = [
        [row(i, i * 1000, country=["DE", "FR"][i % 2], user_id=f"u{i % 5}") for i in range(20)],
        [
            row(100 + i, 20_000 + i * 1000, country=["USA", "DE", None, "F"][i % 4])
            for i in range(20)
        ],
        [row(200 + i, 40_000 + i * 500, country=["IT", "FR"][i % 2]) for i in range(30)],
        [row(300 + i, 55_000 + i * 100, country=["USA", "GBR"][i % 2]) for i in range(10)],
        [row(400 + i, 56_000 + i * 100, country=["ABCDEFGH", "ÄÖÜÄ"][i % 2]) for i in range(10)],
        [row(500 + i, 57_000 + i * 100, country=["ABCDEFGHI", "Z"][i % 2]) for i in range(10)],
        [row(600 + i, 58_000 + i * 100, country="Ü", user_id="") for i in range(10)],
    ]
    subject = new_engine([m])
    for rows in batches:
        subject.process(0, table(rows), 0)
    events = [e for rows in batches for e in rows]
    assert results(subject, [m]) == expected(events, m)
    # The same stream in one batch, and cut differently, gives the same sketches.
    for cuts in ([110], [3, 41, 26, 40], [1] * 110):
        other, position = new_engine([m]), 0
        for size in cuts:
            other.process(0, table(events[position : position + size]), 0)
            position += size
        assert other.all_states() == subject.all_states()


def test_a_batch_where_no_row_passes_the_filter() -> None:
    views = metric("views", ["country"], filter="event_type = 'page_view'")
    everything = metric("everything", ["country"])
    subject = new_engine([views, everything])
    clicks = [row(i, i * 1000, event_type="click", country="DE") for i in range(10)]
    subject.process(0, table(clicks), 0)
    assert results(subject, [views, everything]) == expected(clicks, everything)
    later = [row(10 + i, 10_000 + i * 1000, country="SE") for i in range(10)]
    subject.process(0, table(later), 0)
    page_view = lambda e: e["event_type"] == "page_view"  # noqa: E731
    want = {**expected(later, views, page_view), **expected(clicks + later, everything)}
    assert results(subject, [views, everything]) == want


@pytest.mark.parametrize("dense_limit", [1 << 22, 64, 4])
def test_group_keys_past_the_dense_limit(monkeypatch, dense_limit: int) -> None:
    """Many dimension values: the group key is compacted (np.unique) when
    the mixed-radix space would pass the dense limit, and grouped by sort
    past it; every path gives the same groups."""
    monkeypatch.setattr(engine_module, "_DENSE_LIMIT", dense_limit)
    m = metric("m", ["path", "platform"])
    rng = np.random.default_rng(3)
    events = [
        row(
            i,
            int(rng.integers(0, 5 * MIN)),
            path=f"/p{int(rng.integers(0, 40))}",
            platform=["web", "ios", "android"][int(rng.integers(0, 3))],
            user_id=f"user-{int(rng.integers(0, 30))}",
        )
        for i in range(400)
    ]
    events.sort(key=lambda e: e["ts"])
    subject = new_engine([m])
    for start in range(0, len(events), 150):
        subject.process(0, table(events[start : start + 150]), 0)
    assert results(subject, [m]) == expected(events, m)


def test_late_events_are_located_across_runs_with_and_without_offsets() -> None:
    """Late rows of several runs (one with an ``_offset`` column, one with
    consecutive offsets, and the same partition twice) keep their event,
    partition and log offset, in arrival order."""
    m = metric("m", ["country"])
    subject = new_engine([m], partitions=(0, 1))
    subject.process_many([(0, table([row(0, 10 * MIN)]), 0), (1, table([row(1, 10 * MIN)]), 0)], 0)
    filtered = table([row(10, 1000), row(11, 11 * MIN), row(12, 2000)]).append_column(
        "_offset", pa.array([7, 9, 12], type=pa.int64())
    )
    step = subject.process_many(
        [
            (0, table([row(20, 11 * MIN), row(21, 3000)]), 100),
            (1, filtered, 0),
            (0, table([row(30, 4000)]), 102),
        ],
        0,
    )
    got = [(late.event_id, late.partition, late.offset, late.window_start) for late in step.late]
    assert got == [("e21", 0, 101, 0), ("e10", 1, 7, 0), ("e12", 1, 12, 0), ("e30", 0, 102, 0)]


def test_late_columns_are_taken_per_run_in_row_order() -> None:
    """Rows in any order, from a single-chunk run and a run whose table has
    two chunks."""
    first = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    second = pa.concat_tables(
        [pa.table({"a": [4, 5], "b": ["p", "q"]}), pa.table({"a": [6], "b": ["r"]})]
    )
    batch = engine_module._Batch(
        [(0, first, 0), (1, second, 10)], pa.concat_tables([first, second]), np.arange(6)
    )
    rows = np.array([5, 0, 3, 4, 2])
    assert batch.take_pylist(rows, ["a", "b"]) == {
        "a": [6, 1, 4, 5, 3],
        "b": ["r", "x", "p", "q", "z"],
    }
    assert batch.locate(rows) == ([1, 0, 1, 1, 0], [12, 0, 10, 11, 2])
