"""Run the benchmark suite, or some parts of it, and print a summary table.

    python -m benchmarks --all                 # every part, full size, updates docs/benchmarks.md
    python -m benchmarks ingest query          # some parts
    python -m benchmarks --all --tiny --no-write   # smoke size, leaves the docs alone
    python -m benchmarks query -- --events 1000000  # extra arguments go to every named part

Each part is a module `benchmarks/<name>.py` run as its own process; it prints its
own table and (unless `--no-write`) rewrites its own section of
docs/benchmarks.md. This runner records wall time and the load average
before and after each part, because the machine is shared.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Order: cheap, self-contained parts first.
PARTS = ["log", "stream", "schemas", "ingest", "loader", "dedup", "freshness", "backfill",
         "rollup_parts", "query", "cache_hits", "chdb_memory"]

# Arguments that make each part finish in a few seconds (smoke test, `--tiny`).
TINY: dict[str, list[str]] = {
    "log": ["--records", "2000", "--runs", "1", "--flush-every", "500", "--embedded-only"],
    "stream": ["--events", "20000", "--python-events", "5000", "--e2e-events", "5000",
               "--runs", "1", "--batch", "5000"],
    "schemas": ["--seconds", "1", "--runs", "1", "--batch", "50", "--connections", "2",
                "--workers", "1", "--cpu-seconds", "0.2"],
    "ingest": ["--seconds", "1", "--runs", "1", "--batch", "50", "--connections", "2",
               "--workers", "1"],
    "loader": ["--events", "20000", "--runs", "1"],
    "dedup": ["--minutes", "0.2", "--rate", "2000", "--runs", "1"],
    "freshness": ["--rate", "500", "--seconds", "3", "--memory-seconds", "0"],
    "backfill": ["--events", "20000", "--days", "2"],
    "rollup_parts": ["--events", "20000", "--days", "40", "--runs", "2"],
    "query": ["--events", "20000", "--days", "3", "--runs", "2", "--raw-runs", "1"],
    "cache_hits": ["--events", "2000", "--requests", "20"],
    "chdb_memory": ["--seconds", "4", "--sample-seconds", "2", "--rate", "2000",
                    "--variants", "bounded"],
}


def loadavg() -> str:
    """The 1-minute load average, as text (the machine is shared)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def run_part(name: str, argv: list[str]) -> tuple[str, float, str, str]:
    """Run one part in its own process (chDB holds one data directory per
    process, and some parts end with ``os._exit``); returns (status, seconds,
    load before, load after)."""
    before = loadavg()
    started = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *argv], cwd=ROOT).returncode
    status = "ok" if code == 0 else f"exit {code}"
    return status, time.perf_counter() - started, before, loadavg()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", help=f"parts to run: {', '.join(PARTS)}")
    parser.add_argument("--all", action="store_true", help="run every part")
    parser.add_argument("--tiny", action="store_true", help="smoke size (seconds per part)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    parts = PARTS if args.all else args.parts
    if not parts:
        parser.error("name one or more parts, or --all")
    rows = []
    for name in parts:
        part_argv = (TINY[name] if args.tiny else []) + (["--no-write"] if args.no_write else [])
        print(f"\n=== benchmarks.{name} {' '.join(part_argv + extra)}", flush=True)
        rows.append((name, *run_part(name, part_argv + extra)))
    print("\n| part | status | seconds | load before | load after |")
    print("|---|---|---|---|---|")
    for name, status, seconds, before, after in rows:
        print(f"| {name} | {status} | {seconds:.1f} | {before} | {after} |")
    return 0 if all(row[1] == "ok" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
