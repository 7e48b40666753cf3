"""strata's configuration: one TOML file plus environment overrides.

Every default works with no file at all. The reference is
docs/configuration.md; keep the two in step.

Environment overrides, applied on top of the file:

* ``STRATA_DATA_DIR``: the data directory.
* ``STRATA_WRITE_KEYS`` / ``STRATA_QUERY_TOKENS``: comma-separated keys added
  to ``[auth]``.
* ``STRATA_<SECTION>__<FIELD>=value`` for any scalar field, e.g.
  ``STRATA_LOG__PARTITIONS=16`` or ``STRATA_SERVING__BACKEND=redis``. The
  value is parsed as TOML when it can be (numbers, booleans, quoted strings),
  else taken as a string.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration_ms(value: str | int | float, field: str = "duration") -> int:
    """Parse ``"30s"``, ``"5m"``, ``"7d"``, ``"250ms"`` (or a number of ms)."""
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a duration like '30s', got {value!r}")
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{field}: expected a duration like '30s', got {value!r}")
        return int(value)
    if not isinstance(value, str):
        # JSON bodies and TOML can hand over lists, tables, dates: still a
        # ConfigError (the caller's 4xx), never a TypeError.
        raise ConfigError(f"{field}: expected a duration like '30s', got {value!r}")
    match = _DURATION.match(value)
    if not match:
        raise ConfigError(f"{field}: expected a duration like '30s', '5m' or '7d', got {value!r}")
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)])


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    # Ingest worker processes. 0 means "one per core, at least 1". Each serves
    # the ingest routes itself and forwards the rest to the core process.
    ingest_workers: int = 0
    # glibc malloc of every long-running strata process (strata.allocator,
    # decision 095): allocations at least this big are mapped on their own and
    # returned when freed (0: glibc's sliding default, up to 32 MiB) ...
    malloc_mmap_threshold: int = 2**20
    # ... at most this many malloc arenas (0: glibc's default, 8 per core) ...
    malloc_arena_max: int = 2
    # ... and free pages are handed back this often ("0s": never).
    malloc_trim_interval: str = "10s"
    # Python's collector skips the objects alive after start-up (gc.freeze).
    gc_freeze: bool = True


class IngestConfig(_Section):
    max_body_bytes: int = 5 * 2**20
    max_batch_events: int = 1000
    max_event_bytes: int = 64 * 1024
    # Event time rule (docs/semantics.md): corrected timestamps more than this
    # far in the future are clamped to received_at ...
    max_future_skew: str = "10m"
    # ... and ones older than this are rejected.
    max_event_age: str = "90d"
    # user_ids whose events are spread over this many partitions, salted by
    # event_id, so one viral user does not pin one partition.
    hot_user_ids: list[str] = []
    hot_key_salt_buckets: int = 8


class LogConfig(_Section):
    backend: Literal["embedded", "kafka"] = "embedded"
    partitions: int = 8
    segment_bytes: int = 64 * 2**20
    retention: str = "7d"
    retention_bytes_per_partition: int = 0  # 0: no size limit
    max_bytes: int = 0  # 0: no limit; beyond it ingest answers 503
    fsync: Literal["always", "interval", "never"] = "always"
    fsync_interval_ms: int = 200
    allow_drop_uncommitted: bool = False
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_replication_factor: int = 1
    # How long a silent consumer-group member keeps its partitions: after a
    # crash (kill -9) its partitions move to the others after at most this.
    kafka_session_timeout_ms: int = 6000
    # Extra librdkafka settings for every client, e.g. security.protocol,
    # sasl.mechanism, sasl.username, sasl.password, ssl.ca.location.
    kafka_client_config: dict[str, str] = {}


class StoreConfig(_Section):
    backend: Literal["chdb", "clickhouse"] = "chdb"
    # For backend = "clickhouse": an http(s) URL of the server.
    url: str = ""
    database: str = "strata"
    raw_ttl: str = "90d"
    rollup_5m_ttl: str = "35d"
    # chDB (embedded) only: each of the engine's mark, index-mark and primary
    # index caches holds at most this much (ClickHouse's defaults: 5 GiB each).
    chdb_cache_bytes: int = 256 * 2**20
    # chDB only: the engine's memory limit, max_server_memory_usage (0:
    # ClickHouse's default, 90 % of RAM). Queries over it fail; inserts too.
    chdb_max_memory_bytes: int = 0
    # chDB only: more server settings, passed as engine startup options (they
    # override the two above), e.g. {"uncompressed_cache_size" = "0"}.
    chdb_settings: dict[str, str] = {}


class LoaderConfig(_Section):
    max_batch_events: int = 200_000
    max_wait_ms: int = 250
    dedup_horizon: str = "24h"
    # Event-time slots of the dedup index this close to the newest event time
    # of a partition stay in memory (decision 094).
    dedup_hot_window: str = "5m"


class ProcessorConfig(_Section):
    early_firing_interval: str = "1s"
    idle_partition_timeout: str = "10s"
    max_batch_events: int = 100_000
    # State + offsets are checkpointed at least this often (and at every
    # cycle with final firings); replay after a crash is exact (journal).
    checkpoint_interval: str = "5s"
    # Finished windows stay in memory and in the serving store this long
    # (event time) after their final firing, to absorb late events.
    final_retention: str = "1h"
    # Most (window, dimension values) groups held in memory over all metrics
    # (0: no limit). At the limit, new groups are not kept live; their
    # windows are answered from the rollups once finished (docs/semantics.md).
    max_groups: int = 500_000
    # Partitions of topic "events" this processor owns (empty: all). Several
    # `strata process --partitions ...` split them statically.
    partitions: list[int] = []
    # Run the processor inside `strata serve` (a thread of the core process).
    # Set false when separate `strata process` workers own the partitions.
    embedded: bool = True
    # Consumer-group mode (`strata process --group`, the default on Kafka
    # without --partitions): the directory holding one checkpoint + journal
    # per log partition. Every processor of the group must reach the same
    # directory (a shared volume), because a rebalance moves partitions with
    # their state. Empty: <data_dir>/processor/partitions.
    state_dir: str = ""


class ServingConfig(_Section):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Key prefix in Redis, so several strata deployments can share a server.
    redis_prefix: str = "strata:"


class LakeConfig(_Section):
    # Local path or URI (file://, s3://bucket/prefix). Empty: <data_dir>/lake.
    path: str = ""
    cold_path: str = ""
    hot_retention: str = "90d"
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    roll_bytes: int = 64 * 2**20
    roll_interval: str = "60s"
    # Archiver: records per log poll (a roll happens after a poll, so this
    # also bounds how far a buffer can overshoot roll_bytes).
    poll_events: int = 50_000
    # Nightly batch: recompute day D once D has closed plus the largest
    # allowed lateness plus this margin (time for the archiver to catch up).
    batch_delay: str = "30m"
    # How often `strata serve` applies the retention policy.
    retention_interval: str = "1h"


class UserLimitConfig(_Section):
    # Per-user overrides of the [query] rate limits; 0 keeps the default.
    rate_limit_per_minute: int = 0
    rate_limit_burst: int = 0
    max_concurrent_heavy: int = 0


class QueryConfig(_Section):
    cache_ttl: str = "60s"
    open_range_cache_ttl: str = "2s"
    # Finished days of per-day series (DAU, ...) cached one entry per day;
    # late data and batch recomputes drop them explicitly.
    complete_day_cache_ttl: str = "10m"
    sql_max_execution_s: float = 30.0
    sql_max_rows: int = 100_000
    sql_max_memory_bytes: int = 2 * 2**30
    rate_limit_per_minute: int = 600
    rate_limit_burst: int = 120
    max_concurrent_heavy: int = 2
    # Extra store clients that run heavy (raw-events) queries, so one user's
    # long query does not hold the client that serves rollup reads and the
    # loaders' inserts (decision 103); 0 runs heavy queries on that client.
    heavy_lanes: int = 3
    # Result cache and rate limits: "memory" (one process) or "redis" (shared
    # by every API process). redis_url empty: serving.redis_url.
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = ""
    cache_max_entries: int = 10_000
    # In-memory tier of finalized rollup rows (decision 102): rollup-routed
    # queries over final days are answered in-process; rows held at most.
    rollup_tier: bool = True
    rollup_tier_max_rows: int = 2_000_000
    # [query.user_limits.<user>]: per-user rate limits (docs/query.md).
    user_limits: dict[str, UserLimitConfig] = {}


class AuthConfig(_Section):
    # Plain keys from the config or the environment. Keys created with the CLI
    # or the admin API are stored hashed in <data_dir>/keys.json.
    write_keys: list[str] = []
    query_tokens: list[str] = []  # scopes: metrics, sql
    admin_tokens: list[str] = []  # scopes: metrics, sql, admin


class SchemasConfig(_Section):
    # What ingest does with an event whose event_type has no registered
    # schema, once the registry holds any schema (docs/ingest.md): "accept",
    # "reject" (per-event 4xx reason) or "quarantine" (stored in the
    # quarantine table, replayable with `strata quarantine replay`).
    policy: Literal["accept", "reject", "quarantine"] = "quarantine"
    # Compatibility mode of a new subject: BACKWARD, FORWARD, FULL or NONE.
    default_mode: Literal["BACKWARD", "FORWARD", "FULL", "NONE"] = "BACKWARD"


class DashboardConfig(_Section):
    # How often the page re-reads the live path (metrics API, /v1/status,
    # /metrics); the page's refresh picker starts here.
    refresh_interval: str = "5s"
    # The funnel panel's default steps (editable on the page).
    funnel_steps: list[str] = msgspec.field(
        default_factory=lambda: ["page_view", "signup", "add_to_cart", "purchase"]
    )


class MetricConfig(_Section):
    name: str
    filter: str = ""
    dimensions: list[str] = []
    aggregations: dict[str, str] = {}
    window: str = "5m"
    slide: str = ""
    out_of_orderness: str = "30s"
    allowed_lateness: str = "0s"


def default_metrics() -> list[MetricConfig]:
    """The metrics strata ships with; the seed example comes first."""
    return [
        MetricConfig(
            name="page_views_by_country",
            filter="event_type = 'page_view'",
            dimensions=["country"],
            aggregations={"views": "count()", "users": "uniq(user_id)"},
        ),
        MetricConfig(
            name="events_by_type",
            dimensions=["event_type"],
            aggregations={"events": "count()", "users": "uniq(distinct_id)"},
        ),
        MetricConfig(
            name="active_users",
            aggregations={"users": "uniq(distinct_id)", "events": "count()"},
        ),
        MetricConfig(
            name="revenue_by_country",
            filter="revenue > 0",
            dimensions=["country", "currency"],
            aggregations={
                "revenue": "sum(revenue)",
                "orders": "count()",
                "buyers": "uniq(distinct_id)",
                "avg_order": "avg(revenue)",
            },
        ),
    ]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = "./strata-data"
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    loader: LoaderConfig = msgspec.field(default_factory=LoaderConfig)
    processor: ProcessorConfig = msgspec.field(default_factory=ProcessorConfig)
    serving: ServingConfig = msgspec.field(default_factory=ServingConfig)
    lake: LakeConfig = msgspec.field(default_factory=LakeConfig)
    query: QueryConfig = msgspec.field(default_factory=QueryConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    schemas: SchemasConfig = msgspec.field(default_factory=SchemasConfig)
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)
    metrics: list[MetricConfig] = msgspec.field(default_factory=default_metrics)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    if "STRATA_DATA_DIR" in environ:
        data["data_dir"] = environ["STRATA_DATA_DIR"]
    auth = data.setdefault("auth", {})
    for env_name, field in (
        ("STRATA_WRITE_KEYS", "write_keys"),
        ("STRATA_QUERY_TOKENS", "query_tokens"),
        ("STRATA_ADMIN_TOKENS", "admin_tokens"),
    ):
        extra = [k.strip() for k in environ.get(env_name, "").split(",") if k.strip()]
        if extra:
            auth[field] = list(auth.get(field, [])) + extra
    for name, raw in environ.items():
        if not name.startswith("STRATA_") or "__" not in name:
            continue
        section, _, field = name[len("STRATA_") :].lower().partition("__")
        if section in ("metrics",) or not field:
            continue
        data.setdefault(section, {})[field] = _env_value(raw)


def load_config(
    path: str | Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Load the TOML file at ``path`` (optional), then the environment, then
    ``overrides`` (dotted keys such as ``"log.partitions"``). Raises
    ``ConfigError`` naming the field on any invalid value."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    _apply_env(data, dict(os.environ if environ is None else environ))
    for dotted, value in (overrides or {}).items():
        target = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    validate_config(config)
    return config


def validate_config(config: Config) -> None:
    """Checks that msgspec's types cannot express."""
    checks = [
        ("log.partitions", config.log.partitions >= 1),
        ("server.port", 0 <= config.server.port <= 65535),
        ("ingest.max_batch_events", config.ingest.max_batch_events >= 1),
        ("ingest.max_body_bytes", config.ingest.max_body_bytes >= 1024),
        ("ingest.hot_key_salt_buckets", config.ingest.hot_key_salt_buckets >= 1),
        ("loader.max_batch_events", config.loader.max_batch_events >= 1),
        ("processor.max_groups", config.processor.max_groups >= 0),
        ("server.malloc_mmap_threshold", config.server.malloc_mmap_threshold >= 0),
        ("server.malloc_arena_max", config.server.malloc_arena_max >= 0),
        ("store.chdb_cache_bytes", config.store.chdb_cache_bytes >= 0),
        ("store.chdb_max_memory_bytes", config.store.chdb_max_memory_bytes >= 0),
        ("query.rate_limit_per_minute", config.query.rate_limit_per_minute >= 1),
        ("query.rate_limit_burst", config.query.rate_limit_burst >= 1),
        ("query.max_concurrent_heavy", config.query.max_concurrent_heavy >= 1),
        ("query.heavy_lanes", 0 <= config.query.heavy_lanes <= 64),
    ]
    for field, ok in checks:
        if not ok:
            raise ConfigError(f"{field}: value out of range")
    for field, value in (
        ("ingest.max_future_skew", config.ingest.max_future_skew),
        ("ingest.max_event_age", config.ingest.max_event_age),
        ("log.retention", config.log.retention),
        ("store.raw_ttl", config.store.raw_ttl),
        ("store.rollup_5m_ttl", config.store.rollup_5m_ttl),
        ("loader.dedup_horizon", config.loader.dedup_horizon),
        ("loader.dedup_hot_window", config.loader.dedup_hot_window),
        ("query.cache_ttl", config.query.cache_ttl),
        ("query.open_range_cache_ttl", config.query.open_range_cache_ttl),
        ("query.complete_day_cache_ttl", config.query.complete_day_cache_ttl),
        ("lake.hot_retention", config.lake.hot_retention),
        ("lake.roll_interval", config.lake.roll_interval),
        ("lake.batch_delay", config.lake.batch_delay),
        ("lake.retention_interval", config.lake.retention_interval),
        ("processor.early_firing_interval", config.processor.early_firing_interval),
        ("processor.idle_partition_timeout", config.processor.idle_partition_timeout),
        ("processor.checkpoint_interval", config.processor.checkpoint_interval),
        ("processor.final_retention", config.processor.final_retention),
        ("dashboard.refresh_interval", config.dashboard.refresh_interval),
        ("server.malloc_trim_interval", config.server.malloc_trim_interval),
    ):
        parse_duration_ms(value, field)
    if parse_duration_ms(config.loader.dedup_horizon) < 86_400_000:
        raise ConfigError("loader.dedup_horizon: must be at least 24h (DESIGN.md)")
    names = [m.name for m in config.metrics]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"metrics: duplicate metric name(s) {sorted(duplicates)}")
    # Metric definitions are compiled (and so fully checked) by strata.metrics.
    from strata.metrics import compile_metrics

    compile_metrics(config.metrics)
