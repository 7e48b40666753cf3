"""Ingest throughput: durably acknowledged events/s through a running
`strata serve`, driven by wrk (C, Lua script), against a plain
decode-and-append loop on the same log measured in the same run.

    python -m benchmarks.ingest [--seconds 10] [--runs 3] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec

from benchmarks.common import fmt, write_section
from strata.generate import TrafficModel

WRITE_KEY = "bench_write_key"
TOKEN = "bench_admin_token"


def make_body(events: int, seed: int = 1) -> bytes:
    batch = TrafficModel(seed=seed).batch(events)
    for event in batch:
        event.pop("event_id")  # the server generates ids: every request is new events
        event.pop("timestamp")
    return json.dumps({"batch": batch}).encode()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, data_dir: Path, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "STRATA_WRITE_KEYS": WRITE_KEY, "STRATA_ADMIN_TOKENS": TOKEN}
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(data_dir.parent / "serve.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "strata.cli", "serve", "--data-dir", str(data_dir),
             "--port", str(self.port), "--workers", str(workers)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("strata serve did not start")

    def status(self) -> dict:
        return httpx.get(f"{self.url}/v1/status", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=30).json()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run_wrk(url: str, body_path: Path, seconds: float, connections: int) -> tuple[float, int]:
    script = body_path.with_suffix(".lua")
    script.write_text(
        'wrk.method = "POST"\n'
        f'local f = io.open("{body_path}", "rb")\n'
        "wrk.body = f:read(\"*all\")\n"
        "f:close()\n"
        f'wrk.headers["Authorization"] = "Bearer {WRITE_KEY}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", str(script),
         f"{url}/v1/batch"],
        capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, int(non2xx.group(1)) if non2xx else 0


def worker_cpu_s(supervisor: int) -> float:
    """CPU seconds (user + system) used so far by the ingest worker processes
    under ``supervisor`` (the machine is shared: events per worker CPU-second
    is the per-core figure; wall-clock rates depend on the other load)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == supervisor and b"strata.server.worker" in cmdline:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def baseline_loop(body: bytes, seconds: float, data_dir: Path) -> float:
    """Decode each request body and append its events to the embedded log
    with a durable flush per request: the physical limit of the same work
    without HTTP, validation or normalization."""
    from strata.log.embedded import EmbeddedLog

    log = EmbeddedLog(data_dir / "baseline-log")
    log.create_topic("events", 8)
    producer = log.producer()
    decoder = msgspec.json.Decoder(dict[str, list[msgspec.Raw]])
    events = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = decoder.decode(body)["batch"]
        for index, raw in enumerate(batch):
            producer.produce("events", index % 8, None, bytes(raw))
        producer.flush()
        events += len(batch)
    elapsed = time.perf_counter() - started
    log.close()
    return events / elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks.ingest")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks.ingest: wrk is required (apt-get install wrk)")
    body = make_body(args.batch)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        body_path = tmp_path / "body.json"
        body_path.write_bytes(body)
        results["baseline"] = [baseline_loop(body, args.seconds / 2, tmp_path / f"b{i}")
                               for i in range(args.runs)]
        catch_up: dict[str, list[float]] = {}
        per_cpu: dict[str, list[float]] = {}
        load_before = Path("/proc/loadavg").read_text().split()[0]
        for workers in [int(w) for w in args.workers.split(",")]:
            key = f"serve_{workers}w"
            results[key] = []
            catch_up[key] = []
            for run in range(args.runs):
                server = Server(tmp_path / f"{key}-{run}" / "data", workers)
                try:
                    cpu_before = worker_cpu_s(server.process.pid)
                    rate, errors = run_wrk(server.url, body_path, args.seconds, args.connections)
                    cpu = worker_cpu_s(server.process.pid) - cpu_before
                    if errors:
                        print(f"warning: {errors} non-2xx responses", file=sys.stderr)
                    results[key].append(rate * args.batch)
                    per_cpu.setdefault(key, []).append(rate * args.batch * args.seconds / max(cpu, 1e-3))
                    ingested = rate * args.batch * args.seconds
                    started = time.perf_counter()
                    # The events loader only: other consumers (the processor's
                    # outputs) wait for windows to close, which is not storing.
                    while server.status()["consumers"]["loader-events"]["lag_events"] > 0:
                        time.sleep(0.1)
                    # Loader rate over the whole run: events stored / (run + drain time).
                    catch_up[key].append(ingested / (args.seconds + time.perf_counter() - started))
                finally:
                    server.stop()
    lines = [
        "| what | events/s (median, min–max) | vs baseline |",
        "|---|---|---|",
        f"| baseline: decode + append + fsync loop, in-process | {fmt(results['baseline'])} | 1.00 |",
    ]
    import statistics

    base = statistics.median(results["baseline"])
    for key, values in results.items():
        if key == "baseline":
            continue
        workers = key.split("_")[1]
        lines.append(
            f"| `strata serve`, {workers[:-1]} ingest worker(s), acknowledged (durable, fsync always) "
            f"| {fmt(values)} | {statistics.median(values) / base:.2f} |")
        lines.append(
            f"| same run, events per CPU-second of the ingest worker process(es) "
            f"| {fmt(per_cpu[key])} | {statistics.median(per_cpu[key]) / base:.2f} |")
        lines.append(
            f"| same run, stored in chDB incl. drain (loader, raw + 8 rollups) "
            f"| {fmt(catch_up[key])} | {statistics.median(catch_up[key]) / base:.2f} |")
    body_text = (
        f"Load: wrk (1 thread, {args.connections} connections) posting {args.batch}-event batches "
        f"(about {len(body) // args.batch} bytes per event) for {args.seconds:.0f} s per run, "
        f"{args.runs} runs; the generator runs on the same 2-core machine. Load average (1 min) "
        f"before / after: {load_before} / {Path('/proc/loadavg').read_text().split()[0]}.\n\n"
        + "\n".join(lines)
    )
    print(body_text)
    if not args.no_write:
        write_section("Ingest (HTTP, durable acknowledgements)", body_text)
    return results


if __name__ == "__main__":
    main()
