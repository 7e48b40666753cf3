"""Chaos soak: steady traffic through `strata serve` while faults are injected.

    python -m benchmarks.chaos --minutes 10 [--rate 300] [--fault-every 8] [--seed 1]
    python -m benchmarks.chaos --shape roles --minutes 10   # the multi-process shape

A client thread posts generated batches at a steady rate. A batch that gets
no 2xx (connection refused, reset, 5xx, timeout) is retried with the *same*
event_ids until it is acknowledged, as the SDK does. Meanwhile a fault is
injected every ``--fault-every`` seconds, cycling through:

* ``kill_supervisor``: kill -9 of `strata serve` itself (every child dies with
  it, PR_SET_PDEATHSIG), then a fresh `strata serve` on the same data dir;
* ``kill_core`` / ``kill_ingest``: kill -9 of one child (PIDs from
  ``<data_dir>/run/serve.json``); the supervisor restarts it;
* ``pause_core`` / ``pause_ingest``: SIGSTOP for ``--pause`` seconds, SIGCONT;
* ``kill_at_checkpoint``: kill -9 of the core the moment a loader or
  processor checkpoint file changes (with 200 ms checkpoint intervals the
  core is then inside its checkpoint/commit sequence).

``--shape roles`` runs the multi-process shape on one host instead, every
role its own process on one data directory (embedded log) plus a
``redis-server`` for the live windows: ``strata ingest --workers 2``,
``strata query-api`` (loaders + query API, owns chDB), ``strata process``
and ``strata archive``. The benchmark is their service manager: a role
killed with -9 is started again at once. Faults, in turn (``ROLE_FAULTS``):
kill -9 of ``strata ingest`` itself and of one of its workers, of
``query-api``, ``process`` and ``archive``; kill -9 of ``query-api`` / of
``process`` the moment one of their checkpoint files changes; SIGSTOP /
SIGCONT of ``query-api``, ``process`` and an ingest worker.

Recovery time of a fault: from the injection (for a pause: from SIGCONT)
until ``/readyz`` answers 200 *and* a one-event probe batch is acknowledged.

At the end the server drains, and the audit checks every acknowledged
event_id against the raw table (``POST /v1/sql``), the lake (the Parquet
files under ``<data_dir>/lake``, read with pyarrow, after the archiver has
drained) and the rollups (``countMerge`` of ``rollup_events_by_type_5m`` and
``_1d`` == raw count). Losses and duplicates must be 0; ``main`` exits 1
otherwise. ``run_chaos`` is also what ``tests/test_chaos.py`` calls, small.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

WRITE_KEY = "wk_chaos_key"
ADMIN_TOKEN = "at_chaos_token"
FAULTS = ["kill_ingest", "pause_core", "kill_core", "pause_ingest", "kill_at_checkpoint",
          "kill_supervisor"]
ROLE_FAULTS = ["kill_ingest_worker", "pause_query_api", "kill_query_api", "pause_process",
               "kill_process", "kill_query_api_at_checkpoint", "pause_ingest_worker",
               "kill_archive", "kill_process_at_checkpoint", "kill_ingest_role"]
LOADER_CHECKPOINTS = ("loader/**/checkpoint.json",)
PROCESSOR_CHECKPOINTS = ("processor/**/checkpoint.msgpack",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """One `strata serve` on a fixed port and data dir; restartable after kill -9."""

    def __init__(self, data_dir: Path, workers: int = 2) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log_path = data_dir.parent / f"{data_dir.name}-serve.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "STRATA_WRITE_KEYS": WRITE_KEY,
            "STRATA_ADMIN_TOKENS": ADMIN_TOKEN,
            "STRATA_QUERY__SQL_MAX_ROWS": "10000000",
            # Frequent checkpoints and lake rolls: more crash points, and the
            # lake audit does not wait a minute for a roll.
            "STRATA_PROCESSOR__CHECKPOINT_INTERVAL": '"200ms"',
            "STRATA_LAKE__ROLL_INTERVAL": '"1s"',
            "STRATA_LOADER__MAX_WAIT_MS": "100",
        }
        self.client = httpx.Client(timeout=10.0)

    def start(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "strata.cli", "serve", "--data-dir", str(self.data_dir),
             "--port", str(self.port), "--workers", str(self.workers)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()

    def children(self) -> dict[str, int]:
        try:
            data = json.loads((self.data_dir / "run" / "serve.json").read_text())
        except (OSError, ValueError):
            return {}
        if self.process is None or data.get("pid") != self.process.pid:
            return {}  # a stale file from before a restart
        return {str(k): int(v) for k, v in data.get("children", {}).items()}

    def ready(self) -> bool:
        try:
            return self.client.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"strata serve exited: {self.log_path}")
            if self.ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"strata serve not ready in {timeout}s: {self.log_path}")

    def kill9(self) -> None:
        assert self.process is not None
        pids = list(self.children().values())
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        deadline = time.monotonic() + 30
        for pid in pids:  # children die with the supervisor; wait for it
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(180)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def sql(self, query: str) -> list[list[Any]]:
        response = self.client.post(f"{self.url}/v1/sql", json={"sql": query},
                                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120)
        response.raise_for_status()
        return list(response.json()["rows"])

    def status(self) -> dict[str, Any]:
        response = self.client.get(f"{self.url}/v1/status",
                                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        response.raise_for_status()
        return dict(response.json())


class Roles:
    """The multi-process shape on one host: ``strata ingest``, ``query-api``,
    ``process`` and ``archive`` on one data dir (embedded log), a
    ``redis-server`` for the live windows. Same interface as ``Serve`` for
    the traffic, the probes and the audit; ``url`` is the ingest role's,
    ``query_url`` the query API's."""

    ROLES = ("ingest", "query-api", "process", "archive")

    def __init__(self, data_dir: Path, workers: int = 2) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.query_port = free_port()
        self.redis_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.query_url = f"http://127.0.0.1:{self.query_port}"
        self.workers = workers
        self.log_path = data_dir.parent / f"{data_dir.name}-roles.log"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.redis: subprocess.Popen[bytes] | None = None
        self.env = {
            **Serve(data_dir).env,
            "STRATA_SERVING__BACKEND": '"redis"',
            "STRATA_SERVING__REDIS_URL": f'"redis://127.0.0.1:{self.redis_port}/0"',
        }
        self.client = httpx.Client(timeout=10.0)

    def argv(self, role: str) -> list[str]:
        base = [sys.executable, "-m", "strata.cli", role, "--data-dir", str(self.data_dir)]
        if role == "ingest":
            return base + ["--port", str(self.port), "--workers", str(self.workers)]
        if role == "query-api":
            return base + ["--port", str(self.query_port)]
        return base

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.redis is None:
            self.redis = subprocess.Popen(
                ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        # The query API first: it creates the store's tables.
        for role in self.ROLES:
            self.start_role(role)
            if role == "query-api":
                self._wait_http(self.query_url, 180)

    def start_role(self, role: str) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.processes[role] = subprocess.Popen(self.argv(role), env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT)
        log.close()

    def pid(self, role: str) -> int | None:
        process = self.processes.get(role)
        return process.pid if process is not None and process.poll() is None else None

    def ingest_workers(self) -> list[int]:
        pid = self.pid("ingest")
        if pid is None:
            return []
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def restart_dead(self) -> None:
        """What a service manager does: start every role that is not running."""
        for role in self.ROLES:
            if self.pid(role) is None:
                self.start_role(role)

    def _http_ready(self, url: str) -> bool:
        try:
            return self.client.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._http_ready(url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready in {timeout}s: {self.log_path}")
            time.sleep(0.1)

    def ready(self) -> bool:
        return (all(self.pid(role) is not None for role in self.ROLES)
                and self._http_ready(self.url) and self._http_ready(self.query_url))

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"roles not ready in {timeout}s: {self.log_path}")
            time.sleep(0.1)

    def stop(self) -> None:
        # Ingest first, then the readers drain what the log holds.
        for group in (("ingest",), ("process", "archive", "query-api")):
            for role in group:
                process = self.processes.get(role)
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for role in group:
                process = self.processes.get(role)
                if process is None:
                    continue
                try:
                    process.wait(180)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait()

    def sql(self, query: str) -> list[list[Any]]:
        response = self.client.post(f"{self.query_url}/v1/sql", json={"sql": query},
                                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120)
        response.raise_for_status()
        return list(response.json()["rows"])

    def status(self) -> dict[str, Any]:
        response = self.client.get(f"{self.query_url}/v1/status",
                                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        response.raise_for_status()
        return dict(response.json())


def inject_role_fault(fault: str, roles: Roles, rng: random.Random, pause_s: float) -> float | None:
    """One fault of ``ROLE_FAULTS``; a role killed with -9 is started again at
    once. Returns the monotonic time recovery is measured from, or None."""
    victims: list[int] = []

    def kill(pid: int | None) -> bool:
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        victims.append(pid)
        return True

    def pause(pid: int | None) -> float | None:
        if pid is None:
            return None
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return None
        time.sleep(pause_s)
        os.kill(pid, signal.SIGCONT)
        return time.monotonic()

    def worker() -> int | None:
        workers = roles.ingest_workers()
        return rng.choice(workers) if workers else None

    if fault == "kill_ingest_worker":  # the ingest role restarts its worker
        return time.monotonic() if kill(worker()) else None
    if fault == "pause_ingest_worker":
        return pause(worker())
    if fault.startswith("pause_"):
        return pause(roles.pid(fault.removeprefix("pause_").replace("_", "-")))
    if fault.endswith("_at_checkpoint"):
        role = fault.removeprefix("kill_").removesuffix("_at_checkpoint").replace("_", "-")
        patterns = LOADER_CHECKPOINTS if role == "query-api" else PROCESSOR_CHECKPOINTS
        pid = roles.pid(role)
        killed = _kill_when_checkpointed(roles.data_dir, lambda: pid, patterns)
        if killed and pid is not None:
            victims.append(pid)
    elif fault == "kill_ingest_role":
        process = roles.processes["ingest"]
        workers = roles.ingest_workers()
        killed = kill(roles.pid("ingest"))
        if killed:
            process.wait(30)
            _wait_gone(workers)  # its workers die with it; the port must be free
    else:
        role = fault.removeprefix("kill_").replace("_", "-")
        if role not in Roles.ROLES:
            raise ValueError(f"unknown fault {fault!r}")
        killed = kill(roles.pid(role))
    if not killed:
        return None
    started = time.monotonic()
    for process in roles.processes.values():
        # The victim is dead or about to be: reap it, then start it again.
        try:
            process.wait(0 if process.pid not in victims else 30)
        except subprocess.TimeoutExpired:
            pass
    roles.restart_dead()
    return started


def _wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def post_until_acked(client: httpx.Client, url: str, batch: list[dict[str, Any]],
                     stop_at: float) -> tuple[list[str], int]:
    """Post ``batch`` until a 2xx (same event_ids every time). Returns the
    acknowledged event_ids (rejected indexes excluded) and the retries used;
    ([], n) if ``stop_at`` (monotonic) passed first."""
    retries = 0
    delay = 0.05
    while True:
        try:
            response = client.post(f"{url}/v1/batch", json={"batch": batch},
                                   headers={"Authorization": f"Bearer {WRITE_KEY}"})
            if 200 <= response.status_code < 300:
                rejected = {item["index"] for item in response.json().get("rejected", [])}
                return [e["event_id"] for i, e in enumerate(batch) if i not in rejected], retries
            if 400 <= response.status_code < 500 and response.status_code != 429:
                raise RuntimeError(f"batch refused: {response.status_code} {response.text[:300]}")
        except httpx.HTTPError:
            pass
        if time.monotonic() > stop_at:
            return [], retries
        retries += 1
        time.sleep(delay)
        delay = min(1.0, delay * 2)


@dataclass
class Traffic:
    """The steady client: batches at ``rate`` events/s, every one retried until acked."""

    url: str
    rate: float
    batch_size: int = 50
    seed: int = 1
    acked: list[str] = field(default_factory=list)
    retries: int = 0
    unacked_batches: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        from strata.generate import TrafficModel

        model = TrafficModel(users=5_000, seed=self.seed, late_share=0.0)
        client = httpx.Client(timeout=5.0)
        interval = self.batch_size / self.rate
        next_at = time.monotonic()
        while not self.stop.is_set():
            batch = model.batch(self.batch_size)
            for event in batch:
                event["event_id"] = str(uuid.uuid4())
            # A batch in flight when traffic stops still gets 5 minutes to be acked.
            acked, retries = post_until_acked(client, self.url, batch, time.monotonic() + 300)
            with self.lock:
                self.acked.extend(acked)
                self.retries += retries
                self.unacked_batches += 0 if acked else 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - 1.0)  # do not burst after an outage


@dataclass
class Report:
    minutes: float
    rate: float
    shape: str = "serve"
    events_acknowledged: int = 0
    probe_events: int = 0
    client_retries: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    recovery_s: list[float] = field(default_factory=list)
    raw_rows: int = 0
    raw_distinct: int = 0
    lost_raw: int = 0
    duplicates_raw: int = 0
    lake_rows: int = 0
    lost_lake: int = 0
    duplicates_lake: int = 0
    rollup_counts: dict[str, int] = field(default_factory=dict)
    rollup_mismatch: int = 0
    unacked_batches: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost_raw or self.duplicates_raw or self.lost_lake or self.duplicates_lake
                    or self.rollup_mismatch)

    def percentile(self, q: float) -> float:
        if not self.recovery_s:
            return 0.0
        ordered = sorted(self.recovery_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def text(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        return "\n".join([
            f"load: {self.rate:.0f} events/s for {self.minutes:g} min ({self.shape})",
            f"events acknowledged: {self.events_acknowledged} (+{self.probe_events} probes), "
            f"client retries {self.client_retries}",
            f"faults injected: {sum(self.faults.values())} ({faults})",
            f"recovery: p50 {self.percentile(0.5):.2f} s, p99 {self.percentile(0.99):.2f} s, "
            f"max {max(self.recovery_s, default=0):.2f} s",
            f"raw table: {self.raw_rows} rows, lost {self.lost_raw}, duplicates {self.duplicates_raw}",
            f"lake: {self.lake_rows} rows, lost {self.lost_lake}, duplicates {self.duplicates_lake}",
            f"rollups: {self.rollup_counts}, mismatches {self.rollup_mismatch}",
            f"verdict: {'OK' if self.ok else 'FAILED'}",
        ])


def _signal_child(serve: Serve, name_prefix: str, sig: int, rng: random.Random) -> int | None:
    children = {k: v for k, v in serve.children().items() if k.startswith(name_prefix)}
    if not children:
        return None
    pid = children[rng.choice(sorted(children))]
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return None
    return pid


def _checkpoint_mtimes(data_dir: Path,
                       patterns: tuple[str, ...] = LOADER_CHECKPOINTS + PROCESSOR_CHECKPOINTS,
                       ) -> dict[Path, float]:
    out: dict[Path, float] = {}
    for pattern in patterns:
        for path in data_dir.glob(pattern):
            try:
                out[path] = path.stat().st_mtime_ns
            except OSError:
                pass
    return out


def _kill_at_checkpoint(serve: Serve, timeout: float = 10.0) -> bool:
    return _kill_when_checkpointed(serve.data_dir, lambda: serve.children().get("core"),
                                   LOADER_CHECKPOINTS + PROCESSOR_CHECKPOINTS, timeout)


def _kill_when_checkpointed(data_dir: Path, pid_of: Any, patterns: tuple[str, ...],
                            timeout: float = 10.0) -> bool:
    """kill -9 of ``pid_of()`` the moment one of the checkpoint files changes."""
    before = _checkpoint_mtimes(data_dir, patterns)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _checkpoint_mtimes(data_dir, patterns)
        if any(now.get(path) != mtime for path, mtime in before.items()) or set(now) - set(before):
            pid = pid_of()
            if pid is None:
                return False
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return False
            return True
        time.sleep(0.002)
    return False


def inject(fault: str, serve: Serve, rng: random.Random, pause_s: float) -> float | None:
    """Inject one fault; returns the monotonic time recovery is measured from,
    or None if the fault could not be injected (no such process right now)."""
    if fault == "kill_supervisor":
        serve.kill9()
        started = time.monotonic()
        serve.start()
        return started
    if fault == "kill_core":
        return time.monotonic() if _signal_child(serve, "core", signal.SIGKILL, rng) else None
    if fault == "kill_ingest":
        return time.monotonic() if _signal_child(serve, "ingest", signal.SIGKILL, rng) else None
    if fault == "kill_at_checkpoint":
        return time.monotonic() if _kill_at_checkpoint(serve) else None
    if fault in ("pause_core", "pause_ingest"):
        pid = _signal_child(serve, fault.split("_")[1], signal.SIGSTOP, rng)
        if pid is None:
            return None
        time.sleep(pause_s)
        os.kill(pid, signal.SIGCONT)
        return time.monotonic()
    raise ValueError(f"unknown fault {fault!r}")


def wait_recovered(serve: Serve, client: httpx.Client, probes: list[str], timeout: float = 300) -> None:
    """Until /readyz is 200 and a one-event probe is acknowledged."""
    deadline = time.monotonic() + timeout
    while not serve.ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no recovery in {timeout}s: {serve.log_path}")
        time.sleep(0.05)
    probe = [{"event_id": str(uuid.uuid4()), "event_type": "chaos_probe", "user_id": "chaos"}]
    acked, _ = post_until_acked(client, serve.url, probe, deadline)
    if not acked:
        raise RuntimeError(f"probe not acknowledged in {timeout}s: {serve.log_path}")
    probes.extend(acked)


def read_lake_ids(lake: Path) -> list[str]:
    import pyarrow.parquet as pq

    ids: list[str] = []
    for path in sorted(lake.rglob("*.parquet")):
        if any(part.startswith(("_", ".")) for part in path.relative_to(lake).parts):
            continue
        ids.extend(pq.read_table(path, columns=["event_id"]).column("event_id").to_pylist())
    return ids


def audit(serve: Serve, acked: list[str], report: Report) -> None:
    """Raw table, rollups (server running and caught up), then the lake (after stop + drain)."""
    expected = set(acked)
    rows = serve.sql("SELECT event_id, count() FROM events GROUP BY event_id")
    stored = {row[0]: int(row[1]) for row in rows}
    report.raw_rows = sum(stored.values())
    report.raw_distinct = len(stored)
    report.lost_raw = len(expected - stored.keys())
    report.duplicates_raw = sum(n - 1 for n in stored.values() if n > 1)
    # Exactly once in every rollup: the count equals the acknowledged events.
    # (Not `SELECT count() FROM events`: the router answers that from a rollup.)
    for granularity in ("5m", "1d"):
        table = f"rollup_events_by_type_{granularity}"
        count = int(serve.sql(f"SELECT countMerge(events) FROM {table}")[0][0])
        report.rollup_counts[table] = count
        report.rollup_mismatch += abs(count - len(expected))
    serve.stop()
    # The archiver drains what the log holds (it is the same consumer group).
    subprocess.run([sys.executable, "-m", "strata.lake.archiver", "--data-dir", str(serve.data_dir),
                    "--drain"], env=serve.env, check=True, capture_output=True, timeout=600)
    lake_ids = Counter(read_lake_ids(serve.data_dir / "lake"))
    report.lake_rows = sum(lake_ids.values())
    report.lost_lake = len(expected - lake_ids.keys())
    report.duplicates_lake = sum(n - 1 for n in lake_ids.values() if n > 1)


def wait_caught_up(serve: Serve, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = serve.status()
            if status.get("lag_events") == 0:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"lag did not reach 0: {status}")


def run_chaos(data_dir: Path, *, minutes: float, rate: float = 300, fault_every: float = 8.0,
              pause_s: float = 2.0, seed: int = 1, workers: int = 2,
              faults: list[str] | None = None, rounds: int | None = None,
              progress: bool = True, shape: str = "serve") -> Report:
    """Run the soak on a fresh ``data_dir``; returns the audited report.

    ``shape``: ``serve`` (`strata serve`, faults ``FAULTS``) or ``roles``
    (the multi-process shape, faults ``ROLE_FAULTS``). ``rounds``: stop
    after every fault was injected this many times (then ``minutes`` is only
    an upper bound), instead of when ``minutes`` end."""
    rng = random.Random(seed)
    if shape not in ("serve", "roles"):
        raise ValueError(f"shape: {shape!r} is not 'serve' or 'roles'")
    schedule = list(faults or (FAULTS if shape == "serve" else ROLE_FAULTS))
    report = Report(minutes=minutes, rate=rate, shape=shape)
    serve: Any = Serve(data_dir, workers=workers) if shape == "serve" else Roles(data_dir, workers)
    serve.start()
    serve.wait_ready()
    traffic = Traffic(serve.url, rate, seed=seed)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    probe_client = httpx.Client(timeout=5.0)
    probes: list[str] = []
    end = time.monotonic() + minutes * 60
    index = 0
    try:
        while time.monotonic() < end:
            if rounds is not None and index >= rounds * len(schedule):
                break
            time.sleep(min(fault_every, max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
            fault = schedule[index % len(schedule)]
            index += 1
            if shape == "serve":
                started = inject(fault, serve, rng, pause_s)
            else:
                started = inject_role_fault(fault, serve, rng, pause_s)
            if started is None:
                continue
            wait_recovered(serve, probe_client, probes)
            report.faults[fault] += 1
            report.recovery_s.append(time.monotonic() - started)
            if progress:
                print(f"  {fault}: recovered in {report.recovery_s[-1]:.2f} s "
                      f"({len(traffic.acked)} acked so far)", flush=True)
        traffic.stop.set()
        thread.join(360)
        wait_caught_up(serve)
        with traffic.lock:
            acked = list(traffic.acked)
            report.client_retries = traffic.retries
            report.unacked_batches = traffic.unacked_batches
        report.events_acknowledged = len(acked)
        report.probe_events = len(probes)
        audit(serve, acked + probes, report)
    finally:
        traffic.stop.set()
        serve.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=300.0, help="events/s (default 300)")
    parser.add_argument("--fault-every", type=float, default=8.0, help="seconds between faults")
    parser.add_argument("--pause", type=float, default=2.0, help="SIGSTOP length, seconds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", help="default: a fresh temporary directory")
    parser.add_argument("--shape", choices=["serve", "roles"], default="serve",
                        help="`strata serve` (default) or the multi-process shape")
    args = parser.parse_args(argv)
    base = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="strata-chaos-"))
    data_dir = base / "data"
    print(f"chaos ({args.shape}): {args.minutes:g} min at {args.rate:g} events/s, a fault every "
          f"{args.fault_every:g} s; data in {data_dir}", flush=True)
    report = run_chaos(data_dir, minutes=args.minutes, rate=args.rate, fault_every=args.fault_every,
                       pause_s=args.pause, seed=args.seed, workers=args.workers, shape=args.shape)
    print(report.text())
    if report.recovery_s:
        print(f"recovery mean {statistics.mean(report.recovery_s):.2f} s over "
              f"{len(report.recovery_s)} faults")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
