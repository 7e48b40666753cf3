"""Freshness and memory of `strata serve` under a sustained rate.

    python -m benchmarks.freshness [--rate 20000] [--seconds 60] [--memory-seconds 180]

Freshness: while a paced load process posts 500-event batches at ``--rate``
events/s, a probe posts one event of a unique event type, notes when the
server acknowledges it (durable), then polls `GET /v1/metrics/count` filtered
on that event type every 20 ms until the count is 1: ack -> visible in the
metrics API (loader -> chDB raw; the metrics API reads the store). The
server runs with the open-range cache TTL at 0 so a poll cannot be served a
cached zero. Probes run back to back for the whole run.

Memory: the summed RSS of the supervisor and all its children (from /proc),
sampled every 2 s during a second sustained run of ``--memory-seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.common import fmt, write_section
from benchmarks.ingest import TOKEN, WRITE_KEY, Server, make_body

BATCH = 500


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def tree_rss_mib(pid: int) -> float:
    """Summed VmRSS of ``pid`` and all its descendants, MiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total_kib = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            pass
    return total_kib / 1024


def load_child(url: str, rate: float, seconds: float, threads: int) -> None:
    """Post pre-encoded batches paced to ``rate`` events/s; print the rate reached."""
    body = make_body(BATCH, seed=7)
    headers = {"Authorization": f"Bearer {WRITE_KEY}", "Content-Type": "application/json"}
    sent = [0]
    errors = [0]
    lock = threading.Lock()
    started = time.monotonic()

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            while True:
                elapsed = time.monotonic() - started
                if elapsed >= seconds:
                    return
                with lock:
                    ahead = sent[0] - rate * elapsed
                    if ahead < 0:
                        sent[0] += BATCH
                if ahead >= 0:
                    time.sleep(min(0.05, (ahead + 1) / rate))
                    continue
                response = client.post(f"{url}/v1/batch", content=body, headers=headers)
                if response.status_code != 200:
                    errors[0] += 1

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.monotonic() - started
    print(json.dumps({"rate": sent[0] / elapsed, "errors": errors[0]}))


