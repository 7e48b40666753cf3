"""How the query figures grow with events, users and time range: runs
`benchmarks.query` at several sizes (users = events / 100, 365 days) and
collects its p50 / p99 columns into one "Scaling" table.

    python -m benchmarks.scaling [--sizes 1000000,2500000,5000000] [--runs 10]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT, write_section

QUERIES = (
    "DAU per day, 1 year",
    "page views by country / 5 min, 24 h",
    "events by type per day, 1 year",
    "5-step funnel, 30 days",
)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def run_size(events: int, runs: int, raw_runs: int, days: int) -> dict[str, object]:
    before = loadavg()
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.query", "--events", str(events), "--days", str(days),
         "--runs", str(runs), "--raw-runs", str(raw_runs), "--no-write"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    header = next(line for line in out.splitlines() if line.startswith("| query |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] in QUERIES:
            rows[cells[0]] = dict(zip(columns, cells, strict=False))
    load = re.search(r"bulk-loaded in (\d+) s \(([\d,]+) events/s", out)
    return {"events": events, "rows": rows, "load_s": load.group(1) if load else "?",
            "load_rate": load.group(2) if load else "?", "loadavg": (before, loadavg())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling")
    parser.add_argument("--sizes", default="1000000,2500000,5000000")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--raw-runs", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        result = run_size(size, args.runs, args.raw_runs, args.days)
        results.append(result)
        print(f"{size:,} events: {result['rows']}", flush=True)
    last = str(results[-1]["load_rate"]).replace(",", "")
    rate = float(last) if last.replace(".", "").isdigit() else float("nan")
    cols = [("metrics API", "API"), ("API: day cache", "API, day cache"),
            ("SQL API", "SQL API"), ("store: routed", "routed"), ("store: raw", "raw"),
            ("DuckDB exact", "DuckDB exact"), ("DuckDB", "DuckDB")]
    lines = [
        f"`python -m benchmarks.scaling --sizes {args.sizes} --runs {args.runs} --raw-runs "
        f"{args.raw_runs}`: `benchmarks.query` at each size ({args.days} days, users = events / "
        "100 (at least 1,000), so users grow with events; the time range of each question is "
        "fixed), p50 / p99 ms; API = metrics API through the ASGI app with the result cache off, "
        "API, day cache = DAU for the year up to now with complete days from the per-day cache "
        "(watermark 30 s behind now), SQL API = `POST /v1/sql` (cache off), routed / raw = the "
        "router's SQL / the raw SQL straight on chDB. " + (
            "" if results[-1]["events"] >= 100_000_000 else
            "100M events was not run here; at the largest size's bulk rate "
            f"({rate:,.0f} events/s) building 100M would take about {100e6 / rate / 60:.0f} min "
            "(target ≤ 10 min)."),
        "",
        "| events | users | bulk build s (events/s) | question | "
        + " | ".join(label for _, label in cols) + " | load avg before / after |",
        "|---|---|---|---|" + "---|" * len(cols) + "---|",
    ]
    for r in results:
        for q in QUERIES:
            row = r["rows"].get(q, {})  # type: ignore[union-attr]
            cells = " | ".join(row.get(key, "") for key, _ in cols)
            lines.append(
                f"| {r['events']:,} | {max(1000, r['events'] // 100):,} | {r['load_s']} ({r['load_rate']}) "
                f"| {q} | {cells} | {r['loadavg'][0]} / {r['loadavg'][1]} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Scaling", body)


if __name__ == "__main__":
    main()
