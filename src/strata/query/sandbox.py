"""The SQL sandbox for ``POST /v1/sql``.

A query is parsed with sqlglot (ClickHouse dialect) and accepted only if:

* it is exactly one statement, and that statement is a SELECT (or a UNION/
  INTERSECT/EXCEPT of SELECTs, with optional WITH);
* every table it reads is a strata table (``events``, ``rollup_*``,
  ``window_results``, ``late_events``, ...) or one of its own CTEs, with no
  database qualifier (so no ``system.*``);
* it calls no table function and no function that reaches outside the store
  (``file``, ``url``, ``s3``, ``remote``, dictionaries, ``sleep`` ...);
* it carries no SETTINGS, FORMAT or INTO OUTFILE clause.

What runs is the SQL *regenerated from the parsed tree*, without comments,
so nothing hidden in comments or odd whitespace reaches the engine. The
store then runs it with ``readonly=2`` and time, row and memory limits, a
second fence should the parser ever accept something it should not.
"""

from __future__ import annotations

import re
import unicodedata

import sqlglot
from sqlglot import exp

BASE_TABLES = frozenset(
    {"events", "window_results", "late_events", "quarantine", "reconciliation", "identities"}
)
_ROLLUP = re.compile(r"^rollup_[a-z][a-z0-9_]*_(5m|1d)$")
_DENIED_PREFIXES = (
    "file",
    "url",
    "s3",
    "gcs",
    "oss",
    "cos",
    "azure",
    "hdfs",
    "remote",
    "cluster",
    "mysql",
    "postgre",
    "mongo",
    "redis",
    "sqlite",
    "jdbc",
    "odbc",
    "executable",
    "dict",
    "input",
    "iceberg",
    "deltalake",
    "hudi",
    "python",
    "arrowflight",
    "sleep",
    "generaterandom",
    "fuzz",
    "loop",
    "mergetree",
    "catboost",
    "evalml",
    "filesystem",
    "getmacro",
    "getserverport",
    "getsetting",
    "currentprofiles",
    "ytsaurus",
)


class SQLRejected(ValueError):
    """The query is not allowed; the message says why."""


def is_allowed_table(name: str) -> bool:
    return name in BASE_TABLES or bool(_ROLLUP.match(name))


def _function_name(node: exp.Expression) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.this).lower()
    return (node.sql_name() if isinstance(node, exp.Func) else "").lower()


_LEADING = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$)|/\*.*?\*/)*(\(|[A-Za-z]+)", re.S)
_PARSER_TOKEN = re.compile(r"<Token token_type: [\w.]+, text: (.*?), line: \d+, col: \d+, start: \d+, end: \d+, comments: \[.*?\]>")
_PARSER_CLASS = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")


def _leading_keyword(sql: str) -> str:
    """The statement's first keyword (after comments), upper case, or ""."""
    match = _LEADING.match(sql)
    return match.group(1).upper() if match else ""


def _parse_message(exc: Exception) -> str:
    """sqlglot's message without its Python class names."""
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    line = _PARSER_TOKEN.sub(lambda m: repr(m.group(1)), line)
    return _PARSER_CLASS.sub(lambda m: m.group(1).upper(), line)


def check(sql: str) -> exp.Expression:
    """Parse and check ``sql``; return the accepted tree or raise SQLRejected."""
    if not sql or not sql.strip():
        raise SQLRejected("sql: empty query")
    if len(sql) > 100_000:
        raise SQLRejected("sql: longer than 100000 characters")
    normalized = unicodedata.normalize("NFKC", sql)
    if any(unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\t\n\r" for ch in normalized):
        raise SQLRejected("sql: contains control or invisible format characters")
    try:
        statements = [s for s in sqlglot.parse(normalized, dialect="clickhouse") if s is not None]
    except sqlglot.errors.SqlglotError as exc:
        keyword = _leading_keyword(normalized)
        if keyword and keyword not in ("SELECT", "WITH", "("):
            raise SQLRejected(f"sql: only SELECT is allowed, got {keyword}") from exc
        raise SQLRejected(f"sql: cannot parse: {_parse_message(exc)}") from exc
    if len(statements) != 1:
        raise SQLRejected("sql: exactly one statement is allowed")
    tree = statements[0]
    if not isinstance(tree, exp.Select | exp.SetOperation):
        got = str(tree.this).upper() if isinstance(tree, exp.Command) else tree.key.upper()
        raise SQLRejected(f"sql: only SELECT is allowed, got {got}")
    ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    for node in tree.walk():
        if isinstance(node, exp.Command | exp.Insert | exp.Create | exp.Drop | exp.Alter | exp.Delete | exp.Update | exp.Set):
            raise SQLRejected(f"sql: {node.key.upper()} is not allowed")
        if isinstance(node, exp.Select | exp.SetOperation):
            for clause in ("settings", "format"):
                if node.args.get(clause):
                    raise SQLRejected(f"sql: a {clause.upper()} clause is not allowed")
            if node.args.get("into"):
                raise SQLRejected("sql: INTO is not allowed")
        if isinstance(node, exp.Table):
            if not isinstance(node.this, exp.Identifier):
                raise SQLRejected(f"sql: table functions are not allowed ({node.this.sql()[:60]})")
            if node.args.get("db") or node.args.get("catalog"):
                raise SQLRejected(f"sql: database-qualified tables are not allowed ({node.sql()})")
            if node.name not in ctes and not is_allowed_table(node.name):
                raise SQLRejected(f"sql: unknown table {node.name!r}")
        if isinstance(node, exp.Func):
            name = _function_name(node)
            if name.startswith(_DENIED_PREFIXES):
                raise SQLRejected(f"sql: function {name}() is not allowed")
        if isinstance(node, exp.Column) and node.args.get("db"):
            raise SQLRejected("sql: database-qualified columns are not allowed")
    return tree


def render(tree: exp.Expression) -> str:
    """The SQL that actually runs: regenerated, comments dropped."""
    return tree.sql(dialect="clickhouse", comments=False)
