"""The benchmark suite still starts and runs at a tiny size.

Not a timed test: it checks that every part runs to the end (exit 0, its
table printed) and that `--no-write` leaves docs/benchmarks.md alone.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


def digest() -> str:
    return hashlib.sha256(DOC.read_bytes()).hexdigest() if DOC.exists() else ""


def test_unknown_part_is_refused() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks", "nope"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown part(s) nope" in result.stderr


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk (Debian package) is not installed")
def test_tiny_suite_runs_without_writing_docs() -> None:
    before = digest()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--all", "--tiny", "--no-write"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = result.stdout[result.stdout.index("| part | status |"):]
    for part in ("log", "stream", "schemas", "ingest", "loader", "dedup", "freshness",
                 "backfill", "rollup_parts", "query", "cache_hits"):
        assert f"| {part} | ok |" in summary
    assert "ack -> visible" in result.stdout  # freshness table
    assert "loader / baseline" in result.stdout  # loader table
    assert digest() == before
