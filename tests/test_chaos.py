"""A short chaos soak (benchmarks/chaos.py at a small size): every kind of
fault once under steady traffic, then the audit of every acknowledged
event_id against the raw table, the lake and the rollups. The long run and
its figures: ``python -m benchmarks.chaos --minutes 10`` (docs/reliability.md).

A failure of the duplicate or rollup assertions is most likely the open
loader defect described there (a plan re-executed after a kill during its
insert), not flakiness: the report printed with the failure says which."""

from __future__ import annotations

from pathlib import Path

from benchmarks.chaos import FAULTS, run_chaos


def test_no_acknowledged_event_is_lost_or_duplicated_under_faults(tmp_path: Path) -> None:
    report = run_chaos(tmp_path / "data", minutes=3, rounds=1, rate=150, fault_every=2.5,
                       pause_s=1.0, progress=False)
    print(report.text())
    assert set(report.faults) == set(FAULTS), report.text()
    assert report.events_acknowledged > 0
    assert report.lost_raw == 0 and report.duplicates_raw == 0, report.text()
    assert report.lost_lake == 0 and report.duplicates_lake == 0, report.text()
    assert report.rollup_mismatch == 0, report.text()
    # Every row stored is one the client had acknowledged: nothing invented.
    assert report.raw_distinct == report.events_acknowledged + report.probe_events
