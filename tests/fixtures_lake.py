"""Helpers for the lake, batch, retention and delete-user tests: real embedded
logs, real chDB stores in tmp dirs, a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from strata.config import Config, load_config
from strata.events import EventRecord, partition_for

DAY_MS = 86_400_000
COUNTRIES = ["DE", "FR", "US", "BR", "JP"]
TYPES = ["page_view", "click", "purchase", "signup"]
_encoder = msgspec.json.Encoder()


def day_start_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def make_events(
    count: int,
    *,
    start_ms: int,
    span_ms: int = DAY_MS,
    users: int = 50,
    seed: int = 1,
    prefix: str = "e",
    received_delay_ms: int = 1000,
    received_at_ms: int | None = None,
) -> list[EventRecord]:
    """Deterministic events with event time in [start_ms, start_ms + span_ms),
    received ``received_delay_ms`` later (or all at ``received_at_ms``)."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        ts = start_ms + rng.randrange(span_ms)
        event_type = rng.choice(TYPES)
        user = f"u{rng.randrange(users)}"
        anonymous = rng.random() < 0.2
        out.append(
            EventRecord(
                event_id=f"{prefix}{seed}-{index}",
                event_type=event_type,
                user_id="" if anonymous else user,
                anonymous_id=f"a-{user}" if anonymous else "",
                distinct_id=f"a-{user}" if anonymous else user,
                session_id=f"s{rng.randrange(100)}",
                ts=ts,
                received_at=received_at_ms if received_at_ms is not None else ts + received_delay_ms,
                country=rng.choice(COUNTRIES),
                platform="web",
                os="linux",
                app_version="1.0",
                path=f"/p/{rng.randrange(20)}",
                referrer="",
                revenue=round(rng.uniform(1, 100), 2) if event_type == "purchase" else 0.0,
                currency="EUR" if event_type == "purchase" else "",
                properties='{"k": 1}',
            )
        )
    return out


def produce(log: Any, events: list[EventRecord], partitions: int) -> None:
    """Append ``events`` to topic ``events`` the way ingest does."""
    producer = log.producer()
    for event in events:
        partition = partition_for(event.distinct_id, event.event_id, partitions)
        producer.produce("events", partition, None, _encoder.encode(event))
    producer.flush()
    producer.close()


def config_for(tmp: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {"data_dir": str(tmp), "log.partitions": 4, "log.fsync": "never"}
    values.update(overrides)
    return load_config(overrides=values, environ={})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def moto_s3() -> Iterator[str]:
    """A real S3-protocol server on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def create_bucket(endpoint: str, bucket: str) -> None:
    import pyarrow.fs as pafs

    host = endpoint.split("://", 1)[1]
    filesystem = pafs.S3FileSystem(
        endpoint_override=host, scheme="http", access_key="testing", secret_key="testing",
        region="us-east-1", allow_bucket_creation=True,
    )
    filesystem.create_dir(bucket)


def today_minus(days: int) -> str:
    """ISO date ``days`` before today (UTC): tests stay inside the 5-minute
    rollup and raw retention windows whatever the date."""
    from datetime import timedelta

    return (datetime.now(UTC).date() - timedelta(days=days)).isoformat()


class LakeEnv:
    """A real embedded log, chDB store, loader, archiver and batch job in one
    data directory (what the core process of `strata serve` runs)."""

    def __init__(self, tmp: Path, **overrides: Any) -> None:
        from strata.config import parse_duration_ms
        from strata.lake.archiver import Archiver
        from strata.lake.base import Lake
        from strata.lake.batch import BatchJob
        from strata.loader.loader import Loader
        from strata.loader.sinks import EVENTS_SINK
        from strata.log import open_log
        from strata.masking import DeletedUsers
        from strata.store import Store

        self.config = config_for(tmp, **overrides)
        self.log = open_log(self.config)
        self.store = Store.open(self.config)
        self.lake = Lake.open(self.config)
        self.deleted_users = DeletedUsers(self.config.data_path)
        self.loader = Loader(
            self.log, self.store, EVENTS_SINK, self.config.data_path / "loader" / "events",
            dedup_horizon_ms=parse_duration_ms(self.config.loader.dedup_horizon),
        )
        self.archiver = Archiver.from_config(self.config, self.log, self.lake)
        self.job = BatchJob(
            self.config, self.store, self.lake, deleted_users=self.deleted_users, log_=self.log
        )

    def produce(self, events: list[EventRecord]) -> None:
        produce(self.log, events, self.config.log.partitions)

    def load(self) -> None:
        while self.loader.run_once(timeout_s=0.05):
            pass

    def archive(self) -> None:
        self.archiver.drain()

    def rollup(self, metric: str, granularity: str) -> list[tuple[Any, ...]]:
        """Finalized rollup rows, every window and dimension, sorted."""
        m = self.store.metrics_by_name[metric]
        keys = ", ".join(("window_start",) + m.dimensions)
        merges = ", ".join(a.merge_expression(a.alias) for a in m.aggregations)
        _, rows = self.store.query_rows(
            f"SELECT {keys}, {merges} FROM {m.rollup_table(granularity)} "
            f"GROUP BY {keys} ORDER BY {keys}"
        )
        return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]

    def all_rollups(self) -> dict[str, list[tuple[Any, ...]]]:
        return {
            f"{m.name}_{g}": self.rollup(m.name, g)
            for m in self.store.metrics
            for g in ("5m", "1d")
        }

    def close(self) -> None:
        self.archiver.close()
        self.loader.close()
        self.store.close()
        self.log.close()
