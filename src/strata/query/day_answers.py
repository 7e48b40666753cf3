"""Finalized per-day answers of the uniq aggregations (decision 096).

A complete day's distinct count never changes unless late data (or a batch
rewrite) revises that day, so it is merged once from the daily rollup's
states and kept in the ``day_answers`` table (store/sql/005_day_answers.sql).
The metrics API's DAU path reads complete days from there and merges states
only for the days that are still open (``QueryService.daily_answers``).

Two parts:

* ``DayAnswers`` (one per QueryService): the table. ``finalize`` computes
  and writes days, ``read`` returns the answered days of one aggregation
  with the frontier, ``mark_stale`` tombstones revised days.
* ``DayFinalizer`` (a pipeline component, ``run``/``status``): decides when
  a day may be finalized. A day is final when the processor's watermark
  minus the largest allowed lateness has passed its end *and* the loader
  has stored every log record the processor had read when its watermark
  got there. The finalizer snapshots (watermark, log end offsets) and waits
  until the loader's committed offsets reach those end offsets; the
  snapshot's watermark is then the loaded watermark. Events that reach the
  log later with an earlier time are late by the processor's rule, and late
  data reaches ``mark_stale`` through ``on_revised``.

Contract of the table, for readers: every day before the frontier that has
rollup data has a row; a row with ``stale = 1`` is not an answer. A stale
day is recomputed only after a progress snapshot taken *after* it was marked
has been stored by the loader (``seq`` below), so a recompute never runs
before the late rows that caused it are in the rollups. Answers equal
``uniqCombinedMerge`` of the day's rollup states exactly (the router's
rollup route computes the same expression), tests/test_day_answers.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa

from strata.metrics import Metric
from strata.store.ddl import named_statements

log = logging.getLogger("strata.query.day_answers")

DAY_MS = 86_400_000
EPOCH = date(1970, 1, 1)
# A late event emitted up to this long before a day's answer was computed
# may have been stored after it (start-up scan only; later passes follow
# late_events by offset).
LATE_MARGIN_S = 3600
# late_events is not sorted by insertion: each scan reads its offsets.
LATE_SCAN_INTERVAL_S = 5.0
MAX_STALE_DAYS = 800  # a revised range longer than this tombstones its last days only
SQL = named_statements("day_answers.sql")


def day_of(ms: int) -> date:
    return EPOCH + timedelta(days=ms // DAY_MS)


def day_ms(day: date) -> int:
    return (day - EPOCH).days * DAY_MS


@dataclass(frozen=True)
class Target:
    """One uniq aggregation of one metric: what a row of day_answers answers."""

    metric: Metric
    alias: str


def uniq_targets(metrics: Sequence[Metric]) -> list[Target]:
    return [
        Target(metric, a.alias)
        for metric in metrics
        for a in metric.aggregations
        if a.function == "uniq"
    ]


class DayAnswers:
    def __init__(self, store_getter: Callable[[], Any], metrics: Sequence[Metric]) -> None:
        self._store = store_getter
        self.targets = uniq_targets(metrics)
        self.by_key = {(t.metric.name, t.alias): t for t in self.targets}
        self._lock = threading.Lock()
        # Sequence of stale marks and progress snapshots (see module docstring).
        self._seq = 0
        # day -> seq of its latest stale mark; loaded from the table on first use.
        self._stale: dict[date, int] | None = None
        self.stats = {"days_finalized": 0, "days_recomputed": 0, "days_marked_stale": 0}
        # False until the table was read once and had no frontier: then
        # readers skip it until this process's finalizer sets one (the
        # finalizer of the process that owns the loaders is the writer).
        self._maybe_answered = True
        self._frontier_writes = 0
        # The frontier this process's DayFinalizer confirmed (set_frontier,
        # or the stored one once the finalizer saw the loader catch up);
        # None in a process without a finalizer. The in-memory rollup tier
        # (strata.query.tier) serves only days before it.
        self.local_frontier: date | None = None
        # The stored frontier, read once (see stored_frontier).
        self._stored_frontier: tuple[date | None] | None = None

    @property
    def store(self) -> Any:
        return self._store()

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    # -- stale days ---------------------------------------------------------------------
    def _stale_days(self) -> dict[date, int]:
        if self._stale is None:
            _, rows = self.store.query_rows(SQL["stale_days"])
            loaded = {_as_date(day): 0 for (day,) in rows}
            with self._lock:
                if self._stale is None:
                    self._stale = loaded
        assert self._stale is not None
        return self._stale

    def any_stale(self, first: date, last: date) -> bool:
        """True when a day in ``[first, last]`` is marked stale."""
        stale = self._stale_days()
        with self._lock:
            if len(stale) <= (last - first).days + 1:
                return any(first <= day <= last for day in stale)
            return any(
                date.fromordinal(first.toordinal() + i) in stale
                for i in range((last - first).days + 1)
            )

    def stale_days(self) -> dict[date, int]:
        """Days revised since they were answered -> seq of the latest mark."""
        stale = self._stale_days()
        with self._lock:
            return dict(stale)

    def mark_stale(self, start_ms: int, end_ms: int) -> int:
        """Late data (or a batch rewrite) changed ``[start_ms, end_ms)``: the
        days it overlaps are read from the rollups until recomputed. The
        tombstones are written before this returns (a restart keeps them).
        Returns the number of days newly marked."""
        if not self.targets or end_ms <= start_ms:
            return 0
        first, last = day_of(start_ms), day_of(end_ms - 1)
        first = max(first, last - timedelta(days=MAX_STALE_DAYS - 1))
        days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
        stale = self._stale_days()
        with self._lock:
            self._seq += 1
            fresh = [d for d in days if d not in stale]
            for day in days:
                stale[day] = self._seq
        if fresh:  # an already stale day has its tombstone
            self._write({(t.metric.name, t.alias, d): 0 for t in self.targets for d in fresh}, 1)
            self.stats["days_marked_stale"] += len(fresh)
        return len(fresh)

    # -- writing ------------------------------------------------------------------------
    def _write(
        self, values: dict[tuple[str, str, date], int], stale: int, version: int = 0
    ) -> None:
        if not values:
            return
        version = version or time.time_ns() // 1000
        keys = list(values)
        table = pa.table(
            {
                "metric": pa.array([k[0] for k in keys], pa.string()),
                "aggregation": pa.array([k[1] for k in keys], pa.string()),
                "day": pa.array([k[2] for k in keys], pa.date32()),
                "value": pa.array([int(values[k]) for k in keys], pa.uint64()),
                "stale": pa.array([stale] * len(keys), pa.uint8()),
                "version": pa.array([version] * len(keys), pa.uint64()),
                "computed_at": pa.array(
                    [datetime.now(UTC)] * len(keys), pa.timestamp("ms", tz="UTC")
                ),
            }
        )
        self.store.insert_arrow("day_answers", table)

    def _compute(self, first: date, until: date) -> dict[tuple[str, str, date], int]:
        """Every target's answer for the days in [first, until) that have data."""
        out: dict[tuple[str, str, date], int] = {}
        by_metric: dict[str, list[Target]] = {}
        for target in self.targets:
            by_metric.setdefault(target.metric.name, []).append(target)
        for targets in by_metric.values():
            metric = targets[0].metric
            merges = ", ".join(f"uniqCombinedMerge({t.alias}) AS {t.alias}" for t in targets)
            sql = SQL["compute"].format(table=metric.rollup_table("1d"), merges=merges)
            _, rows = self.store.query_rows(sql, {"first": first, "until": until})
            for row in rows:
                for target, value in zip(targets, row[1:], strict=True):
                    out[(metric.name, target.alias, _as_date(row[0]))] = int(value)
        return out

    def first_data_day(self) -> date | None:
        """The earliest day any uniq target's daily rollup holds."""
        found: list[date] = []
        for metric in {t.metric.name: t.metric for t in self.targets}.values():
            _, rows = self.store.query_rows(
                SQL["first_day"].format(table=metric.rollup_table("1d"))
            )
            if rows and int(rows[0][1]):
                found.append(_as_date(rows[0][0]))
        return min(found) if found else None

    def finalize(self, first: date, until: date, done_seq: int) -> list[date]:
        """Compute and write the days in [first, until). A day with a stale
        mark is written only if the mark is older than ``done_seq`` (the
        last progress snapshot the loader has stored), and only if no new
        mark arrived while computing; such days stay stale. Returns the days
        written (including days without data, which get value 0 only when
        they were stale, so their tombstone is replaced)."""
        if not self.targets or until <= first:
            return []
        stale = self._stale_days()
        with self._lock:
            before = dict(stale)
        version = time.time_ns() // 1000  # before reading: a later tombstone wins
        values = self._compute(first, until)
        with self._lock:
            blocked = {
                day
                for day, seq in stale.items()
                if first <= day < until and (seq >= done_seq or before.get(day) != seq)
            }
            recomputed = {day for day in before if first <= day < until} - blocked
        write: dict[tuple[str, str, date], int] = {
            key: value for key, value in values.items() if key[2] not in blocked
        }
        for day in recomputed:  # days now empty replace their tombstone
            for target in self.targets:
                write.setdefault((target.metric.name, target.alias, day), 0)
        self._write(write, 0, version)
        with self._lock:
            for day in recomputed:
                if stale.get(day) == before[day]:
                    del stale[day]
        days = sorted({key[2] for key in write})
        self.stats["days_finalized"] += len(days)
        self.stats["days_recomputed"] += len(recomputed)
        return days

    def set_frontier(self, frontier: date) -> None:
        """Every day before ``frontier`` with data is answered (or stale)."""
        self._write({("", "", EPOCH): (frontier - EPOCH).days}, 0)
        with self._lock:
            self._frontier_writes += 1
            self._maybe_answered = True
            if self.local_frontier is None or frontier > self.local_frontier:
                self.local_frontier = frontier
            stored = self._stored_frontier[0] if self._stored_frontier else None
            if stored is None or frontier > stored:
                self._stored_frontier = (frontier,)

    def stored_frontier(self) -> date | None:
        """The frontier in the table, read once per process and then kept
        up to date by ``set_frontier``: what readers of day_answers serve."""
        with self._lock:
            known = self._stored_frontier
        if known is None:
            value = self.frontier()
            with self._lock:
                if self._stored_frontier is None:
                    self._stored_frontier = (value,)
                known = self._stored_frontier
        return known[0]

    def recompute_now(self, start_ms: int, end_ms: int) -> None:
        """Recompute the answered days overlapping ``[start_ms, end_ms)`` at
        once: for a process where no loader runs (``strata batch`` and
        ``strata delete-user`` without a server rewrote the rollups)."""
        frontier = self.frontier()
        if frontier is None:
            return
        first = day_of(start_ms)
        until = min(frontier, day_of(end_ms - 1) + timedelta(days=1))
        if first >= until:
            return
        self.mark_stale(start_ms, day_ms(until))
        self.finalize(first, until, self.next_seq())

    # -- reading ------------------------------------------------------------------------
    def frontier(self) -> date | None:
        _, rows = self.store.query_rows(
            SQL["read"],
            {"metric": "", "aggregation": "", "first": EPOCH, "until": EPOCH},
        )
        return _frontier(rows)

    def read(
        self, metric: str, aggregation: str, first: date, until: date
    ) -> tuple[date | None, dict[date, int | None]]:
        """(frontier, {day: value, or None if stale}) for days in [first, until)."""
        if not self._maybe_answered:
            return None, {}
        writes = self._frontier_writes
        _, rows = self.store.query_rows(
            SQL["read"],
            {"metric": metric, "aggregation": aggregation, "first": first, "until": until},
        )
        answers = {
            _as_date(day): (None if stale else int(value))
            for name, day, value, stale in rows
            if name != ""
        }
        # Days marked in this process count as stale even if writing their
        # tombstone failed (and days without a row may have got data).
        with self._lock:
            marked = [day for day in self._stale or {} if first <= day < until]
        for day in marked:
            answers[day] = None
        frontier = _frontier(rows)
        if frontier is None:
            with self._lock:
                if writes == self._frontier_writes:  # no frontier written meanwhile
                    self._maybe_answered = False
        return frontier, answers


