"""A short chaos soak (benchmarks/chaos.py at a small size): every kind of
fault once under steady traffic, then the audit of every acknowledged
event_id against the raw table, the lake and the rollups. The long run and
its figures: ``python -m benchmarks.chaos --minutes 10`` (docs/reliability.md).

Raw-table duplicates or a rollup mismatch are the open loader defect
described there (a plan re-executed after a kill -9 during its insert): the
test then reports xfail with the audit, until the loader is fixed."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.chaos import FAULTS, run_chaos


def test_no_acknowledged_event_is_lost_or_duplicated_under_faults(tmp_path: Path) -> None:
    report = run_chaos(tmp_path / "data", minutes=3, rounds=1, rate=150, fault_every=2.5,
                       pause_s=1.0, progress=False)
    print(report.text())
    assert set(report.faults) == set(FAULTS), report.text()
    assert report.events_acknowledged > 0
    # Hard guarantees that held in every run: nothing acknowledged is lost
    # from the raw table or the lake, nothing is duplicated in the lake, and
    # nothing unacknowledged is invented.
    assert report.lost_raw == 0, report.text()
    assert report.lost_lake == 0 and report.duplicates_lake == 0, report.text()
    assert report.raw_distinct == report.events_acknowledged + report.probe_events
    if report.duplicates_raw or report.rollup_mismatch:
        # The open loader defect (docs/reliability.md, "Known defect"): a plan
        # re-executed after a kill -9 during its insert lands twice in the raw
        # table or not at all in the rollups. Remove this once it is fixed.
        pytest.xfail("known defect, re-executed loader plan after kill -9: " + report.text())
