"""Prometheus metrics across processes, without a client library.

Each process keeps its own counters and histograms in a ``Registry``. Ingest
workers write a snapshot to ``<data_dir>/run/metrics-<name>.json`` every
second; the core process adds them to its own when it renders ``/metrics``.
Counters therefore survive a worker restart only as long as its last
snapshot file does (a restarted worker starts again from zero, like any
Prometheus counter reset).
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from strata.durable import atomic_write_bytes

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HELP = {
    "strata_ingest_events_total": ("counter", "Events accepted into the log."),
    "strata_ingest_rejected_total": ("counter", "Events rejected at ingest, by reason kind."),
    "strata_ingest_requests_total": ("counter", "Ingest HTTP requests by status code."),
    "strata_ingest_append_seconds": ("histogram", "Time from request decode to durable append."),
    "strata_loader_rows_total": ("counter", "Rows inserted into the store, by table."),
    "strata_loader_duplicates_total": ("counter", "Rows dropped as client retries, by table."),
    "strata_log_lag_events": ("gauge", "Records in the log not yet processed, by consumer."),
    "strata_log_end_offset": ("gauge", "Sum of log end offsets, by topic."),
    "strata_watermark_delay_seconds": ("gauge", "Wall clock minus the processor watermark."),
    "strata_freshness_seconds": ("gauge", "Wall clock minus the newest event time in the store."),
    "strata_query_seconds": ("histogram", "Query API latency, by endpoint."),
    "strata_late_events_total": ("counter", "Events that arrived after their window was final."),
    "strata_ingest_quarantined_total": ("counter", "Events stored in quarantine by schema checks."),
    "strata_log_dropped_uncommitted_records_total": (
        "counter", "Log records deleted by size retention before a group committed them."),
    "strata_processor_groups": ("gauge", "Window groups held live, by processor shard."),
    "strata_processor_over_limit_events_total": (
        "counter", "Events not kept live because processor.max_groups was reached, by shard."),
    "strata_query_cache_total": ("counter", "Result cache lookups, by result (hit, miss)."),
    "strata_query_cache_invalidations_total": (
        "counter", "Result cache entries dropped because late data revised their range."),
    "strata_query_rate_limited_total": ("counter", "Queries refused with 429 by the rate limit."),
    "strata_query_heavy_lanes_busy_total": (
        "counter", "Heavy queries refused with 429 because every heavy lane was busy."),
    "strata_gc_frozen_objects": (
        "gauge", "Objects moved to Python's permanent generation after start-up, by process."),
    "strata_rollup_tier_rows": (
        "gauge", "Rollup rows held by the in-memory tier of finalized days (decision 102)."),
    "strata_rollup_tier_days": (
        "gauge", "(rollup table, day) entries held by the in-memory rollup tier."),
}


def _key(labels: dict[str, str] | None) -> str:
    return json.dumps(sorted((labels or {}).items()))


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.gauges: dict[str, dict[str, float]] = defaultdict(dict)
        self.histograms: dict[str, dict[str, list[float]]] = defaultdict(dict)

    def inc(self, name: str, value: float = 1.0, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self.counters[name][_key(labels)] += value

    def set(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self.gauges[name][_key(labels)] = value

    def observe(self, name: str, seconds: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            buckets = self.histograms[name].setdefault(
                _key(labels), [0.0] * (len(LATENCY_BUCKETS) + 2)
            )
            buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            buckets[-1] += seconds

    def counter_value(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self.counters.get(name, {}).get(_key(labels), 0.0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "counters": {n: dict(v) for n, v in self.counters.items()},
                "histograms": {n: {k: list(b) for k, b in v.items()} for n, v in self.histograms.items()},
            }

    def write_snapshot(self, path: Path) -> None:
        atomic_write_bytes(path, json.dumps(self.snapshot()).encode())

    def merged_with(self, snapshots: list[dict[str, Any]]) -> Registry:
        merged = Registry()
        merged.gauges = defaultdict(dict, {n: dict(v) for n, v in self.gauges.items()})
        for snap in [self.snapshot(), *snapshots]:
            for name, series in snap.get("counters", {}).items():
                for key, value in series.items():
                    merged.counters[name][key] += value
            for name, series in snap.get("histograms", {}).items():
                for key, buckets in series.items():
                    have = merged.histograms[name].setdefault(key, [0.0] * len(buckets))
                    for i, value in enumerate(buckets):
                        have[i] += value
        return merged

    def render(self) -> str:
        lines: list[str] = []
        names = sorted(set(self.counters) | set(self.gauges) | set(self.histograms))
        for name in names:
            kind, text = HELP.get(name, ("untyped", name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for key, value in sorted(self.counters.get(name, {}).items()):
                lines.append(f"{name}{_labels(key)} {value:g}")
            for key, value in sorted(self.gauges.get(name, {}).items()):
                lines.append(f"{name}{_labels(key)} {value:g}")
            for key, buckets in sorted(self.histograms.get(name, {}).items()):
                cumulative = 0.0
                for bound, count in zip(LATENCY_BUCKETS, buckets, strict=False):
                    cumulative += count
                    lines.append(f"{name}_bucket{_labels(key, le=str(bound))} {cumulative:g}")
                cumulative += buckets[len(LATENCY_BUCKETS)]
                lines.append(f"{name}_bucket{_labels(key, le='+Inf')} {cumulative:g}")
                lines.append(f"{name}_count{_labels(key)} {cumulative:g}")
                lines.append(f"{name}_sum{_labels(key)} {buckets[-1]:g}")
        return "\n".join(lines) + "\n"


def _labels(key: str, **extra: str) -> str:
    pairs = list(json.loads(key)) + sorted(extra.items())
    if not pairs:
        return ""
    body = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in pairs
    )
    return "{" + body + "}"


REGISTRY = Registry()


def load_snapshots(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(run_dir.glob("metrics-*.json")):
        try:
            out.append(json.loads(path.read_bytes()))
        except (OSError, ValueError):
            continue
    return out
