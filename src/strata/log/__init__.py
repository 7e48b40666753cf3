"""The log: see ``strata.log.base`` for the contract.

``open_log(config)`` is the one place that picks a backend.
"""

from __future__ import annotations

from strata.config import Config, parse_duration_ms
from strata.log.base import (
    Consumer,
    Log,
    LogError,
    LogFull,
    OffsetOutOfRange,
    Producer,
    Record,
    RecordBatch,
    RetentionReport,
)

TOPICS = ("events", "window_results", "late", "quarantine", "identities")

__all__ = [
    "TOPICS",
    "Consumer",
    "Log",
    "LogError",
    "LogFull",
    "OffsetOutOfRange",
    "Producer",
    "Record",
    "RecordBatch",
    "RetentionReport",
    "open_log",
]


def open_log(config: Config, *, create_topics: bool = True) -> Log:
    settings = config.log
    log: Log
    if settings.backend == "embedded":
        from strata.log.embedded import EmbeddedLog

        log = EmbeddedLog(
            config.data_path / "log",
            segment_bytes=settings.segment_bytes,
            retention_ms=parse_duration_ms(settings.retention),
            retention_bytes=settings.retention_bytes_per_partition or None,
            fsync=settings.fsync,
            fsync_interval_ms=settings.fsync_interval_ms,
            max_bytes=settings.max_bytes or None,
            allow_drop_uncommitted=settings.allow_drop_uncommitted,
        )
    elif settings.backend == "kafka":
        from strata.log.kafka import KafkaLog

        log = KafkaLog(
            settings.kafka_bootstrap_servers,
            replication_factor=settings.kafka_replication_factor,
            # New topics get the log's retention as their retention.ms.
            retention_ms=parse_duration_ms(settings.retention),
            session_timeout_ms=settings.kafka_session_timeout_ms,
            client_config=dict(settings.kafka_client_config),
        )
    else:  # guarded by the config's Literal type
        raise ValueError(f"log.backend: unknown backend {settings.backend!r}")
    if create_topics:
        for topic in TOPICS:
            log.create_topic(topic, settings.partitions)
    return log