def _frontier(rows: list[tuple[Any, ...]]) -> date | None:
    for name, _, value, _ in rows:
        if name == "" and int(value) > 0:
            return EPOCH + timedelta(days=int(value))
    return None


def _as_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    assert isinstance(value, date)
    return value


class DayFinalizer:
    """Pipeline component: finalizes complete, loaded days (module docstring).

    ``watermark()`` is the processor's watermark (epoch ms or None),
    ``end_offsets()`` the events topic's log end offsets and ``committed()``
    the events loader's committed offsets (stored records are below them).
    ``finality_lag_ms``: the largest allowed lateness of the metrics."""

    def __init__(
        self,
        answers: Callable[[], DayAnswers],
        watermark: Callable[[], int | None],
        end_offsets: Callable[[], dict[int, int]],
        committed: Callable[[], dict[int, int]],
        finality_lag_ms: Callable[[], int],
        on_late: Callable[[int, int], Any] | None = None,
        interval_s: float = 1.0,
        late_scan_interval_s: float = LATE_SCAN_INTERVAL_S,
    ) -> None:
        """``on_late(start_ms, end_ms)``: a stored late event revised this
        range (``Pipeline.on_revised``: cache, ``revised`` flags and
        ``mark_stale``); without it the days are only marked stale."""
        self._answers = answers
        self.watermark = watermark
        self.end_offsets = end_offsets
        self.committed = committed
        self.finality_lag_ms = finality_lag_ms
        self.on_late = on_late
        self.interval_s = interval_s
        self.late_scan_interval_s = late_scan_interval_s
        self._pending: tuple[int, int | None, dict[int, int]] | None = None
        self.loaded_watermark_ms: int | None = None
        self.done_seq = 0
        self.frontier: date | None = None
        self.last_error = ""
        # Next unread offset of late_events per late-topic partition; None
        # until the start-up scan (late_after_answers) ran.
        self._late_floors: dict[int, int] | None = None
        self._next_late_scan = 0.0

    @property
    def answers(self) -> DayAnswers:
        return self._answers()

    def advance_progress(self) -> bool:
        """Take a (watermark, end offsets) snapshot, or complete the pending
        one if the loader has stored up to its end offsets. True when a
        snapshot completed."""
        if self._pending is None:
            seq = self.answers.next_seq()  # before the end offsets: see module docstring
            watermark = self.watermark()
            self._pending = (seq, watermark, dict(self.end_offsets()))
        seq, watermark, ends = self._pending
        committed = self.committed()
        if all(committed.get(p, 0) >= end for p, end in ends.items()):
            self._pending = None
            self.done_seq = seq
            if watermark is not None:
                self.loaded_watermark_ms = max(watermark, self.loaded_watermark_ms or watermark)
            return True
        return False

    def scan_late(self) -> int:
        """Mark the days of newly stored late events stale (the processor
        reports late events in windows it no longer holds only through
        ``late_events``). Returns the number of days newly marked."""
        answers = self.answers
        store = answers.store
        marked = 0
        if self._late_floors is None:
            _, rows = store.query_rows(
                "SELECT _partition, max(_offset) + 1 FROM late_events GROUP BY _partition"
            )
            floors = {int(p): int(n) for p, n in rows}
            _, days = store.query_rows(SQL["late_after_answers"], {"margin_s": LATE_MARGIN_S})
            for (day,) in days:
                marked += self._revise(_as_date(day))
            self._late_floors = floors
            return marked
        partitions = sorted(self._late_floors)
        _, rows = store.query_rows(
            SQL["late_since"],
            {"partitions": partitions, "floors": [self._late_floors[p] for p in partitions]},
        )
        for day, partition, next_offset in rows:
            marked += self._revise(_as_date(day))
            partition = int(partition)
            self._late_floors[partition] = max(
                self._late_floors.get(partition, 0), int(next_offset)
            )
        return marked

    def _revise(self, day: date) -> int:
        answers = self.answers
        before = answers.stats["days_marked_stale"]
        if self.on_late is not None:
            self.on_late(day_ms(day), day_ms(day) + DAY_MS)  # reaches mark_stale too
        else:
            answers.mark_stale(day_ms(day), day_ms(day) + DAY_MS)
        return answers.stats["days_marked_stale"] - before

    def step(self) -> None:
        """One pass: late events, progress, new complete days, stale days."""
        answers = self.answers
        if not answers.targets:
            return
        now = time.monotonic()
        if now >= self._next_late_scan:  # a scan of late_events: not every pass
            self.scan_late()  # before the snapshot: its marks must precede it
            self._next_late_scan = now + self.late_scan_interval_s
        self.advance_progress()
        if self.done_seq == 0:
            return  # nothing known to be loaded yet (stale days wait too)
        if self.frontier is None:
            self.frontier = answers.frontier()
            if self.frontier is not None and answers.local_frontier is None:
                # Stored by an earlier run of this finalizer, after its loader
                # had stored those days: final for this process too.
                answers.local_frontier = self.frontier
        if self.loaded_watermark_ms is not None:
            final_until = self.loaded_watermark_ms - self.finality_lag_ms()
            target = day_of(final_until - final_until % DAY_MS)
            if self.frontier is None or target > self.frontier:
                first = self.frontier or answers.first_data_day() or target
                if first < target:
                    answers.finalize(first, target, self.done_seq)
                answers.set_frontier(target)
                self.frontier = target
        if self.frontier is None:
            return
        ready = sorted(
            day
            for day, seq in answers.stale_days().items()
            if seq < self.done_seq and day < self.frontier
        )
        for first, until in day_runs(ready):
            answers.finalize(first, until, self.done_seq)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
                self.last_error = ""
            except Exception as exc:  # logged and reported; the next pass retries
                self.last_error = str(exc).splitlines()[0][:300] if str(exc) else repr(exc)
                log.warning("day answers: pass failed", exc_info=True)
            stop.wait(self.interval_s)

    def status(self) -> dict[str, Any]:
        answers = self.answers
        return {
            "frontier": self.frontier.isoformat() if self.frontier else None,
            "loaded_watermark_ms": self.loaded_watermark_ms,
            "stale_days": len(answers._stale or {}),
            **answers.stats,
            "last_error": self.last_error or None,
        }


def day_runs(days: list[date]) -> list[tuple[date, date]]:
    """Consecutive days as [first, until) spans."""
    out: list[tuple[date, date]] = []
    for day in days:
        if out and out[-1][1] == day:
            out[-1] = (out[-1][0], day + timedelta(days=1))
        else:
            out.append((day, day + timedelta(days=1)))
    return out
