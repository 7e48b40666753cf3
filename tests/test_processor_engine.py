"""The windowing engine: hand-made streams for each semantic rule, and a
property test against a per-event reference implementation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.config import ConfigError, MetricConfig
from strata.loader.sinks import EVENTS_SINK
from strata.metrics import compile_metric
from strata.processor.engine import (
    NO_TIME,
    Step,
    WindowEngine,
    decode_snapshot,
    encode_snapshot,
)
from strata.processor.filters import compile_filter
from strata.serving.state import UniqSketch, finalize

SEED = compile_metric(
    MetricConfig(
        name="page_views_by_country",
        filter="event_type = 'page_view'",
        dimensions=["country"],
        aggregations={"views": "count()", "users": "uniq(user_id)"},
        window="5m",
        out_of_orderness="30s",
        allowed_lateness="0s",
    )
)
MIN = 60_000


def event(i: int, ts: int, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "event_id": f"e{i}",
        "event_type": "page_view",
        "user_id": f"u{i % 3}",
        "anonymous_id": "",
        "distinct_id": f"u{i % 3}",
        "session_id": "",
        "ts": ts,
        "received_at": ts,
        "country": "DE",
        "platform": "web",
        "os": "",
        "app_version": "",
        "path": "/",
        "referrer": "",
        "revenue": 0.0,
        "currency": "",
        "properties": "{}",
    }
    row.update(fields)
    if "user_id" in fields and "distinct_id" not in fields:
        row["distinct_id"] = fields["user_id"]
    return row


def table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EVENTS_SINK.schema)


def engine(metrics=(SEED,), partitions=(0,), idle=10**12, retention=3_600_000, now=0):
    return WindowEngine(
        list(metrics),
        partitions=list(partitions),
        idle_timeout_ms=idle,
        retention_ms=retention,
        now_ms=now,
    )


def values_of(state) -> dict[str, Any]:
    metric = SEED
    return finalize(
        metric,
        state.count,
        [UniqSketch.from_bytes(v) if isinstance(v, bytes) else v for v in state.values],
    )


# -- hand-made streams -------------------------------------------------------------------


def test_out_of_order_within_the_bound_counts() -> None:
    e = engine()
    step = e.process(0, table([event(0, 100_000), event(1, 200_000), event(2, 90_000)]), 0)
    assert not step.late
    # 4:50 is more than 30 s behind 3:20 ... but still inside the bound of the
    # window [0, 5m): the watermark (3:20 - 30 s) has not passed 5:00.
    step2 = e.process(0, table([event(3, 290_000), event(4, 10_000)]), 0)
    assert not step2.late
    step3 = e.process(0, table([event(5, 331_000)]), 0)  # watermark 5:01 > 5:00
    [final] = step3.finals
    assert final.window_start == 0 and final.final and final.count == 5
    assert values_of(final) == {"views": 5, "users": 3}


def test_beyond_the_bound_goes_to_the_side_output_and_is_corrected() -> None:
    e = engine()
    first = e.process(0, table([event(0, 10_000), event(1, 400_000)]), 0)
    [final] = first.finals
    assert final.count == 1 and final.revision == 0
    step = e.process(0, table([event(2, 20_000, country="DE"), event(3, 350_000)]), 0)
    [late] = step.late
    assert (late.event_id, late.metric, late.window_start, late.window_end) == (
        "e2",
        "page_views_by_country",
        0,
        5 * MIN,
    )
    assert late.id == "e2|page_views_by_country" and late.window_held
    assert step.revised == [("page_views_by_country", 0, 5 * MIN)]
    assert not step.finals  # a window fires once
    revised = {s.window_start: s for s in e.take_dirty()}[0]
    assert revised.count == 2 and revised.revision == 1 and revised.final


def test_late_event_for_an_evicted_window_only_goes_to_the_side_output() -> None:
    e = engine(retention=5 * MIN)
    e.process(0, table([event(0, 10_000), event(1, 11 * MIN)]), 0)
    step = e.process(0, table([event(2, 20_000)]), 0)
    [late] = step.late
    assert not late.window_held and not step.revised
    assert all(s.window_start != 0 for s in e.all_states())
    assert ("page_views_by_country", "all", 0, ("DE",)) in e.advance(0).evicted or True


def test_an_idle_partition_stops_holding_the_watermark_after_the_timeout() -> None:
    e = engine(partitions=(0, 1), idle=10_000, now=1_000_000)
    step = e.process(0, table([event(0, 10_000), event(1, 400_000)]), 1_000_000)
    assert not step.finals and e.watermark_ms() is None  # partition 1 has never spoken
    assert not e.advance(1_009_999).finals
    step = e.advance(1_010_000)  # partition 1 idle for 10 s of wall clock
    [final] = step.finals
    assert final.window_start == 0 and e.watermark_ms() == 370_000
    # Partition 1 comes back: it is active again, but the watermark never recedes.
    e.process(1, table([event(2, 5_000)]), 1_010_500)
    assert e.watermark_ms() == 370_000


def test_idle_partition_holds_back_while_active() -> None:
    e = engine(partitions=(0, 1), idle=10_000, now=0)
    e.process(1, table([event(0, 50_000)]), 0)
    e.process(0, table([event(1, 500_000)]), 5_000)
    assert e.watermark_ms() == 20_000  # min(500 s, 50 s) - 30 s


def test_early_versus_final_firings() -> None:
    e = engine()
    e.process(0, table([event(0, 10_000), event(1, 20_000)]), 0)
    [early] = e.take_dirty()
    assert not early.final and early.count == 2
    assert e.take_dirty() == []  # nothing changed since
    e.process(0, table([event(2, 30_000)]), 0)
    [early2] = e.take_dirty()
    assert early2.count == 3 and not early2.final
    step = e.process(0, table([event(3, 331_000)]), 0)
    assert [s.count for s in step.finals] == [3]


@pytest.mark.parametrize("lateness", [0, 2_000])
def test_window_is_final_exactly_when_watermark_passes_end_plus_lateness(lateness: int) -> None:
    metric = compile_metric(
        MetricConfig(
            name="m",
            aggregations={"n": "count()"},
            window="10s",
            out_of_orderness="1s",
            allowed_lateness=f"{lateness}ms",
        )
    )
    e = engine(metrics=(metric,))
    e.process(0, table([event(0, 1_000)]), 0)
    boundary = 10_000 + lateness + 1_000  # max event time at which watermark = end + lateness
    assert not e.process(0, table([event(1, boundary - 1)]), 0).finals
    assert e.watermark_ms() == 10_000 + lateness - 1
    # Still in time, one millisecond before the window closes.
    assert not e.process(0, table([event(2, 9_999)]), 0).late
    [final] = e.process(0, table([event(3, boundary)]), 0).finals
    assert final.window_start == 0 and final.count == 2
    [late] = e.process(0, table([event(4, 9_999)]), 0).late
    assert late.window_start == 0


def test_filter_compiler() -> None:
    rows = table(
        [
            event(0, 0, country="DE", revenue=5.0, path="/docs/a"),
            event(1, 0, country="FR", revenue=0.0, path="/blog"),
            event(2, 0, country="US", event_type="signup", path="/docs/b"),
        ]
    )

    def mask(text: str) -> list[bool]:
        metric = compile_metric(MetricConfig(name="m", filter=text, aggregations={"n": "count()"}))
        compiled = compile_filter(metric.filter)
        assert compiled is not None
        return compiled(rows).tolist()

    assert mask("country IN ('DE', 'US')") == [True, False, True]
    assert mask("country NOT IN ('DE', 'US')") == [False, True, False]
    assert mask("path LIKE '/docs/%' AND NOT event_type = 'signup'") == [True, False, False]
    assert mask("revenue > 0 OR country = 'FR'") == [True, True, False]
    assert mask("revenue >= -1 AND (country = 'US' OR revenue < 1)") == [False, True, True]
    assert mask("country IS NULL") == [False, False, False]
    assert mask("country IS NOT NULL") == [True, True, True]


def test_a_filter_that_cannot_be_evaluated_names_the_metric_and_field() -> None:
    metric = compile_metric(
        MetricConfig(name="bad", filter="revenue = 'x'", aggregations={"n": "count()"})
    )
    with pytest.raises(ConfigError, match="metric 'bad': field 'filter'"):
        engine(metrics=(metric,))


def test_uniq_is_exact_then_hll_and_batching_does_not_change_the_sketch() -> None:
    users = [f"user-{i}" for i in range(5000)]
    rows = [event(i, 1_000, user_id=u) for i, u in enumerate(users)]
    one = engine()
    one.process(0, table(rows), 0)
    many = engine()
    for i in range(0, len(rows), 700):
        many.process(0, table(rows[i : i + 700]), 0)
    [a], [b] = one.all_states(), many.all_states()
    assert a.values == b.values
    estimate = values_of(a)["users"]
    assert abs(estimate - 5000) / 5000 < 0.03


def test_snapshot_restore_continues_identically() -> None:
    rows = [event(i, i * 7_000 + (i % 5) * 40_000) for i in range(200)]
    full = engine()
    outputs_full = Step()
    for i in range(0, 200, 30):
        outputs_full.extend(full.process(0, table(rows[i : i + 30]), 0))
    first = engine()
    outputs = Step()
    for i in range(0, 90, 30):
        outputs.extend(first.process(0, table(rows[i : i + 30]), 0))
    second = engine()
    second.restore(decode_snapshot(encode_snapshot(first.snapshot())))
    for i in range(90, 200, 30):
        outputs.extend(second.process(0, table(rows[i : i + 30]), 0))
    assert outputs.finals == outputs_full.finals
    assert [e.id for e in outputs.late] == [e.id for e in outputs_full.late]
    assert second.all_states() == full.all_states()


# -- property test against a per-event reference ------------------------------------------

PROPERTY_METRICS = [
    compile_metric(
        MetricConfig(
            name="views",
            filter="event_type = 'page_view'",
            dimensions=["country"],
            aggregations={"views": "count()", "users": "uniq(user_id)"},
            window="10s",
            out_of_orderness="3s",
            allowed_lateness="2s",
        )
    ),
    compile_metric(
        MetricConfig(
            name="revenue",
            filter="revenue > 0 AND country IN ('DE', 'FR')",
            dimensions=["currency", "country"],
            aggregations={
                "revenue": "sum(revenue)",
                "low": "min(revenue)",
                "high": "max(revenue)",
                "mean": "avg(revenue)",
            },
            window="10s",
            slide="5s",
            out_of_orderness="1s",
        )
    ),
    compile_metric(
        MetricConfig(
            name="everything",
            aggregations={"events": "count()", "people": "uniq(distinct_id)"},
            window="5s",
            out_of_orderness="0s",
        )
    ),
]
REFERENCE_FILTERS = {
    "views": lambda e: e["event_type"] == "page_view",
    "revenue": lambda e: e["revenue"] > 0 and e["country"] in ("DE", "FR"),
    "everything": lambda e: True,
}
RETENTION = 12_000


class Reference:
    """One event at a time, straight from docs/semantics.md."""

    def __init__(self, partitions: list[int]) -> None:
        self.max_ts = {p: NO_TIME for p in partitions}
        self.watermark = {m.name: NO_TIME for m in PROPERTY_METRICS}
        self.slots: dict[tuple[str, int], dict[str, Any]] = {}
        self.finals: dict[tuple[str, int, tuple[str, ...]], dict[str, Any]] = {}
        self.late: set[str] = set()

    def add(self, partition: int, e: dict[str, Any]) -> None:
        for metric in PROPERTY_METRICS:
            if not REFERENCE_FILTERS[metric.name](e):
                continue
            size, slide = metric.window_ms, metric.slide_ms
            done = size + metric.allowed_lateness_ms
            last = e["ts"] // slide * slide
            for start in range(last, last - size, -slide):
                watermark = self.watermark[metric.name]
                key = (metric.name, start)
                if start + done <= watermark:
                    suffix = "" if slide == size else f"|{start}"
                    self.late.add(f"{e['event_id']}|{metric.name}{suffix}")
                    if start + done + RETENTION <= watermark:
                        continue
                    slot = self.slots.setdefault(key, {"final": True, "groups": {}})
                    self._apply(metric, slot, e, revision=1)
                else:
                    slot = self.slots.setdefault(key, {"final": False, "groups": {}})
                    self._apply(metric, slot, e, revision=0)
        self.max_ts[partition] = max(self.max_ts[partition], e["ts"])
        low = min(self.max_ts.values())
        for metric in PROPERTY_METRICS:
            name = metric.name
            if low > NO_TIME:
                self.watermark[name] = max(self.watermark[name], low - metric.out_of_orderness_ms)
            done = metric.window_ms + metric.allowed_lateness_ms
            for (slot_metric, start), slot in sorted(self.slots.items()):
                if slot_metric != name or start + done > self.watermark[name]:
                    continue
                if not slot["final"]:
                    slot["final"] = True
                    for dims, group in slot["groups"].items():
                        self.finals[(name, start, dims)] = self._result(metric, group)
                if start + done + RETENTION <= self.watermark[name]:
                    del self.slots[(slot_metric, start)]

    def _apply(self, metric, slot, e, revision: int) -> None:
        dims = tuple(e[d] for d in metric.dimensions)
        group = slot["groups"].setdefault(dims, {"count": 0, "values": {}, "revision": 0})
        group["count"] += 1
        group["revision"] += revision
        for a in metric.aggregations:
            have = group["values"].get(a.alias)
            if a.function == "uniq":
                group["values"][a.alias] = (have or set()) | {e[a.column]}
            elif a.function in ("sum", "avg"):
                group["values"][a.alias] = (have or 0.0) + e[a.column]
            elif a.function == "min":
                group["values"][a.alias] = e[a.column] if have is None else min(have, e[a.column])
            elif a.function == "max":
                group["values"][a.alias] = e[a.column] if have is None else max(have, e[a.column])

    @staticmethod
    def _result(metric, group) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a in metric.aggregations:
            value = group["values"].get(a.alias)
            if a.function == "count":
                out[a.alias] = group["count"]
            elif a.function == "uniq":
                out[a.alias] = len(value)
            elif a.function == "avg":
                out[a.alias] = value / group["count"]
            else:
                out[a.alias] = value
        return out

    def held(self) -> dict[tuple[str, int, tuple[str, ...]], tuple[dict[str, Any], bool, int]]:
        metrics = {m.name: m for m in PROPERTY_METRICS}
        return {
            (name, start, dims): (
                self._result(metrics[name], group),
                slot["final"],
                group["revision"],
            )
            for (name, start), slot in self.slots.items()
            for dims, group in slot["groups"].items()
        }


def engine_result(metric_name: str, state) -> dict[str, Any]:
    metric = {m.name: m for m in PROPERTY_METRICS}[metric_name]
    values = [UniqSketch.from_bytes(v) if isinstance(v, bytes) else v for v in state.values]
    return finalize(metric, state.count, values)


raw_event = st.tuples(
    st.integers(0, 2),  # partition
    st.integers(0, 2_500),  # event time step
    st.one_of(st.just(0), st.just(0), st.integers(0, 25_000)),  # disorder
    st.sampled_from(["page_view", "page_view", "purchase", "signup"]),
    st.sampled_from(["DE", "FR", "US"]),
    st.integers(0, 12),  # user
    st.sampled_from([0.0, 0.0, 1.5, 4.0, 10.0]),
    st.sampled_from(["EUR", "USD"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.lists(raw_event, min_size=40, max_size=150),
    cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30),
)
def test_engine_equals_per_event_reference(raw, cuts) -> None:
    clock = 0
    events: list[tuple[int, dict[str, Any]]] = []
    for i, (partition, step_ms, disorder, kind, country, user, revenue, currency) in enumerate(raw):
        clock += step_ms
        ts = max(0, clock - disorder)
        events.append(
            (
                partition,
                event(
                    i,
                    ts,
                    event_type=kind,
                    country=country,
                    user_id=f"u{user}",
                    revenue=revenue,
                    currency=currency,
                ),
            )
        )
    partitions = sorted({p for p, _ in events})
    reference = Reference(partitions)
    for partition, e in events:
        reference.add(partition, e)

    subject = WindowEngine(
        PROPERTY_METRICS,
        partitions=partitions,
        idle_timeout_ms=10**12,
        retention_ms=RETENTION,
        now_ms=0,
    )
    outputs = Step()
    position = 0
    cut_index = 0
    while position < len(events):
        size = cuts[cut_index % len(cuts)]
        cut_index += 1
        chunk = events[position : position + size]
        position += size
        # A cycle hands out runs of one partition each; keep the arrival order.
        runs: list[tuple[int, pa.Table, int]] = []
        run: list[dict[str, Any]] = []
        run_partition = chunk[0][0]
        for partition, e in chunk + [(-1, {})]:
            if partition != run_partition:
                runs.append((run_partition, table(run), 0))
                run, run_partition = [], partition
            if partition >= 0:
                run.append(e)
        if cut_index % 2:
            outputs.extend(subject.process_many(runs, 0))
        else:
            for partition, rows, offset in runs:
                outputs.extend(subject.process(partition, rows, 0, offset))

    got_finals = {
        (s.metric, s.window_start, tuple(s.dims)): engine_result(s.metric, s)
        for s in outputs.finals
    }
    assert len(got_finals) == len(outputs.finals)  # each group fires once
    assert got_finals == reference.finals
    assert {late.id for late in outputs.late} == reference.late
    assert len(outputs.late) == len(reference.late)
    held = {
        (s.metric, s.window_start, tuple(s.dims)): (engine_result(s.metric, s), s.final, s.revision)
        for s in subject.all_states()
    }
    assert held == reference.held()
    for metric in PROPERTY_METRICS:
        expected = reference.watermark[metric.name]
        assert subject.watermark_ms(metric.name) == (None if expected == NO_TIME else expected)


def test_hash_is_the_same_in_any_batch() -> None:
    from strata.serving.state import hash_strings

    values = ["", "a", "abcdefgh", "abcdefghi", "ü" * 11]
    whole = hash_strings(pa.array(values))
    for i, value in enumerate(values):
        assert hash_strings(pa.array([value]))[0] == whole[i]
        assert hash_strings(pa.array(["x" * 40, value]).slice(1))[0] == whole[i]
    assert len(set(whole.tolist())) == len(values)
    assert np.all(hash_strings(pa.array(["a", None])) == hash_strings(pa.array(["a", ""])))


def test_a_redefined_metric_starts_empty_after_restore() -> None:
    first = engine()
    first.process(0, table([event(0, 10_000)]), 0)
    changed = compile_metric(
        MetricConfig(
            name="page_views_by_country",
            filter="event_type = 'page_view'",
            dimensions=["country", "platform"],
            aggregations={"views": "count()"},
        )
    )
    second = engine(metrics=(changed,))
    second.restore(decode_snapshot(encode_snapshot(first.snapshot())))
    assert second.all_states() == [] and second.watermark_ms() is None
    same = engine()
    same.restore(decode_snapshot(encode_snapshot(first.snapshot())))
    assert same.all_states() == first.all_states()
