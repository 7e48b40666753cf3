"""Ingest throughput with a schema registered for every event type versus
no schemas, in the same run: end to end through `strata serve` (wrk) and the
in-process validation path alone (normalize + validate a batch).

    python -m benchmarks.schemas [--seconds 8] [--runs 3] [--workers 2]

Target (issue 8): with schemas, no more than 25 % slower.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import fmt, write_section
from benchmarks.ingest import TOKEN, Server, make_body, run_wrk

# One schema per event type the traffic model sends (strata.generate).
SCHEMAS: dict[str, dict[str, Any]] = {
    "page_view": {"type": "object", "properties": {"title": {"type": "string"}}},
    "signup": {
        "type": "object",
        "properties": {"plan": {"type": "string", "enum": ["free", "pro", "team"]}},
        "required": ["plan"],
    },
    "add_to_cart": {
        "type": "object",
        "properties": {"sku": {"type": "string", "pattern": "^sku-[0-9]+$"}},
        "required": ["sku"],
    },
    "purchase": {
        "type": "object",
        "properties": {"items": {"type": "integer", "minimum": 1, "maximum": 100}},
        "required": ["items"],
    },
}


def register_all(url: str) -> None:
    for event_type, schema in SCHEMAS.items():
        response = httpx.post(f"{url}/v1/schemas/{event_type}", json={"schema": schema},
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        response.raise_for_status()
    time.sleep(1.5)  # every worker re-reads the registry within 0.5 s


def in_process(body: bytes, seconds: float, with_schemas: bool, directory: Path) -> float:
    """Events/s of ``IngestService.check_schemas`` after the normalizer, on
    decoded batches: the CPU cost that validation adds, without HTTP/log."""
    import msgspec

    from strata.config import load_config
    from strata.ingest.app import IngestService
    from strata.schemas import SchemaRegistry

    config = load_config(overrides={"data_dir": str(directory)}, environ={})
    registry = SchemaRegistry(directory / "schemas")
    if with_schemas:
        for event_type, schema in SCHEMAS.items():
            registry.register(event_type, schema)
    service = IngestService.__new__(IngestService)  # no committer: nothing is appended
    service.config, service.registry, service.policy = config, registry, "quarantine"
    service.normalizer = IngestService(config, None, None, registry=registry).normalizer  # type: ignore[arg-type]
    raw = msgspec.json.decode(body, type=dict[str, list[msgspec.Raw]])["batch"]
    events = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        accepted, rejected = service.normalizer.normalize(raw, sent_at_ms=None,
                                                          received_at_ms=int(time.time() * 1000))
        kept, quarantined, refused = service.check_schemas(raw, accepted, rejected,
                                                           list(range(len(raw))))
        assert not refused and not quarantined and len(kept) == len(raw)
        events += len(raw)
    return events / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(prog="benchmarks.schemas")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpu-seconds", type=float, default=3.0,
                        help="seconds of each in-process (CPU-only) measurement")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks.schemas: wrk is required (apt-get install wrk)")
    body = make_body(args.batch)
    results: dict[str, list[float]] = {"none": [], "schemas": [], "cpu_none": [], "cpu_schemas": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        body_path = tmp_path / "body.json"
        body_path.write_bytes(body)
        for run in range(args.runs):
            # Interleaved, fresh server each time, so drift hits both sides alike.
            for key in ("none", "schemas"):
                server = Server(tmp_path / f"{key}-{run}" / "data", args.workers)
                try:
                    if key == "schemas":
                        register_all(server.url)
                    rate, errors = run_wrk(server.url, body_path, args.seconds, args.connections)
                    if errors:
                        print(f"warning: {errors} non-2xx responses", file=sys.stderr)
                    results[key].append(rate * args.batch)
                finally:
                    server.stop()
            in_process(body, min(0.5, args.cpu_seconds), True, tmp_path / f"warmup-{run}")
            for key, flag in (("cpu_none", False), ("cpu_schemas", True)):
                results[key].append(in_process(body, args.cpu_seconds, flag, tmp_path / f"{key}-{run}"))
    slowdown = 1 - statistics.median(results["schemas"]) / statistics.median(results["none"])
    cpu_slowdown = 1 - statistics.median(results["cpu_schemas"]) / statistics.median(results["cpu_none"])
    lines = [
        "| what | no schemas, events/s | schema for every event type, events/s | slower by |",
        "|---|---|---|---|",
        f"| `strata serve`, {args.workers} ingest workers, acknowledged (durable) "
        f"| {fmt(results['none'])} | {fmt(results['schemas'])} | {slowdown:.1%} |",
        f"| in-process: normalize + validate only (no HTTP, no log) "
        f"| {fmt(results['cpu_none'])} | {fmt(results['cpu_schemas'])} | {cpu_slowdown:.1%} |",
    ]
    text = (
        f"Load: wrk (1 thread, {args.connections} connections) posting {args.batch}-event batches "
        f"of the traffic model (page_view, signup, add_to_cart, purchase) for {args.seconds:.0f} s "
        f"per run, {args.runs} interleaved runs, a fresh server each; schemas as in "
        "`benchmarks/schemas.py` (enum, pattern, bounds, required). Target: at most 25 % slower "
        f"with schemas — {'met' if slowdown <= 0.25 else 'NOT met'}. The in-process row "
        "isolates the CPU cost of validation (normalize alone vs normalize + validate).\n\n"
        + "\n".join(lines)
    )
    print(text)
    if not args.no_write:
        write_section("Schema validation at ingest", text)
    return results


if __name__ == "__main__":
    main()
