"""The lake's schedule inside ``strata serve``: the nightly batch and the
retention policy, as one pipeline component (``lake_scheduler``).

* Nightly batch: every day D is recomputed once it has closed for longer
  than the largest out-of-orderness + allowed lateness + ``lake.batch_delay``
  (strata.lake.batch). The last finished day is checkpointed in
  ``<data_dir>/batch/scheduler.json``; after downtime the missed days run in
  order. A fresh data directory starts with yesterday.
* Retention: every ``lake.retention_interval`` (strata.lake.retention).
"""

from __future__ import annotations

import logging
import threading
from datetime import date
from typing import Any

from strata.config import Config, parse_duration_ms
from strata.durable import atomic_write_json, read_json
from strata.events import now_ms
from strata.lake import retention
from strata.lake.base import Lake
from strata.lake.batch import BatchJob

log = logging.getLogger("strata.scheduler")


class LakeScheduler:
    def __init__(
        self, config: Config, job: BatchJob, lake: Lake, log_: Any, *, tick_s: float = 30.0
    ) -> None:
        self.config = config
        self.job = job
        self.lake = lake
        self.log = log_
        self.tick_s = tick_s
        self.state_path = config.data_path / "batch" / "scheduler.json"
        self.retention_interval_ms = parse_duration_ms(config.lake.retention_interval)
        state = read_json(self.state_path, {}) or {}
        self.last_batch_day = (
            date.fromisoformat(state["last_batch_day"]) if state.get("last_batch_day") else None
        )
        self.last_retention_ms = int(state.get("last_retention_ms", 0))
        self.errors = 0
        self.last_error = ""
        self.running = ""

    def _save(self) -> None:
        atomic_write_json(
            self.state_path,
            {
                "last_batch_day": self.last_batch_day.isoformat() if self.last_batch_day else None,
                "last_retention_ms": self.last_retention_ms,
            },
        )

    def tick(self, now: int, stop: threading.Event | None = None) -> None:
        """Run whatever is due at ``now``."""
        for day in self.job.nightly_due(now, self.last_batch_day):
            if stop is not None and stop.is_set():
                return
            self.running = f"batch {day}"
            self.job.recompute_day(day)
            self.last_batch_day = day
            self._save()
        if now - self.last_retention_ms >= self.retention_interval_ms:
            self.running = "retention"
            retention.apply(self.config, store=self.job.store, lake=self.lake, log_=self.log, now=now)
            self.last_retention_ms = now
            self._save()
        self.running = ""

    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop``; a failed tick is logged and retried next tick."""
        while not stop.wait(self.tick_s):
            try:
                self.tick(now_ms(), stop)
            except Exception as exc:
                self.errors += 1
                self.last_error = str(exc)[:500]
                self.running = ""
                log.exception("lake scheduler: tick failed; retrying next tick")

    def status(self) -> dict[str, Any]:
        return {
            "last_batch_day": self.last_batch_day.isoformat() if self.last_batch_day else None,
            "last_retention_at_ms": self.last_retention_ms or None,
            "running": self.running or None,
            "errors": self.errors,
            "last_error": self.last_error or None,
        }

    def close(self) -> None:
        pass


