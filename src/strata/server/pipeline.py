"""The core process's components and their lifecycle.

The core owns the store (chDB allows one process per data directory) and
runs the loaders next to the query API. Later stages (processor, archiver,
batch scheduler) register here too. ``status()`` is what ``/v1/status``,
``/readyz`` and ``/metrics`` report.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from strata.auth import Keyring
from strata.config import Config, parse_duration_ms
from strata.loader.loader import Loader
from strata.loader.sinks import SINKS
from strata.log import Log, open_log
from strata.store import Store
from strata.telemetry import REGISTRY

log = logging.getLogger("strata.core")


_QUERY_LOCK = threading.RLock()


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Pipeline:
    config: Config
    log: Log
    store: Store
    keyring: Keyring
    loaders: dict[str, Loader] = field(default_factory=dict)
    stop_event: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    # Components added by other stages: name -> object with status() -> dict.
    components: dict[str, Any] = field(default_factory=dict)
    # The query layer's router, result cache and rate limits
    # (strata.query.service.QueryService), built on first use.
    _query: Any = field(default=None, repr=False)

    @classmethod
    def open_loading(cls, config: Config) -> Pipeline:
        """The log, the store and one loader per sink: what every shape that
        owns the store runs (`strata serve`'s core, `strata query-api`)."""
        log_ = open_log(config)
        store = Store.open(config)
        pipeline = cls(config=config, log=log_, store=store, keyring=Keyring(config))
        horizon = parse_duration_ms(config.loader.dedup_horizon)
        for topic, sink in SINKS.items():
            pipeline.loaders[topic] = Loader(
                log_,
                store,
                sink,
                config.data_path / "loader" / topic,
                dedup_horizon_ms=horizon,
                dedup_hot_window_ms=parse_duration_ms(config.loader.dedup_hot_window),
                max_batch_events=config.loader.max_batch_events,
                max_wait_ms=config.loader.max_wait_ms,
            )
        from strata.query.day_answers import DayFinalizer

        # Rows stored into finalized days revise them at once (decision 102),
        # not only when the finalizer next scans late_events.
        pipeline.loaders["events"].on_event_times = pipeline.on_rows_stored

        # Finalized per-day distinct counts (decision 096): a day is
        # answered once the events loader has stored what the watermark saw.
        pipeline.components["day_answers"] = DayFinalizer(
            lambda: pipeline.query.day_answers,
            pipeline.watermark_ms,
            lambda: pipeline.log.end_offsets("events"),
            lambda: dict(pipeline.loaders["events"].offsets),
            lambda: int(pipeline.query.finality_lag_ms),
            on_late=pipeline.on_revised,
        )
        return pipeline

    @classmethod
    def open(cls, config: Config) -> Pipeline:
        """The whole embedded core: loading plus lake, schedulers and processor."""
        pipeline = cls.open_loading(config)
        from strata.lake.wiring import register_lake  # archiver, nightly batch, retention

        register_lake(pipeline)
        if config.processor.embedded:
            from strata.processor.runner import Processor
            from strata.serving import open_serving

            pipeline.components["processor"] = Processor(
                config, pipeline.log, open_serving(config), on_revised=pipeline.on_revised
            )
        return pipeline

    def start(self) -> None:
        for topic, loader in self.loaders.items():
            thread = threading.Thread(
                target=loader.run, args=(self.stop_event,), name=f"loader-{topic}", daemon=True
            )
            thread.start()
            self.threads.append(thread)
        for name, component in self.components.items():
            if hasattr(component, "run"):
                thread = threading.Thread(
                    target=component.run, args=(self.stop_event,), name=name, daemon=True
                )
                thread.start()
                self.threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop consuming, drain what is already in the log, release files."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        for loader in self.loaders.values():
            loader.close()
        for component in self.components.values():
            if hasattr(component, "close"):
                component.close()
        if self._query is not None:
            self._query.close()
        self.store.close()
        self.log.close()

    # -- query layer -------------------------------------------------------------
    @property
    def query(self) -> Any:
        """The ``QueryService`` of this process (cache, limits, router)."""
        if self._query is not None:
            return self._query
        with _QUERY_LOCK:  # the loader, the finalizer and requests may race here
            if self._query is not None:
                return self._query
            from strata.query.service import QueryService

            self._query = QueryService(
                self.config,
                lambda: self.store,
                self.watermark_ms,
                serving=lambda: getattr(self.components.get("processor"), "serving", None),
            )
        return self._query

    def on_revised(self, start_ms: int, end_ms: int) -> None:
        """Late data changed event time ``[start_ms, end_ms)``: cached query
        results overlapping it are dropped and later answers over it say
        ``revised: true``. Called by the stream processor when it records a
        revised range, and by whatever stores late rows (``on_late_rows``)."""
        self.query.on_revised(start_ms, end_ms)

    def on_rows_stored(self, event_times_ms: Any) -> None:
        """The events loader is about to store (and again: has stored) rows
        with these event times (an int64 Arrow array of epoch ms). Rows in
        days already finalized revise those days, each day on its own: the
        result cache, the finalized day answers and the in-memory rollup
        tier must not answer them without the rows (decision 102). Called
        before the insert, so no moment exists where the store has the rows
        and a final day is served without them, and after it, for a frontier
        that moved meanwhile. Before this process's finalizer confirmed a
        frontier, the stored one counts (day_answers serves it)."""
        import pyarrow.compute as pc

        from strata.query.day_answers import DAY_MS, day_ms, day_of, day_runs

        answers = self.query.day_answers
        frontiers = [f for f in (answers.local_frontier, answers.stored_frontier()) if f]
        if not frontiers:
            return
        final_until = day_ms(max(frontiers))
        low = pc.min(event_times_ms).as_py()
        if low is None or low >= final_until:
            return
        times = event_times_ms.to_numpy(zero_copy_only=False)
        days = np.unique(times[times < final_until] // DAY_MS)
        for first, until in day_runs([day_of(int(d) * DAY_MS) for d in days]):
            self.on_revised(day_ms(first), day_ms(until))

    def on_late_rows(self, event_times_ms: Any) -> None:
        """Late rows with these event times (epoch ms) were stored."""
        times = [int(t) for t in event_times_ms]
        if times:
            self.on_revised(min(times), max(times) + 1)

    # -- reporting -------------------------------------------------------------
    def watermark_ms(self) -> int | None:
        processor = self.components.get("processor")
        if processor is not None and hasattr(processor, "watermark_ms"):
            value: int | None = processor.watermark_ms()
            return value
        # Without a processor: the loader's view, by the same rule (minimum
        # over partitions of max event time minus the default out-of-orderness).
        seen = self.loaders["events"].stats.max_event_ts if "events" in self.loaders else {}
        if not seen:
            return None
        return min(seen.values()) - 30_000

    def status(self) -> dict[str, Any]:
        ends = self.log.end_offsets("events")
        consumers: dict[str, Any] = {}
        lag_total = 0
        for topic, loader in self.loaders.items():
            lag = loader.lag()
            consumers[f"loader-{topic}"] = {
                "committed_offsets": {str(p): o for p, o in sorted(loader.offsets.items())},
                "lag_events": lag,
                "inserted_rows": loader.stats.inserted_rows,
                "duplicates_dropped": loader.stats.duplicate_rows,
                "errors": loader.stats.errors,
                "last_error": loader.stats.last_error or None,
            }
            lag_total += lag
            REGISTRY.set("strata_log_lag_events", lag, {"consumer": f"loader-{topic}"})
        for name, component in self.components.items():
            if hasattr(component, "status"):
                info = component.status()
                consumers[name] = info
                lag_total += int(info.get("lag_events", 0))
        watermark = self.watermark_ms()
        now = time.time() * 1000
        if watermark is not None:
            REGISTRY.set("strata_watermark_delay_seconds", max(0.0, (now - watermark) / 1000))
        REGISTRY.set("strata_log_end_offset", sum(ends.values()), {"topic": "events"})
        tier = self._query.tier.held() if self._query is not None else None
        if tier is not None:
            REGISTRY.set("strata_rollup_tier_rows", tier["rows"])
            REGISTRY.set("strata_rollup_tier_days", tier["days"])
        return {
            "rollup_tier": tier,
            "lag_events": lag_total,
            "watermark": iso(watermark),
            "log": {
                "backend": self.config.log.backend,
                "end_offsets": {str(p): o for p, o in sorted(ends.items())},
                "beginning_offsets": {
                    str(p): o for p, o in sorted(self.log.beginning_offsets("events").items())
                },
            },
            "consumers": consumers,
            "uptime_s": round(time.time() - self.started_at, 1),
        }

    def healthy(self) -> tuple[bool, list[str]]:
        problems = []
        for topic, loader in self.loaders.items():
            if loader.stats.errors and loader.stats.last_error:
                if time.time() * 1000 - loader.stats.last_insert_ms > 30_000:
                    problems.append(f"loader {topic}: {loader.stats.last_error}")
        for thread in self.threads:
            if not thread.is_alive() and not self.stop_event.is_set():
                problems.append(f"thread {thread.name} stopped")
        return not problems, problems
