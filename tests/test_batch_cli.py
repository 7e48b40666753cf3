"""The lake's CLI commands, run as a user runs them (no server running)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fixtures_lake import LakeEnv, day_start_ms, make_events, today_minus


def _strata(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strata.cli", *args, "--data-dir", str(tmp_path), "--local"],
        capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "STRATA_LOG__PARTITIONS": "4", "HOME": str(tmp_path)},
    )


def test_batch_replay_retention_and_delete_user_from_the_cli(tmp_path: Path) -> None:
    day = today_minus(2)
    env = LakeEnv(tmp_path)
    env.produce(make_events(500, start_ms=day_start_ms(day), seed=3))
    env.load()
    env.archive()
    env.close()

    done = _strata(tmp_path, "batch", "--date", day)
    assert done.returncode == 0, done.stderr
    assert "events_by_type" in done.stdout and "difference" in done.stdout

    done = _strata(tmp_path, "batch")
    assert done.returncode == 2 and "exactly one of --date" in done.stderr
    done = _strata(tmp_path, "batch", "--date", "yesterday")
    assert done.returncode == 2 and "YYYY-MM-DD" in done.stderr
    done = _strata(tmp_path, "batch", "--backfill", "nope")
    assert done.returncode == 1 and "unknown metric" in done.stderr

    done = _strata(tmp_path, "replay", "--from", f"{day}T06:00:00Z", "--to", f"{day}T08:00:00Z")
    assert done.returncode == 0, done.stderr
    assert "replayed from the log" in done.stderr

    done = _strata(tmp_path, "retention", "apply", "--now", f"{today_minus(0)}T00:00:00Z")
    assert done.returncode == 0, done.stderr
    assert '"raw_dropped_days": []' in done.stdout

    done = _strata(tmp_path, "delete-user", "u1")
    assert done.returncode == 0, done.stderr
    assert '"raw_rows"' in done.stdout and day in done.stdout
