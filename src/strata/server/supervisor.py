"""`strata serve`: the embedded shape as one process tree behind one URL.

    supervisor (this process: binds the port, restarts children)
    ├── core      owns chDB; loaders, processor, archiver, query API (Unix socket)
    ├── ingest-0  serves /v1/batch, /v1/track; forwards the rest to the core
    ├── ingest-1  ...  (one per core by default)
    └── demo      `strata generate` against this server (--demo only)

Children die with the supervisor (PR_SET_PDEATHSIG), so a kill -9 of
`strata serve` is a crash of the whole pipeline, and the next start recovers
from the data directory alone. SIGTERM/SIGINT stop ingest first, then let
the core drain the log into the store before it exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from strata.auth import ensure_initial_keys
from strata.config import Config
from strata.durable import atomic_write_json
from strata.server.process import core_socket, run_dir, write_resolved_config


class Child:
    def __init__(self, name: str, argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        self.name = name
        self.argv = argv
        self.pass_fds = pass_fds
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.started = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, pass_fds=self.pass_fds)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _wait_for_core(core: Child, socket_path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not core.alive():
            raise SystemExit("strata: the core process failed to start (see its log above)")
        if socket_path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(socket_path))
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    raise SystemExit("strata: the core process did not become ready in time")


def serve(config: Config, *, demo: bool = False, demo_rate: int = 200, out: TextIO = sys.stdout) -> int:
    data = config.data_path
    data.mkdir(parents=True, exist_ok=True)
    created = ensure_initial_keys(config)
    resolved = write_resolved_config(config)
    socket_path = core_socket(config)
    socket_path.unlink(missing_ok=True)

    listener = socket.socket(socket.AF_INET6 if ":" in config.server.host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((config.server.host, config.server.port))
    except OSError as exc:
        print(f"strata: cannot listen on {config.server.host}:{config.server.port}: {exc}", file=sys.stderr)
        return 2
    listener.listen(4096)
    listener.set_inheritable(True)
    port = listener.getsockname()[1]
    url = f"http://{config.server.host}:{port}"

    python = sys.executable
    core = Child("core", [python, "-m", "strata.server.core", "--resolved-config", str(resolved)])
    workers_n = config.server.ingest_workers or max(1, os.cpu_count() or 1)
    workers = [
        Child(
            f"ingest-{i}",
            [python, "-m", "strata.server.worker", "--resolved-config", str(resolved),
             "--fd", str(listener.fileno()), "--index", str(i)],
            pass_fds=(listener.fileno(),),
        )
        for i in range(workers_n)
    ]
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    core.start()
    _wait_for_core(core, socket_path)
    for worker in workers:
        worker.start()
    children = [core, *workers]

    def record_children() -> None:
        # Rewritten after every restart: operators and the chaos soak read
        # the live PIDs from here.
        atomic_write_json(run_dir(config) / "serve.json", {
            "url": url, "pid": os.getpid(),
            "children": {c.name: c.process.pid for c in children if c.process},
        })

    record_children()
    print(f"strata is running at {url}  (data: {data})", file=out, flush=True)
    print(f"  dashboard: {url}/   status: {url}/v1/status   metrics: {url}/metrics", file=out, flush=True)
    if created:
        write_key, token = created
        print(f"  created a write key:   {write_key}", file=out)
        print(f"  created a query token: {token}   (admin scope)", file=out)
        print(f"  (also saved in {data / 'initial-credentials'}; keys.json stores only hashes)", file=out, flush=True)
    if demo:
        key = created[0] if created else _demo_key(config)
        demo_child = Child(
            "demo",
            [python, "-m", "strata.cli", "generate", "--url", url, "--write-key", key,
             "--rate", str(demo_rate), "--duration", "0", "--quiet"],
        )
        demo_child.start()
        children.append(demo_child)
        print(f"  demo traffic: about {demo_rate} events/s", file=out, flush=True)

    try:
        while not stopping:
            time.sleep(0.2)
            for child in children:
                if stopping or child.alive():
                    continue
                if child is core:
                    # The core owns the store: restart it, then the workers
                    # reconnect through the same socket path.
                    socket_path.unlink(missing_ok=True)
                    child.restarts += 1
                    print(f"strata: {child.name} exited; restarting", file=sys.stderr, flush=True)
                    child.start()
                    _wait_for_core(child, socket_path)
                    record_children()
                else:
                    child.restarts += 1
                    print(f"strata: {child.name} exited; restarting", file=sys.stderr, flush=True)
                    time.sleep(min(5.0, 0.2 * child.restarts))
                    child.start()
                    record_children()
    finally:
        for child in children:
            if child is not core:
                child.signal(signal.SIGTERM)
        for child in children:
            if child is not core:
                child.wait(15)
        core.signal(signal.SIGTERM)
        core.wait(120)
        listener.close()
        print("strata: stopped", file=out, flush=True)
    return 0


def _demo_key(config: Config) -> str:
    if config.auth.write_keys:
        return config.auth.write_keys[0]
    from strata.auth import Keyring

    return Keyring(config).create_write_key("demo")
