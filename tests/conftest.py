"""Shared fixtures: a real `strata serve` process tree on a free port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

REDIS_SERVER = "/usr/bin/redis-server"
WRITE_KEY = "wk_test_key"
ADMIN_TOKEN = "at_test_token"
QUERY_TOKEN = "qt_test_token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StrataServer:
    """A `strata serve` subprocess with helpers to talk to it."""

    def __init__(self, data_dir: Path, *, port: int | None = None, workers: int = 2,
                 env: dict[str, str] | None = None, config_path: Path | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "STRATA_WRITE_KEYS": WRITE_KEY,
            "STRATA_ADMIN_TOKENS": ADMIN_TOKEN,
            "STRATA_QUERY_TOKENS": QUERY_TOKEN,
            "STRATA_QUERY__SQL_MAX_ROWS": "2000000",
            **(env or {}),
        }
        self.config_path = config_path
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-serve.log"
        self.client = httpx.Client(timeout=60.0)

    def start(self, wait: bool = True) -> StrataServer:
        args = [sys.executable, "-m", "strata.cli", "serve", "--data-dir", str(self.data_dir),
                "--port", str(self.port), "--workers", str(self.workers), *self.extra_args]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"strata serve exited early:\n{self.log_text()[-4000:]}")
            try:
                if self.client.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"strata serve not ready in {timeout}s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        # Children die with the supervisor (PR_SET_PDEATHSIG); wait until
        # none holds the data directory any more.
        serve = self.data_dir / "run" / "serve.json"
        if serve.exists():
            pids = json.loads(serve.read_text()).get("children", {}).values()
            deadline = time.monotonic() + 30
            for pid in pids:
                while time.monotonic() < deadline:
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.05)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    # -- API helpers -----------------------------------------------------------
    def headers(self, token: str = ADMIN_TOKEN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def post_batch(self, events: list[dict[str, Any]], **kwargs: Any) -> httpx.Response:
        return self.client.post(f"{self.url}/v1/batch", json={"batch": events, **kwargs},
                                headers=self.headers(WRITE_KEY))

    def sql(self, query: str, token: str = ADMIN_TOKEN) -> dict[str, Any]:
        response = self.client.post(f"{self.url}/v1/sql", json={"sql": query}, headers=self.headers(token))
        assert response.status_code == 200, response.text
        return response.json()

    def scalar(self, query: str) -> Any:
        return self.sql(query)["rows"][0][0]

    def status(self) -> dict[str, Any]:
        response = self.client.get(f"{self.url}/v1/status", headers=self.headers())
        assert response.status_code == 200, response.text
        return response.json()

    def wait_caught_up(self, timeout: float = 120.0, *, include_archiver: bool = False) -> dict[str, Any]:
        """Wait until every loader (and the processor) has consumed the whole
        log. ``lag_events`` also counts what the archiver still buffers (up
        to ``lake.roll_interval``); include it only when a test needs the lake."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if include_archiver:
                if status["lag_events"] == 0:
                    return status
            elif all(
                info.get("lag_events", 0) == 0
                for name, info in status["consumers"].items()
                if name != "archiver"
            ):
                return status
            time.sleep(0.2)
        raise AssertionError(f"lag did not reach 0: {status}")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    servers: list[StrataServer] = []

    def make(name: str = "data", **kwargs: Any) -> StrataServer:
        server = StrataServer(tmp_path / name, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(server_factory: Any) -> StrataServer:
    return server_factory().start()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataServer]:
    server = StrataServer(tmp_path_factory.mktemp("shared") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A redis-server per test module, on a free loopback port, no
    persistence; killed by PID."""
    if not os.path.exists(REDIS_SERVER):
        pytest.fail(f"{REDIS_SERVER} is required for the Redis serving tests")
    port = free_port()
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    client.close()
    try:
        yield url
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
