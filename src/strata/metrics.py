"""Metric definitions: parsed once from the config, used everywhere.

One definition drives three things, so they can never disagree:

* the stream processor's event-time windows (strata.processor),
* the rollup tables and their materialized views (strata.store.ddl),
* the metrics API and the SQL router (strata.query).

A filter is a SQL boolean expression over event columns, parsed by sqlglot
and restricted to comparisons, IN, LIKE, IS NULL and AND/OR/NOT. It is never
evaluated with ``eval``. An aggregation is one of count(), sum(col),
min(col), max(col), avg(col) or uniq(col); uniq is a mergeable distinct count
(ClickHouse uniqCombined: exact up to a few thousand values, then about
0.5-1 % relative error; see docs/semantics.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlglot
from sqlglot import exp

from strata.config import ConfigError, parse_duration_ms

if TYPE_CHECKING:
    from strata.config import MetricConfig

STRING_COLUMNS = frozenset(
    {
        "event_id",
        "event_type",
        "user_id",
        "anonymous_id",
        "distinct_id",
        "session_id",
        "country",
        "platform",
        "os",
        "app_version",
        "path",
        "referrer",
        "currency",
    }
)
NUMERIC_COLUMNS = frozenset({"revenue"})
COLUMNS = STRING_COLUMNS | NUMERIC_COLUMNS
AGGREGATE_FUNCTIONS = ("count", "sum", "min", "max", "avg", "uniq")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

_ALLOWED_NODES: tuple[type[exp.Expression], ...] = (
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.And,
    exp.Or,
    exp.Not,
    exp.Paren,
    exp.In,
    exp.Is,
    exp.Like,
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Boolean,
    exp.Null,
    exp.Neg,
    exp.Tuple,
)


@dataclass(frozen=True)
class Aggregation:
    alias: str
    function: str  # one of AGGREGATE_FUNCTIONS
    column: str | None  # None for count()

    @property
    def state_type(self) -> str:
        """ClickHouse AggregateFunction type of the rollup state column."""
        return {
            "count": "AggregateFunction(count)",
            "sum": "AggregateFunction(sum, Float64)",
            "min": "AggregateFunction(min, Float64)",
            "max": "AggregateFunction(max, Float64)",
            "avg": "AggregateFunction(avg, Float64)",
            "uniq": "AggregateFunction(uniqCombined, String)",
        }[self.function]

    @property
    def state_expression(self) -> str:
        """SELECT expression producing the state from raw events."""
        if self.function == "count":
            return "countState()"
        # Columns are qualified: an alias such as `revenue` must not shadow
        # the raw column of the same name inside the view's SELECT.
        if self.function == "uniq":
            return f"uniqCombinedState(events.{self.column})"
        return f"{self.function}State(toFloat64(events.{self.column}))"

    def merge_expression(self, state_column: str) -> str:
        """Expression finalizing merged states of ``state_column``."""
        name = "uniqCombined" if self.function == "uniq" else self.function
        return f"{name}Merge({state_column})"

    def raw_expression(self) -> str:
        """The same aggregate computed directly on raw events."""
        if self.function == "count":
            return "count()"
        if self.function == "uniq":
            return f"uniqCombined({self.column})"
        return f"{self.function}(toFloat64({self.column}))"


@dataclass(frozen=True)
class Metric:
    name: str
    filter: exp.Expression | None
    dimensions: tuple[str, ...]
    aggregations: tuple[Aggregation, ...]
    window_ms: int
    slide_ms: int
    out_of_orderness_ms: int
    allowed_lateness_ms: int

    @property
    def filter_sql(self) -> str:
        """The filter as ClickHouse SQL ("1" when there is none)."""
        return "1" if self.filter is None else self.filter.sql(dialect="clickhouse")

    def qualified_filter_sql(self, table: str) -> str:
        """The filter with every column qualified by ``table``."""
        if self.filter is None:
            return "1"

        def qualify(node: exp.Expression) -> exp.Expression:
            if isinstance(node, exp.Column) and not node.table:
                return exp.column(node.name, table=table)
            return node

        return self.filter.copy().transform(qualify).sql(dialect="clickhouse")

    def rollup_table(self, granularity: str) -> str:
        return f"rollup_{self.name}_{granularity}"


def _check_filter(metric: str, node: exp.Expression) -> None:
    for sub in node.walk():
        if not isinstance(sub, _ALLOWED_NODES):
            raise ConfigError(
                f"metric {metric!r}: field 'filter': {type(sub).__name__.lower()} "
                "is not allowed (use comparisons, IN, LIKE, IS NULL, AND/OR/NOT)"
            )
        if isinstance(sub, exp.Column):
            if sub.table or sub.name not in COLUMNS:
                raise ConfigError(
                    f"metric {metric!r}: field 'filter': unknown column {sub.sql()!r}; "
                    f"known columns: {', '.join(sorted(COLUMNS))}"
                )


def parse_filter(metric: str, text: str) -> exp.Expression | None:
    if not text.strip():
        return None
    try:
        node = sqlglot.parse_one(text, dialect="clickhouse")
    except sqlglot.errors.ParseError as exc:
        raise ConfigError(f"metric {metric!r}: field 'filter': cannot parse: {exc}") from exc
    _check_filter(metric, node)
    return node


_AGG = re.compile(r"^\s*([a-z]+)\s*\(\s*([a-z_]*)\s*\)\s*$")


def parse_aggregation(metric: str, alias: str, text: str) -> Aggregation:
    where = f"metric {metric!r}: field 'aggregations.{alias}'"
    if not _NAME.match(alias):
        raise ConfigError(f"{where}: alias must match {_NAME.pattern}")
    match = _AGG.match(text)
    if not match or match.group(1) not in AGGREGATE_FUNCTIONS:
        raise ConfigError(
            f"{where}: expected one of count(), sum(col), min(col), max(col), avg(col), "
            f"uniq(col); got {text!r}"
        )
    function, column = match.group(1), match.group(2) or None
    if function == "count":
        if column:
            raise ConfigError(f"{where}: count() takes no column")
        return Aggregation(alias, function, None)
    if column is None or column not in COLUMNS:
        raise ConfigError(f"{where}: unknown column {column!r}")
    if function != "uniq" and column not in NUMERIC_COLUMNS:
        raise ConfigError(f"{where}: {function}() needs a numeric column, got {column!r}")
    return Aggregation(alias, function, column)


def compile_metric(config: MetricConfig) -> Metric:
    name = config.name
    if not _NAME.match(name):
        raise ConfigError(f"metric {name!r}: field 'name': must match {_NAME.pattern}")
    if not config.aggregations:
        raise ConfigError(f"metric {name!r}: field 'aggregations': at least one is required")
    for dimension in config.dimensions:
        if dimension not in STRING_COLUMNS:
            raise ConfigError(
                f"metric {name!r}: field 'dimensions': unknown or non-string column {dimension!r}"
            )
    if len(set(config.dimensions)) != len(config.dimensions):
        raise ConfigError(f"metric {name!r}: field 'dimensions': duplicate dimension")
    aggregations = tuple(
        parse_aggregation(name, alias, text) for alias, text in config.aggregations.items()
    )
    clash = {a.alias for a in aggregations} & (set(config.dimensions) | {"window_start"})
    if clash:
        raise ConfigError(f"metric {name!r}: field 'aggregations': alias clashes with {clash}")
    window_ms = parse_duration_ms(config.window, f"metric {name!r}: field 'window'")
    slide_ms = (
        parse_duration_ms(config.slide, f"metric {name!r}: field 'slide'")
        if config.slide
        else window_ms
    )
    if window_ms < 1000 or window_ms > 86_400_000 or 86_400_000 % window_ms:
        raise ConfigError(
            f"metric {name!r}: field 'window': must divide one day and be at least 1s, "
            f"got {config.window!r}"
        )
    if slide_ms <= 0 or slide_ms > window_ms or window_ms % slide_ms:
        raise ConfigError(f"metric {name!r}: field 'slide': must divide the window")
    return Metric(
        name=name,
        filter=parse_filter(name, config.filter),
        dimensions=tuple(config.dimensions),
        aggregations=aggregations,
        window_ms=window_ms,
        slide_ms=slide_ms,
        out_of_orderness_ms=parse_duration_ms(
            config.out_of_orderness, f"metric {name!r}: field 'out_of_orderness'"
        ),
        allowed_lateness_ms=parse_duration_ms(
            config.allowed_lateness, f"metric {name!r}: field 'allowed_lateness'"
        ),
    )


def compile_metrics(configs: Sequence[MetricConfig]) -> list[Metric]:
    return [compile_metric(c) for c in configs]
