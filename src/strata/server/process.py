"""Helpers shared by the child processes of `strata serve`."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
from pathlib import Path

import msgspec

from strata.config import Config, validate_config

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a kill -9
    of `strata serve` takes the whole process tree down, like a crash."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_dir(config: Config) -> Path:
    path = config.data_path / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_resolved_config(config: Config) -> Path:
    path = run_dir(config) / "config.json"
    path.write_bytes(msgspec.json.encode(config))
    return path


def read_resolved_config(path: str | Path) -> Config:
    config = msgspec.json.decode(Path(path).read_bytes(), type=Config)
    validate_config(config)
    return config


def core_socket(config: Config) -> Path:
    return run_dir(config) / "core.sock"
