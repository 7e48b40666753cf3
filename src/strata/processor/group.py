"""Consumer-group processors: N ``strata process`` processes share the
partitions of ``events`` through a Kafka consumer group (decision 044).

The unit of state is one log partition. For every partition it owns, a
``GroupProcessor`` runs one single-partition ``Processor`` (engine +
checkpoint + journal, exactly as in the static shape) whose files live in
``<state_dir>/p<N>/``, a directory every member of the group can reach.
A rebalance therefore moves a partition together with its window state and
its checkpoint:

* ``on_revoke`` (graceful: a member joined, left or is stopping): the
  partition's processor writes its changed windows and a checkpoint, then
  closes. The next owner starts from exactly that state.
* a member killed with -9 writes nothing more; its session times out, the
  group moves its partitions, and the new owner restores the last
  checkpoint and re-executes the journal, the same crash recovery as a
  restarted static processor (same outputs, same ids, same serving states).
* ``on_lost`` (this member was too slow and the group moved on): close
  without writing, because the new owner may already be using the files.

Fencing (decision 090): every single-partition processor is *fenced*: on
assignment it claims the shard's owner epoch in the serving store (an atomic
INCR), every serving write it makes is checked against that epoch
atomically in the store, and its checkpoint, journal and dedup files carry
the epoch in their names (restores pick the highest). A member that stalled
past the session timeout and resumes before librdkafka reports the loss gets
``FencedError`` from its first write: it drops that partition's processor
(no flush, no checkpoint), logs that it was fenced, and does not touch the
partition again until the group assigns it anew.

The group member is a separate Kafka consumer that only holds the
membership (``subscribe(fetch=False)``: its partitions are paused); the
single-partition processors read through their own statically assigned
consumers, as in the static shape, so the runner's deterministic reading and
journal replay are unchanged. Rebalance callbacks run inside the member's
poll, on the same thread as the processing cycles, so a partition is never
processed while it moves.

Shards are named per partition (``p3``), so the serving store, the
``window_results`` ids and the progress entries do not depend on which
member owns a partition.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from strata.config import Config, ConfigError
from strata.log.base import Log
from strata.processor.runner import Processor
from strata.serving.base import FencedError, ServingStore

log = logging.getLogger("strata.processor")


def state_directory(config: Config) -> Path:
    """Where the per-partition checkpoints and journals of the group live."""
    if config.processor.state_dir:
        return Path(config.processor.state_dir)
    return config.data_path / "processor" / "partitions"


class GroupProcessor:
    """One member of the processor consumer group. ``run(stop_event)`` until
    stopped; on stop every owned partition is checkpointed and released."""

    GROUP = "processor"

    def __init__(
        self,
        config: Config,
        log_: Log,
        serving: ServingStore,
        *,
        state_dir: Path | None = None,
        on_revised: Callable[[int, int], None] | None = None,
        on_change: Callable[[list[int]], None] | None = None,
    ) -> None:
        """``on_change(partitions)`` is called after every assignment change
        with the partitions this member now owns (logging, tests)."""
        self.config = config
        self.log = log_
        self.serving = serving
        self.on_revised = on_revised
        self.on_change = on_change
        self.state_dir = state_dir or state_directory(config)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.member = log_.consumer(self.GROUP, "events")
        if not hasattr(self.member, "subscribe"):
            self.member.close()
            raise ConfigError(
                f"strata process --group: log.backend = {config.log.backend!r} has no "
                "consumer groups; use log.backend = 'kafka' or static --partitions"
            )
        self.processors: dict[int, Processor] = {}
        self.errors = 0
        self.last_error = ""
        self.fenced = 0  # partitions dropped because a newer owner claimed them

    # -- rebalance callbacks (run inside the member's poll) ----------------------------------
    def _assigned(self, partitions: list[int]) -> dict[int, int]:
        for partition in partitions:
            if partition not in self.processors:
                try:
                    self.processors[partition] = Processor(
                        self.config,
                        self.log,
                        self.serving,
                        partitions=[partition],
                        directory=self.state_dir / f"p{partition}",
                        on_revised=self.on_revised,
                        fenced=True,
                    )
                except FencedError as exc:  # stalled inside this callback: moved on already
                    self._note_fenced(partition, exc, "on assignment")
        self._changed()
        return {}  # the member does not read; the processors start from their checkpoints

    def _revoked(self, partitions: list[int]) -> None:
        self._release(partitions, flush=True)

    def _lost(self, partitions: list[int]) -> None:
        for partition in partitions:
            processor = self.processors.get(partition)
            if processor is not None and processor.fence is not None:
                try:  # only to say why in the log: nothing is written either way
                    self.serving.check_fence(processor.fence)
                except FencedError as exc:
                    self._note_fenced(partition, exc, "when the group reported it lost")
                except Exception:
                    pass
        self._release(partitions, flush=False)

    def _release(self, partitions: Sequence[int], *, flush: bool) -> None:
        for partition in partitions:
            processor = self.processors.pop(partition, None)
            if processor is None:
                continue
            try:
                if flush:
                    processor.flush()
            except FencedError as exc:  # a newer owner has it: its state wins
                self._note_fenced(partition, exc, "its checkpoint on revoke was refused")
            finally:
                processor.close()
        self._changed()

    def _note_fenced(self, partition: int, exc: FencedError, how: str) -> None:
        self.fenced += 1
        log.warning(
            "processor p%d: fenced (%s) %s; dropped this member's state of the partition "
            "until the group assigns it again",
            partition,
            exc,
            how,
        )

    def _drop_fenced(self, partition: int, exc: FencedError) -> None:
        """A write was rejected: another member owns the partition now. Close
        its processor without writing anything more."""
        processor = self.processors.pop(partition, None)
        self._note_fenced(partition, exc, "a write was rejected")
        if processor is not None:
            processor.close()
        self._changed()

    def _changed(self) -> None:
        owned = sorted(self.processors)
        log.info("processor group: this member owns partitions %s", owned)
        if self.on_change is not None:
            self.on_change(owned)

    # -- running -------------------------------------------------------------------------------
    def run_once(self, wait_s: float = 0.1) -> int:
        """One cycle of every owned partition, then serve the group protocol
        (waiting up to ``wait_s`` when nothing was consumed). Returns records
        consumed."""
        consumed = 0
        for partition, processor in list(self.processors.items()):
            try:
                consumed += processor.run_once(wait_s=0.0)
            except FencedError as exc:
                self._drop_fenced(partition, exc)
            except Exception as exc:  # keep the other partitions going; surfaced in status()
                self.errors += 1
                self.last_error = f"partition {partition}: {exc}"[:500]
                log.exception("processor p%d: cycle failed; recovering from checkpoint", partition)
                try:
                    processor._recover()
                except FencedError as fenced:
                    self._drop_fenced(partition, fenced)
                except Exception:
                    log.exception("processor p%d: recovery failed", partition)
        # Paused partitions: this returns no records, only runs heartbeats and callbacks.
        self.member.poll_batches(1, timeout_s=0.0 if consumed else wait_s)
        return consumed

    def run(self, stop_event: threading.Event) -> None:
        """Join the group and process until ``stop_event``; then checkpoint
        every owned partition and leave the group."""
        self.member.subscribe(  # type: ignore[attr-defined]
            self._assigned, self._revoked, on_lost=self._lost, fetch=False
        )
        try:
            while not stop_event.is_set():
                self.run_once()
        finally:
            self._release(list(self.processors), flush=True)

    def status(self) -> dict[str, Any]:
        return {
            "partitions": sorted(self.processors),
            "shards": {p: proc.status() for p, proc in sorted(self.processors.items())},
            "errors": self.errors,
            "last_error": self.last_error or None,
            "fenced_partitions": self.fenced,
        }

    def close(self) -> None:
        self._release(list(self.processors), flush=True)
        self.member.close()
