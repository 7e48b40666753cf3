"""Query results: one in-memory shape, three wire formats (JSON, CSV, Arrow
IPC) and a compact binary form for the result cache.

The cache form keeps cell types: datetimes, dates and decimals come back as
what they were, so a cached answer renders exactly like a fresh one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec

ARROW_STREAM = "application/vnd.apache.arrow.stream"
CSV = "text/csv"
JSON = "application/json"

def json_fallback(value: Any) -> Any:
    """``enc_hook`` of every JSON encoder of query answers: cells msgspec
    has no JSON form for (IPv4/IPv6 addresses and any other engine type
    the driver hands back as an object) become their text."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


_json_cells = msgspec.json.Encoder(enc_hook=json_fallback)
_packer = msgspec.msgpack.Encoder()
_unpacker = msgspec.msgpack.Decoder()


def _kind(values: list[Any]) -> str:
    for value in values:
        if value is None:
            continue
        if isinstance(value, datetime):
            return "datetime"
        if isinstance(value, date):
            return "date"
        if isinstance(value, Decimal):
            return "decimal"
        if isinstance(value, UUID):
            return "uuid"
        return "plain"
    return "plain"


def _datetime_us(value: datetime) -> int:
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return int(aware.timestamp() * 1_000_000)


_ENCODE: dict[str, Callable[[Any], Any]] = {
    "datetime": _datetime_us,
    "date": lambda v: v.toordinal(),
    "decimal": str,
    "uuid": str,
}
_DECODE: dict[str, Callable[[Any], Any]] = {
    "datetime": lambda v: datetime.fromtimestamp(v / 1_000_000, UTC).replace(tzinfo=None),
    "date": date.fromordinal,
    "decimal": Decimal,
    "uuid": UUID,
}


def _plain(value: Any) -> Any:
    """Cells msgpack/JSON cannot carry as they are (tuples, maps, bytes)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime | date | Decimal | UUID):
        return str(value)
    return value


@dataclass
class QueryResult:
    """Column names and rows (tuples of Python values, as the store returns
    them), plus ``meta``: routing and completeness facts for the response."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    meta: dict[str, Any] = field(default_factory=dict)

    # -- cache form --------------------------------------------------------------
    def encode(self) -> bytes:
        data = [list(column) for column in zip(*self.rows, strict=True)] if self.rows else []
        kinds = [_kind(column) for column in data]
        encoded = []
        for kind, column in zip(kinds, data, strict=True):
            if kind in _ENCODE:
                encoded.append([None if v is None else _ENCODE[kind](v) for v in column])
            else:
                encoded.append([_plain(v) for v in column])
        return _packer.encode(
            {
                "columns": self.columns,
                "kinds": kinds,
                "data": encoded,
                "meta": self.meta,
                "n": len(self.rows),
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> QueryResult:
        obj = _unpacker.decode(payload)
        columns = []
        for kind, column in zip(obj["kinds"], obj["data"], strict=True):
            if kind in _DECODE:
                columns.append([None if v is None else _DECODE[kind](v) for v in column])
            else:
                columns.append(column)
        rows = list(zip(*columns, strict=True)) if columns else []
        return cls(list(obj["columns"]), rows, dict(obj["meta"]))

    # -- wire formats -------------------------------------------------------------
    def json_rows(self) -> list[list[Any]]:
        return [
            [_plain(v) if isinstance(v, tuple | list | dict | bytes) else v for v in row]
            for row in self.rows
        ]

    def to_csv(self) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if v is None else _csv_cell(v) for v in row])
        return buffer.getvalue().encode()

    def to_arrow(self) -> Any:
        import pyarrow as pa

        arrays = []
        for index, _ in enumerate(self.columns):
            values = [row[index] for row in self.rows]
            kind = _kind(values)
            if kind == "datetime":
                arrays.append(pa.array(values, type=pa.timestamp("us", tz="UTC")))
                continue
            arrays.append(_arrow_column(pa, values))
        names = _unique(self.columns)
        return pa.Table.from_arrays(arrays, names=names)

    def to_arrow_ipc(self) -> bytes:
        import pyarrow as pa

        table = self.to_arrow()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return bytes(sink.getvalue().to_pybytes())


def _arrow_column(pa: Any, values: list[Any]) -> Any:
    """One Arrow column from Python cells: pyarrow's own inference, else
    uint64 for integers above int64 (UInt64 columns), else the cells'
    text (IP addresses, 128/256-bit integers, mixed values)."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError, TypeError):
        pass
    integers = [v for v in values if v is not None]
    if integers and all(type(v) is int and 0 <= v < 2**64 for v in integers):
        return pa.array(values, type=pa.uint64())
    return pa.array([None if v is None else _text(v) for v in values], type=pa.string())


def _text(value: Any) -> str:
    plain = _plain(value)
    if isinstance(plain, list | dict):
        return _json_cells.encode(plain).decode()
    return str(plain)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, list | tuple | dict):
        return _json_cells.encode(_plain(value)).decode()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name in seen:
            seen[name] += 1
            out.append(f"{name}_{seen[name]}")
        else:
            seen[name] = 0
            out.append(name)
    return out


def negotiate(accept: str | None) -> str:
    """Pick JSON (default), CSV or Arrow IPC from an Accept header; raise
    ValueError naming the header when none of them is acceptable."""
    if not accept or not accept.strip():
        return JSON
    offered = []
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        offered.append((quality, media.strip().lower()))
    offered.sort(key=lambda item: -item[0])
    for quality, media in offered:
        if quality <= 0:
            continue
        if media in (JSON, "*/*", "application/*"):
            return JSON
        if media in (CSV, "text/*"):
            return CSV
        if media == ARROW_STREAM:
            return ARROW_STREAM
    raise ValueError(
        f"accept: none of {accept!r} is available; use {JSON}, {CSV} or {ARROW_STREAM}"
    )