def start_load(url: str, rate: float, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.freshness", "--load-child", url, "--rate", str(rate),
         "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True)


def probe(client: httpx.Client, url: str, n: int, timeout_s: float = 60.0) -> float:
    """Seconds from the durable ack of one probe event to its count in the metrics API."""
    event_type = f"probe_{n}_{os.getpid()}"
    response = client.post(f"{url}/v1/batch", json={"batch": [{"event_type": event_type,
                                                                "user_id": "probe"}]},
                           headers={"Authorization": f"Bearer {WRITE_KEY}"})
    acked = time.monotonic()
    response.raise_for_status()
    if response.json().get("accepted") != 1:
        raise RuntimeError(f"probe refused: {response.text}")
    now = int(time.time() * 1000)
    params = {"event_type": event_type, "granularity": "5m", "from": str(now - 900_000),
              "to": str(now + 900_000)}
    while time.monotonic() - acked < timeout_s:
        answer = client.get(f"{url}/v1/metrics/count", params=params,
                            headers={"Authorization": f"Bearer {TOKEN}"})
        answer.raise_for_status()
        if sum(row.get("events", 0) for row in answer.json()["rows"]) >= 1:
            return time.monotonic() - acked
        time.sleep(0.02)
    raise RuntimeError(f"probe {event_type} not visible after {timeout_s} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.freshness")
    parser.add_argument("--rate", type=float, default=20_000, help="sustained events/s")
    parser.add_argument("--seconds", type=float, default=60, help="freshness run length")
    parser.add_argument("--memory-seconds", type=float, default=180,
                        help="memory run length (0: skip)")
    parser.add_argument("--memory-rate", type=float, default=0, help="default: --rate")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--load-child", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.load_child:
        load_child(args.load_child, args.rate, args.seconds, threads=4)
        return {}
    env = {"STRATA_QUERY__OPEN_RANGE_CACHE_TTL": "0s",
           "STRATA_QUERY__RATE_LIMIT_PER_MINUTE": "1000000",
           "STRATA_QUERY__RATE_LIMIT_BURST": "100000"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    result: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="strata-bench-fresh-") as tmp:
            server = Server(Path(tmp) / "fresh" / "data", args.workers)
            try:
                load_before = loadavg()
                load = start_load(server.url, args.rate, args.seconds)
                latencies: list[float] = []
                with httpx.Client(timeout=30) as client:
                    started = time.monotonic()
                    while time.monotonic() - started < args.seconds:
                        latencies.append(probe(client, server.url, len(latencies)))
                out, _ = load.communicate(timeout=args.seconds + 120)
                reached = json.loads(out.strip().splitlines()[-1])
                result["freshness"] = {"latencies": latencies, "rate": reached,
                                       "load": (load_before, loadavg())}
            finally:
                server.stop()
            if args.memory_seconds > 0:
                rate = args.memory_rate or args.rate
                server = Server(Path(tmp) / "memory" / "data", args.workers)
                try:
                    load_before = loadavg()
                    load = start_load(server.url, rate, args.memory_seconds)
                    samples: list[tuple[float, float]] = []
                    started = time.monotonic()
                    while load.poll() is None:
                        samples.append((time.monotonic() - started,
                                        tree_rss_mib(server.process.pid)))
                        time.sleep(2)
                    out, _ = load.communicate()
                    reached = json.loads(out.strip().splitlines()[-1])
                    result["memory"] = {"samples": samples, "rate": reached,
                                        "load": (load_before, loadavg())}
                finally:
                    server.stop()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    body = render(args, result)
    print(body)
    if not args.no_write:
        write_section("Freshness and memory of `strata serve`", body)
    return result


def render(args: argparse.Namespace, result: dict) -> str:
    fresh = result["freshness"]
    lat = fresh["latencies"]
    p99 = percentile(lat, 0.99)
    lines = [
        f"`python -m benchmarks.freshness --rate {args.rate:.0f} --seconds {args.seconds:.0f} "
        f"--memory-seconds {args.memory_seconds:.0f} --workers {args.workers}`: `strata serve` "
        f"with {args.workers} ingest worker(s) (defaults otherwise: embedded log, fsync always, "
        "loader + processor in the core process), a paced load process posting 500-event "
        "batches, probes back to back (ack -> visible in `GET /v1/metrics/count`, 20 ms polls).",
        "",
        "| what | value |",
        "|---|---|",
        f"| load reached (target {args.rate:,.0f} events/s) | {fresh['rate']['rate']:,.0f} events/s, "
        f"{fresh['rate']['errors']} failed requests |",
        f"| probes | {len(lat)} |",
        f"| ack -> visible, median (min–max) | {fmt(lat, ' s', 3)} |",
        f"| ack -> visible, p90 / p99 | {percentile(lat, 0.9):.3f} s / {p99:.3f} s |",
        f"| load average (1/5/15 min) before / after | {fresh['load'][0]} / {fresh['load'][1]} |",
    ]
    memory = result.get("memory")
    if memory:
        rss = [m for _, m in memory["samples"]]
        half = rss[len(rss) // 2:] or rss
        lines += [
            f"| memory run: load reached | {memory['rate']['rate']:,.0f} events/s for "
            f"{args.memory_seconds:.0f} s |",
            f"| RSS of all `strata serve` processes: first / median of 2nd half / max / last "
            f"| {rss[0]:,.0f} / {statistics.median(half):,.0f} / {max(rss):,.0f} / {rss[-1]:,.0f} MiB |",
            f"| memory run load average before / after | {memory['load'][0]} / {memory['load'][1]} |",
        ]
    lines += [
        "",
        f"Target p99 ≤ 2 s: {'met' if p99 <= 2 else 'not met'}.",
    ]
    if memory:
        series = ", ".join(f"{t:.0f}s {m:,.0f}" for t, m in memory["samples"][:: max(1, len(memory['samples']) // 12)])
        lines += ["", f"RSS samples (MiB): {series}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
