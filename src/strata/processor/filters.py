"""Metric filters evaluated on Arrow tables.

``compile_filter`` turns a metric's restricted sqlglot AST (see
``strata.metrics``: comparisons, IN, LIKE, IS NULL, AND/OR/NOT over event
columns) into a function ``table -> numpy bool mask`` built from
``pyarrow.compute`` kernels. Nothing is ever ``eval``-ed. SQL three-valued
logic is kept (Kleene AND/OR); a row whose filter is NULL is dropped, as in
a WHERE clause.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from strata.metrics import NUMERIC_COLUMNS

Mask = Callable[[pa.Table], np.ndarray]
_Value = Callable[[pa.Table], Any]

_COMPARISONS: dict[type[exp.Expression], Callable[[Any, Any], Any]] = {
    exp.EQ: pc.equal,
    exp.NEQ: pc.not_equal,
    exp.GT: pc.greater,
    exp.GTE: pc.greater_equal,
    exp.LT: pc.less,
    exp.LTE: pc.less_equal,
}


def _literal(node: exp.Expression) -> Any:
    if isinstance(node, exp.Paren):
        return _literal(node.this)
    if isinstance(node, exp.Neg):
        value = _literal(node.this)
        if not isinstance(value, int | float):
            raise ValueError(f"cannot negate {node.this.sql()!r}")
        return -value
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Literal):
        if node.is_string:
            return node.this
        text = node.this
        return float(text) if any(c in text for c in ".eE") else int(text)
    raise ValueError(f"expected a literal, got {node.sql()!r}")


def _value(node: exp.Expression) -> _Value:
    """A column or literal operand."""
    if isinstance(node, exp.Paren):
        return _value(node.this)
    if isinstance(node, exp.Column):
        name = node.name
        return lambda table: table.column(name)
    literal = _literal(node)
    return lambda table: literal


def _coerce(column_node: exp.Expression, literal: Any) -> Any:
    """Literals compared to a numeric column are numbers, to a string column
    strings (ClickHouse would reject a mismatch; we refuse it at start-up)."""
    if isinstance(column_node, exp.Column) and literal is not None:
        numeric = column_node.name in NUMERIC_COLUMNS
        if numeric and not isinstance(literal, int | float):
            raise ValueError(f"{column_node.name} is numeric, got {literal!r}")
        if not numeric and not isinstance(literal, str):
            raise ValueError(f"{column_node.name} is a string column, got {literal!r}")
    return literal


def _predicate(node: exp.Expression) -> _Value:
    if isinstance(node, exp.Paren):
        return _predicate(node.this)
    if isinstance(node, exp.And):
        left, right = _predicate(node.this), _predicate(node.expression)
        return lambda table: pc.and_kleene(left(table), right(table))
    if isinstance(node, exp.Or):
        left, right = _predicate(node.this), _predicate(node.expression)
        return lambda table: pc.or_kleene(left(table), right(table))
    if isinstance(node, exp.Not):
        inner = _predicate(node.this)
        return lambda table: pc.invert(inner(table))
    if isinstance(node, tuple(_COMPARISONS)):
        function = _COMPARISONS[type(node)]
        lhs, rhs = node.this, node.expression
        if not isinstance(lhs, exp.Column) and isinstance(rhs, exp.Column):
            _coerce(rhs, _literal(lhs))
        elif isinstance(lhs, exp.Column) and not isinstance(rhs, exp.Column):
            _coerce(lhs, _literal(rhs))
        left, right = _value(lhs), _value(rhs)
        return lambda table: function(left(table), right(table))
    if isinstance(node, exp.In):
        column = node.this
        if not isinstance(column, exp.Column):
            raise ValueError("IN needs a column on its left")
        values = [_coerce(column, _literal(v)) for v in node.expressions]
        value_set = pa.array(values)
        name = column.name
        return lambda table: pc.is_in(table.column(name), value_set=value_set)
    if isinstance(node, exp.Like):
        column, pattern = node.this, _literal(node.expression)
        if not isinstance(column, exp.Column) or not isinstance(pattern, str):
            raise ValueError("LIKE needs a column and a string pattern")
        name = column.name
        return lambda table: pc.match_like(table.column(name), pattern)
    if isinstance(node, exp.Is):
        column = node.this
        if not isinstance(column, exp.Column) or not isinstance(node.expression, exp.Null):
            raise ValueError("only <column> IS [NOT] NULL is supported")
        name = column.name
        return lambda table: pc.is_null(table.column(name))
    if isinstance(node, exp.Boolean):
        constant = bool(node.this)
        return lambda table: pa.array(np.full(table.num_rows, constant))
    if isinstance(node, exp.Column):
        name = node.name
        return lambda table: pc.not_equal(table.column(name), 0)
    raise ValueError(f"unsupported filter expression {node.sql()!r}")


def compile_filter(node: exp.Expression | None) -> Mask | None:
    """``None`` for no filter; else a function returning a bool mask.

    Raises ``ValueError`` for a filter the evaluator cannot express (the
    config check in ``strata.processor.engine`` turns it into a message that
    names the metric)."""
    if node is None:
        return None
    predicate = _predicate(node)

    def mask(table: pa.Table) -> np.ndarray:
        result = predicate(table)
        if isinstance(result, pa.Scalar):
            return np.full(table.num_rows, bool(result.as_py()))
        chunks = result.chunks if isinstance(result, pa.ChunkedArray) else [result]
        if not chunks:
            return np.zeros(0, dtype=bool)
        return np.concatenate([_bools(chunk) for chunk in chunks])

    return mask


def _bools(chunk: pa.Array) -> np.ndarray:
    """A boolean chunk as a numpy bool array, nulls as False: the bitmap is
    unpacked in one numpy pass (Arrow's own conversion goes bit by bit)."""
    if chunk.null_count:
        chunk = pc.fill_null(chunk, False)
    if len(chunk) == 0:
        return np.zeros(0, dtype=bool)
    bitmap = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)
    bits = np.unpackbits(bitmap, count=chunk.offset + len(chunk), bitorder="little")
    return bits[chunk.offset :].view(bool)
