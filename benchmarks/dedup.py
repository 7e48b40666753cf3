"""Retry dedup index: memory and speed at 50k events/s (decision 094).

    python -m benchmarks.dedup                      # 30 simulated minutes, both indexes
    python -m benchmarks.dedup --minutes 3 --runs 1 --no-write

Simulates the traffic one consumer (the events loader, the processor or the
archiver) feeds its index: ``--rate`` events/s over ``--partitions``
partitions, event times ≈ arrival (0-2 s of client/network delay), a
fraction ``--late`` of events 1-30 min late, and a fraction ``--retries``
of client retries of earlier events at a random delay up to ``--max-delay``
(capped by the simulated time so far), carrying the original's client
timestamp (event time ± 2 s of network-delay difference). Each simulated
second is one batch: per partition one ``first_unseen`` and one ``add``
(fsynced, like the loader), then ``expire``.

Each index runs in its own child process: the bounded index of decision 094
(``strata.loader.dedup.DedupIndex``) and, as the baseline, the pre-094
in-memory index (a copy of it is kept below, for this purpose only). Reported:
the growth of RSS (current and peak) over the process's RSS before the first
batch, the bytes of hash arrays the index holds, and lookups + adds per
CPU-second of the index calls. In `strata serve` three consumers each keep
an index, so the process holds three times these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import fmt, write_section

T0 = 1_764_000_000_000
HOUR_MS = 3_600_000


def _mix(seq: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of ``seq`` (uint64): the simulated id hashes and dice."""
    with np.errstate(over="ignore"):
        z = seq.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (salt + 1)) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Traffic:
    """Event ``seq`` arrives at second ``seq // rate``; everything about it
    is a function of ``seq``, so a retry can recompute its original."""

    def __init__(self, rate: int, partitions: int, late: float) -> None:
        self.rate = rate
        self.partitions = partitions
        self.late_per_million = int(late * 1_000_000)

    def received(self, seq: np.ndarray) -> np.ndarray:
        return T0 + (seq // self.rate) * 1000 + (seq % self.rate) * 1000 // self.rate

    def event_time(self, seq: np.ndarray) -> np.ndarray:
        dice = _mix(seq, 1)
        delay = (dice % np.uint64(2000)).astype(np.int64)
        late = (dice >> np.uint64(32)) % np.uint64(1_000_000) < self.late_per_million
        lateness = 60_000 + ((dice >> np.uint64(20)) % np.uint64(1_740_000)).astype(np.int64)
        return self.received(seq) - np.where(late, lateness, delay)

    def partition(self, seq: np.ndarray) -> np.ndarray:
        return ((_mix(seq, 0) >> np.uint64(40)) % np.uint64(self.partitions)).astype(np.int64)


class OldDedupIndex:
    """The pre-094 index (strata.loader.dedup before decision 094), kept as
    the benchmark's baseline only: every id hash of the horizon in memory,
    bucketed by receive hour, sorted chunks merged LSM-style."""

    def __init__(self, directory: Path, horizon_ms: int) -> None:
        self.directory = directory
        self.horizon_hours = -(-horizon_ms // HOUR_MS) + 1
        directory.mkdir(parents=True, exist_ok=True)
        self._chunks: dict[int, list[tuple[int, np.ndarray]]] = {}
        self._lengths: dict[str, int] = {}

    def first_unseen(self, partition: int, hashes: np.ndarray) -> np.ndarray:
        keep = np.zeros(len(hashes), dtype=bool)
        if len(hashes) == 0:
            return keep
        _, first_index = np.unique(hashes, return_index=True)
        keep[first_index] = True
        for _, values in self._chunks.get(partition, ()):
            position = np.searchsorted(values, hashes)
            position[position == len(values)] = len(values) - 1
            keep &= values[position] != hashes
        return keep

    def add(self, partition: int, hashes: np.ndarray, received_at_ms: np.ndarray) -> None:
        if len(hashes) == 0:
            return
        hours = received_at_ms // HOUR_MS
        for hour in np.unique(hours):
            selected = np.ascontiguousarray(hashes[hours == hour], dtype="<u8")
            name = f"p{partition}-{int(hour)}.u64"
            fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, selected.tobytes())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._lengths[name] = self._lengths.get(name, 0) + selected.nbytes
            chunks = self._chunks.setdefault(partition, [])
            chunks.append((int(hour), np.sort(selected)))
            while len(chunks) >= 2 and len(chunks[-2][1]) <= 2 * len(chunks[-1][1]):
                newer_hour, newer = chunks.pop()
                older_hour, older = chunks.pop()
                merged = np.concatenate([older, newer])
                merged.sort()
                chunks.append((max(older_hour, newer_hour), merged))

    def expire(self, now_ms: int) -> None:
        cutoff = now_ms // HOUR_MS - self.horizon_hours
        for partition, chunks in self._chunks.items():
            self._chunks[partition] = [c for c in chunks if c[0] >= cutoff]

    def memory_bytes(self) -> int:
        return sum(v.nbytes for chunks in self._chunks.values() for _, v in chunks)


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(variant: str, args: argparse.Namespace) -> dict[str, object]:
    from strata.loader.dedup import DedupIndex

    traffic = Traffic(args.rate, args.partitions, args.late)
    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if variant == "new":
            index: DedupIndex | OldDedupIndex = DedupIndex(
                Path(tmp), 86_400_000, hot_window_ms=args.hot_window * 1000)
        else:
            index = OldDedupIndex(Path(tmp), 86_400_000)
        # Warm numpy's code paths before the baseline RSS.
        warm = np.arange(1000, dtype=np.int64)
        np.unique(_mix(warm, 0)), np.sort(_mix(warm, 1))
        rss_start = rss_kib()
        cpu = 0.0
        ops = 0
        retries = recognised = false_duplicates = 0
        samples: list[tuple[int, float]] = []
        seconds = int(args.minutes * 60)
        for second in range(seconds):
            seq = np.arange(second * args.rate, (second + 1) * args.rate, dtype=np.int64)
            n_retries = int(args.rate * args.retries) if second else 0
            max_back = min(args.max_delay, second) * args.rate
            back = rng.integers(1, max_back + 1, size=n_retries) if n_retries else np.zeros(0)
            originals = second * args.rate - back.astype(np.int64)
            hashes = np.concatenate([_mix(seq, 2), _mix(originals, 2)])
            event_ms = np.concatenate([
                traffic.event_time(seq),
                traffic.event_time(originals) + rng.integers(-2000, 2001, size=n_retries),
            ])
            now = int(traffic.received(seq[-1:])[0])
            received = np.concatenate([traffic.received(seq), np.full(n_retries, now)])
            partition = np.concatenate([traffic.partition(seq), traffic.partition(originals)])
            is_retry = np.r_[np.zeros(len(seq), bool), np.ones(n_retries, bool)]
            for p in range(args.partitions):
                mine = np.flatnonzero(partition == p)
                h, e, r = hashes[mine], event_ms[mine], received[mine]
                started = time.process_time()
                if isinstance(index, DedupIndex):
                    keep = index.first_unseen(p, h, e)
                    index.add(p, h[keep], e[keep], r[keep])
                else:
                    keep = index.first_unseen(p, h)
                    index.add(p, h[keep], r[keep])
                cpu += time.process_time() - started
                ops += 2 * len(h)
                retry = is_retry[mine]
                retries += int(retry.sum())
                recognised += int((retry & ~keep).sum())
                false_duplicates += int((~retry & ~keep).sum())
            started = time.process_time()
            index.expire(int(T0 + (second + 1) * 1000))
            cpu += time.process_time() - started
            if (second + 1) % 60 == 0:
                samples.append((second + 1, (rss_kib() - rss_start) / 1024))
        return {
            "variant": variant,
            "ops_per_cpu_s": ops / cpu,
            "cpu_s": cpu,
            "rss_growth_mib": (rss_kib() - rss_start) / 1024,
            "peak_growth_mib": (rss_kib("VmHWM") - rss_start) / 1024,
            "index_mib": index.memory_bytes() / 2**20,
            "retries": retries,
            "recognised": recognised,
            "false_duplicates": false_duplicates,
            "samples": samples,
            "disk_mib": sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20,
        }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, object]]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dedup")
    parser.add_argument("--minutes", type=float, default=30.0, help="simulated minutes")
    parser.add_argument("--rate", type=int, default=50_000, help="events/s")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--late", type=float, default=0.005, help="fraction 1-30 min late")
    parser.add_argument("--retries", type=float, default=0.01, help="fraction of retries")
    parser.add_argument("--max-delay", type=int, default=7200, help="longest retry delay, s")
    parser.add_argument("--hot-window", type=int, default=300, help="loader.dedup_hot_window, s")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the index files go (a tmp dir)")
    parser.add_argument("--child", choices=["new", "old"], help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return {}
    passthrough = [
        "--minutes", str(args.minutes), "--rate", str(args.rate),
        "--partitions", str(args.partitions), "--late", str(args.late),
        "--retries", str(args.retries), "--max-delay", str(args.max_delay),
        "--hot-window", str(args.hot_window),
    ] + (["--dir", args.dir] if args.dir else [])
    results: dict[str, list[dict[str, object]]] = {"new": [], "old": []}
    loads = []
    for run in range(args.runs):
        for variant in ("new", "old"):
            before = loadavg()
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.dedup", "--child", variant, *passthrough],
                capture_output=True, text=True, check=True).stdout
            loads.append(f"{variant}: {before} / {loadavg()}")
            result = json.loads(out.strip().splitlines()[-1])
            results[variant].append(result)
            print(f"run {run + 1} {variant}: " + ", ".join(
                f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in result.items() if k != "samples"), flush=True)

    def column(variant: str, key: str) -> list[float]:
        return [float(r[key]) for r in results[variant]]  # type: ignore[arg-type]

    def curve(variant: str) -> str:
        samples = results[variant][0]["samples"]
        assert isinstance(samples, list)
        step = max(1, len(samples) // 6)
        return ", ".join(f"{s // 60} min {mib:,.0f}" for s, mib in samples[step - 1::step])

    new_ok = all(r["recognised"] == r["retries"] for r in results["new"])
    speed_ratio = [a / b for a, b in zip(column("new", "ops_per_cpu_s"),
                                         column("old", "ops_per_cpu_s"), strict=True)]
    events = int(args.minutes * 60 * args.rate)
    body = f"""
`python -m benchmarks.dedup --minutes {args.minutes:g} --rate {args.rate} --runs {args.runs}`:
{args.minutes:g} simulated minutes of {args.rate:,} events/s ({events:,} events) into one
index (one consumer: the events loader, the processor and the archiver each keep one),
{args.partitions} partitions, event times 0-2 s before arrival, {args.late:.1%} of events
1-30 min late, {args.retries:.0%} client retries of earlier events at a random delay up to
{args.max_delay // 60} min (capped by the simulated time), with the original's client
timestamp ± 2 s. One batch per simulated second: per partition one lookup and one add
(fsynced), then expiry. Each index in its own child process; median of {args.runs} runs
(min–max). Load average (1/5/15 min) before / after each run: {'; '.join(loads)}.

| what | decision 094 index (hot window {args.hot_window // 60} min) | baseline: pre-094 in-memory index |
|---|---|---|
| RSS growth at the end | {fmt(column('new', 'rss_growth_mib'), ' MiB')} | {fmt(column('old', 'rss_growth_mib'), ' MiB')} |
| peak RSS growth | {fmt(column('new', 'peak_growth_mib'), ' MiB')} | {fmt(column('old', 'peak_growth_mib'), ' MiB')} |
| hash arrays held in memory at the end | {fmt(column('new', 'index_mib'), ' MiB', 1)} | {fmt(column('old', 'index_mib'), ' MiB', 1)} |
| RSS growth over time (run 1) | {curve('new')} | {curve('old')} |
| index files on disk at the end | {fmt(column('new', 'disk_mib'), ' MiB')} | {fmt(column('old', 'disk_mib'), ' MiB')} |
| lookups + adds per CPU-second of index calls | {fmt(column('new', 'ops_per_cpu_s'))} | {fmt(column('old', 'ops_per_cpu_s'))} |
| new / baseline speed | {fmt(speed_ratio, '', 2)} | |
| retries recognised (run 1) | {results['new'][0]['recognised']:,} of {results['new'][0]['retries']:,} | {results['old'][0]['recognised']:,} of {results['old'][0]['retries']:,} |
| fresh events taken for retries (run 1) | {results['new'][0]['false_duplicates']:,} | {results['old'][0]['false_duplicates']:,} |

Every retry recognised by the decision 094 index in every run: {'yes' if new_ok else 'NO'}.
The baseline keeps every id of the horizon (24 h) in memory, so it grows by
8 B × {args.rate:,}/s = {8 * args.rate * 60 / 2**20:,.0f} MiB per minute until the horizon is
full ({8 * args.rate * 86_400 / 2**30:,.0f} GiB per consumer at 24 h); the 094 index holds the
hot window and ~1/512 of the rest (fences), so its memory stops growing once the hot
window is full.
"""
    print(body)
    if not args.no_write:
        write_section("Retry dedup index", body)
    if not new_ok:
        print("error: the 094 index missed a retry", file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
