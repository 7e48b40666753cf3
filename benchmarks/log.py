"""Log throughput: produce (durably flushed) and consume records/s through the
Log interface, for the embedded log and for the Kafka backend against a tansu
broker on loopback, measured in the same run.

    python -m benchmarks.log [--records 200000] [--runs 3] [--flush-every 5000]

Records are real normalized events (about 400 bytes of JSON) spread over 8
partitions by ``strata.events.partition_for``; a flush every ``--flush-every``
records stands in for the ingest group commit. Consume reads everything back
with ``poll_batches`` from a static assignment of all partitions. Results go
to the "Log" section of docs/benchmarks.md.

tansu stores in memory here (``memory://``); a real Kafka cluster writes to
disk on several brokers with replication, so the Kafka figures measure the
client path (confluent-kafka/librdkafka plus strata's adapter) and a simple
broker, not a production cluster.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from benchmarks.common import ROOT, fmt, write_section
from strata.events import Normalizer
from strata.generate import TrafficModel
from strata.log.base import Log

PARTITIONS = 8


def make_records(count: int) -> list[tuple[int, bytes]]:
    import msgspec

    model = TrafficModel(seed=3)
    raw = [msgspec.json.encode(e) for e in model.batch(min(count, 20_000))]
    normalizer = Normalizer(
        partitions=PARTITIONS, max_future_skew_ms=600_000, max_event_age_ms=90 * 86_400_000
    )
    accepted, _ = normalizer.normalize(raw, sent_at_ms=None, received_at_ms=int(time.time() * 1000))
    base = [(partition, value) for partition, value, _ in accepted]
    return [base[i % len(base)] for i in range(count)]


def measure(log: Log, records: list[tuple[int, bytes]], flush_every: int) -> tuple[float, float]:
    """(produce records/s, consume records/s) on a fresh topic."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    log.create_topic(topic, PARTITIONS)
    producer = log.producer()
    started = time.perf_counter()
    for start in range(0, len(records), flush_every):
        for partition, value in records[start : start + flush_every]:
            producer.produce(topic, partition, None, value)
        producer.flush()
    produce_s = time.perf_counter() - started
    producer.close()

    consumer = log.consumer(f"bench-{uuid.uuid4().hex[:8]}", topic)
    consumer.assign(list(range(PARTITIONS)))
    read = 0
    started = time.perf_counter()
    deadline = time.monotonic() + 600
    while read < len(records):
        if time.monotonic() > deadline:
            raise RuntimeError(f"consumed only {read} of {len(records)} records")
        read += sum(len(b.values) for b in consumer.poll_batches(10_000, timeout_s=0.5))
    consume_s = time.perf_counter() - started
    consumer.close()
    return len(records) / produce_s, len(records) / consume_s


@contextmanager
def embedded(fsync: str, segment_bytes: int = 64 * 2**20) -> Iterator[Log]:
    from strata.log.embedded import EmbeddedLog

    directory = Path(tempfile.mkdtemp(prefix="bench-log-"))
    log = EmbeddedLog(directory, fsync=fsync, segment_bytes=segment_bytes)  # type: ignore[arg-type]
    try:
        yield log
    finally:
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def kafka() -> Iterator[Log]:
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_kafka import running_broker
    from strata.log.kafka import KafkaLog

    with running_broker() as bootstrap:
        log = KafkaLog(bootstrap)
        try:
            yield log
        finally:
            log.close()


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.log")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--flush-every", type=int, default=5_000)
    parser.add_argument("--embedded-only", action="store_true",
                        help="skip the Kafka backend (no tansu broker; smoke test)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--segment-bytes", type=int, default=64 * 2**20,
                        help="embedded log.segment_bytes (small values roll and seal often)")
    args = parser.parse_args(argv)
    records = make_records(args.records)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    mean_bytes = sum(len(v) for _, v in records) / len(records)
    backends: dict[str, Callable[[], AbstractContextManager[Log]]] = {
        "embedded, fsync=always": lambda: embedded("always", args.segment_bytes),
        "embedded, fsync=never": lambda: embedded("never", args.segment_bytes),
        "kafka (confluent-kafka -> tansu 0.6.0, memory storage)": kafka,
    }
    if args.embedded_only:
        backends = {k: v for k, v in backends.items() if k.startswith("embedded")}
    results: dict[str, dict[str, list[float]]] = {}
    for name, opener in backends.items():
        produce: list[float] = []
        consume: list[float] = []
        with opener() as log:
            for _ in range(args.runs):
                p, c = measure(log, records, args.flush_every)
                produce.append(p)
                consume.append(c)
        results[name] = {"produce": produce, "consume": consume}
        print(f"{name}: produce {fmt(produce, '/s')}, consume {fmt(consume, '/s')}", flush=True)

    load_after = Path("/proc/loadavg").read_text().split()[:3]
    rows = "\n".join(
        f"| {name} | {fmt(r['produce'])} | {fmt([v * mean_bytes / 2**20 for v in r['produce']], '', 1)}"
        f" | {fmt(r['consume'])} |"
        for name, r in results.items()
    )
    body = f"""
`python -m benchmarks.log --records {args.records} --runs {args.runs} --flush-every {args.flush_every}`:
records/s through the `Log` interface, median of {args.runs} runs (min–max), {args.records:,}
normalized events of {mean_bytes:.0f} bytes on average over {PARTITIONS} partitions, one
producer flush (durable acknowledgement) every {args.flush_every:,} records, one consumer
reading all partitions with `poll_batches`. One process, one thread per side.
Embedded `log.segment_bytes` = {args.segment_bytes:,}. Load average (1/5/15 min) before:
{" ".join(load_before)}, after: {" ".join(load_after)} (other jobs share the machine; fsync
figures depend on what else writes to the disk).

| backend | produce records/s | produce MiB/s | consume records/s |
|---|---|---|---|
{rows}

The Kafka row runs the real client path (librdkafka, `acks=all`, idempotent producer,
explicit partitions) against tansu with in-memory storage on loopback. It is not a
production Kafka cluster (replicated, on disk); see docs/deploy.md for how these
per-core figures are used for sizing and which Kafka features could not be tested here.
"""
    if not args.no_write:
        write_section("Log", body)
    return results


if __name__ == "__main__":
    main()
