"""DDL rendering: the `.sql` files in this folder, filled with the values
they cannot bind (TTL lengths from the config, per-metric rollup columns).

Only values from the validated config and compiled metric definitions are
substituted; nothing from a request ever reaches DDL.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

from strata.metrics import Metric

GRANULARITIES = {
    # name: (bucket expression over ts, partition key, seconds per bucket)
    "5m": ("toDateTime(toStartOfFiveMinutes(ts), 'UTC')", "toYYYYMMDD(window_start)", 300),
    # Daily rollups are partitioned by month: a year is 12 parts, not 365
    # (a DAU query over a year opened one part per day; decision 080). The
    # batch job rebuilds the month in staging to replace one day.
    "1d": ("toDateTime(toStartOfDay(ts), 'UTC')", "toYYYYMM(window_start)", 86_400),
}


def sql_file(name: str) -> str:
    return resources.files("strata.store").joinpath("sql", name).read_text()


def named_statements(name: str) -> dict[str, str]:
    """The statements of a ``-- name: <key>`` sectioned .sql file (for
    example lake_batch.sql, loader_repair.sql), comments dropped."""
    out: dict[str, str] = {}
    for chunk in re.split(r"^-- name: ", sql_file(name), flags=re.M)[1:]:
        key, _, body = chunk.partition("\n")
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        out[key.strip()] = "\n".join(lines).strip().rstrip(";")
    return out


def statements(text: str) -> Iterator[str]:
    """Split a .sql file into statements; comments and blank lines dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    for statement in "\n".join(lines).split(";"):
        if statement.strip():
            yield statement.strip()


def base_statements(*, raw_ttl_seconds: int) -> list[str]:
    """The static tables, in file order (001_*.sql, 002_*.sql, ...)."""
    out: list[str] = []
    names = sorted(
        entry.name
        for entry in resources.files("strata.store").joinpath("sql").iterdir()
        if entry.name[:3].isdigit() and entry.name.endswith(".sql")
    )
    for name in names:
        text = sql_file(name).replace("{raw_ttl_seconds}", str(int(raw_ttl_seconds)))
        out.extend(statements(text))
    return out


def rollup_statements(
    metric: Metric, granularity: str, *, rollup_5m_ttl_seconds: int
) -> list[str]:
    bucket, partition_by, _ = GRANULARITIES[granularity]
    table = metric.rollup_table(granularity)
    ttl = (
        f"TTL window_start + INTERVAL {int(rollup_5m_ttl_seconds)} SECOND"
        if granularity == "5m"
        else ""
    )
    text = sql_file("rollup.sql").format(
        table=table,
        view=f"mv_{metric.name}_{granularity}",
        dimension_columns="".join(f"{d} LowCardinality(String),\n    " for d in metric.dimensions),
        state_columns=",\n    ".join(f"{a.alias} {a.state_type}" for a in metric.aggregations),
        partition_by=partition_by,
        dimension_keys="".join(f", {d}" for d in metric.dimensions),
        ttl=ttl,
        bucket=bucket,
        dimension_selects="".join(f"events.{d} AS {d},\n    " for d in metric.dimensions),
        state_selects=",\n    ".join(
            f"{a.state_expression} AS {a.alias}" for a in metric.aggregations
        ),
        filter=metric.qualified_filter_sql("events"),
    )
    return list(statements(text))


def all_statements(
    metrics: Sequence[Metric], *, raw_ttl_seconds: int, rollup_5m_ttl_seconds: int
) -> list[str]:
    out = base_statements(raw_ttl_seconds=raw_ttl_seconds)
    for metric in metrics:
        for granularity in GRANULARITIES:
            out.extend(
                rollup_statements(
                    metric, granularity, rollup_5m_ttl_seconds=rollup_5m_ttl_seconds
                )
            )
    return out


def render_rollup_sql(template: str, metric: Metric, granularity: str, **extra: Any) -> str:
    """Fill a statement template with a metric's rollup pieces for
    ``granularity``: the materialized view's bucket, dimension and state
    expressions and filter (as rollup.sql), plus ``{table}`` / ``{stage}``
    (``lake_stage_<metric>_<granularity>``). Shared by the batch job and the
    loader's rollup rebuild (decision 093)."""
    bucket, _, _ = GRANULARITIES[granularity]
    table = metric.rollup_table(granularity)
    keys = "".join(f", {d}" for d in metric.dimensions)
    merges_aliased = ", ".join(
        f"{a.merge_expression(a.alias)} AS {a.alias}" for a in metric.aggregations
    )
    differs = " OR ".join(
        f"abs(toFloat64(streaming.{a.alias}) - toFloat64(batch.{a.alias})) > "
        f"1e-9 * greatest(abs(toFloat64(streaming.{a.alias})), abs(toFloat64(batch.{a.alias})), 1)"
        for a in metric.aggregations
    )
    return template.format(
        table=table,
        stage=f"lake_stage_{metric.name}_{granularity}",
        bucket=bucket,
        dimension_selects="".join(f"events.{d} AS {d},\n    " for d in metric.dimensions),
        state_selects=",\n    ".join(
            f"{a.state_expression} AS {a.alias}" for a in metric.aggregations
        ),
        dimension_keys=keys,
        filter=metric.qualified_filter_sql("events"),
        merges=", ".join(a.merge_expression(a.alias) for a in metric.aggregations),
        merges_aliased=merges_aliased,
        differs=differs,
        window_ms=int(metric.window_ms),
        lateness_ms=int(metric.out_of_orderness_ms + metric.allowed_lateness_ms),
        **extra,
    )
