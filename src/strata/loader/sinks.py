"""What the loader stores: one sink per log topic, one table per sink.

A sink says how a topic's JSON records become Arrow columns of its table,
and which field identifies a record for retry deduplication. The loader is
the only writer of these tables (DESIGN.md: one writer per table).
``decode`` parses whole records in Python; ``decode_keys`` +
``extract_select`` leave all but the key fields to the store (decision 101).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

TIMESTAMP = pa.timestamp("ms", tz="UTC")
# The column of ``decode_keys`` holding each record's JSON text.
JSON_COLUMN = "_json"
# Arrow type of a sink field -> the ClickHouse type JSONExtract reads it as.
_EXTRACT_TYPES = {
    pa.string(): "String",
    pa.int64(): "Int64",
    pa.float64(): "Float64",
    pa.uint16(): "UInt16",
    pa.uint64(): "UInt64",
    pa.bool_(): "Bool",
}
# Fields the loader reads itself when the store parses the records
# (decode_keys): ids, times, and the identities deleted users are masked by.
_KEY_CANDIDATES = ("user_id", "distinct_id", "ts")


@dataclass(frozen=True)
class Sink:
    topic: str
    table: str
    # Fields of the JSON records, as they are in the log. int64 fields listed
    # in ``timestamp_fields`` are epoch milliseconds and become DateTime64.
    schema: pa.Schema
    id_field: str | None = None
    received_field: str = "received_at"
    # Event time of a record (epoch ms), the same in a retry or re-append as
    # in its original: the dedup index buckets ids by it (decision 094).
    # None: the received field.
    event_time_field: str | None = None
    timestamp_fields: tuple[str, ...] = ()
    # Add the log position (_partition, _offset) as columns.
    with_position: bool = True
    _parse_options: pa_json.ParseOptions = field(init=False, repr=False, compare=False)
    _key_decoder: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "_parse_options",
            pa_json.ParseOptions(explicit_schema=self.schema, unexpected_field_behavior="ignore"),
        )
        for f in self.schema:
            if f.type not in _EXTRACT_TYPES:
                raise ValueError(f"sink {self.topic}: field {f.name} has unsupported type {f.type}")
        # Only the key fields are decoded in Python; msgspec skips the rest
        # of each record without building it.
        key_struct = msgspec.defstruct(
            f"{self.topic}_keys",
            [(name, _python_type(self.schema.field(name).type) | None, None)
             for name in self.key_fields],
            gc=False,
        )
        object.__setattr__(self, "_key_decoder", msgspec.json.Decoder(key_struct))

    @property
    def key_fields(self) -> tuple[str, ...]:
        """The fields ``decode_keys`` decodes: the id, the event and receive
        times, and ``user_id``/``distinct_id``/``ts`` where the sink has them."""
        wanted = [self.id_field, self.event_time_field, self.received_field, *_KEY_CANDIDATES]
        names = self.schema.names
        return tuple(name for name in names if name in wanted)

    @property
    def stored_schema(self) -> pa.Schema:
        """The Arrow schema of what ``finish`` returns: the table's columns."""
        fields = [
            pa.field(f.name, TIMESTAMP) if f.name in self.timestamp_fields else f
            for f in self.schema
        ]
        if self.with_position:
            fields += [pa.field("_partition", pa.uint16()), pa.field("_offset", pa.uint64())]
        return pa.schema(fields)

    def decode(self, values: list[bytes]) -> pa.Table:
        """Parse JSON records into a table with the sink's schema."""
        table = pa_json.read_json(
            io.BytesIO(b"\n".join(values)),
            read_options=pa_json.ReadOptions(block_size=1 << 24),
            parse_options=self._parse_options,
        )
        return table.select(self.schema.names)

    def decode_keys(self, values: list[bytes]) -> pa.Table:
        """The ``key_fields`` of JSON records as a table (the sink's types),
        plus ``JSON_COLUMN``: each record's JSON text, for the store to parse
        (``extract_select``). Missing or null key fields are null."""
        decode = self._key_decoder.decode
        keys = [decode(value) for value in values]
        columns: dict[str, pa.Array] = {}
        for name in self.key_fields:
            columns[name] = pa.array([getattr(k, name) for k in keys], self.schema.field(name).type)
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        offsets = np.zeros(len(values) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        columns[JSON_COLUMN] = pa.Array.from_buffers(
            pa.large_binary(),
            len(values),
            [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))],
        )
        return pa.table(columns)

    def extract_select(self, source: str) -> tuple[list[str], str]:
        """(columns, SELECT) that turns the rows of ``source`` (a table with
        ``JSON_COLUMN`` and, with ``with_position``, the position columns of
        ``finish``) into the sink table's columns, parsing each record's
        JSON once in the store. Types and defaults are those of ``decode`` +
        ``finish``: a missing or null field is the column's default, int64
        time fields are epoch milliseconds. Only identifiers of this sink's
        (code-defined) schema are put into the SQL."""
        extract = ", ".join(f"{f.name} {_EXTRACT_TYPES[f.type]}" for f in self.schema)
        selected = [
            f"fromUnixTimestamp64Milli(record.{name}, 'UTC')"
            if name in self.timestamp_fields
            else f"record.{name}"
            for name in self.schema.names
        ]
        columns = list(self.schema.names)
        position = ["_partition", "_offset"] if self.with_position else []
        columns += position
        selected += position
        inner = ", ".join([f"JSONExtract({JSON_COLUMN}, 'Tuple({extract})') AS record", *position])
        sql = f"SELECT {', '.join(selected)} FROM (SELECT {inner} FROM {source})"
        return columns, sql

    def finish(self, table: pa.Table, partition: np.ndarray, offset: np.ndarray) -> pa.Table:
        """Cast timestamps (those ``table`` has: ``decode_keys`` returns only
        some) and add the log position columns."""
        for name in self.timestamp_fields:
            index = table.schema.get_field_index(name)
            if index < 0:
                continue
            table = table.set_column(index, name, table.column(name).cast(TIMESTAMP))
        if self.with_position:
            table = table.append_column("_partition", pa.array(partition.astype(np.uint16)))
            table = table.append_column("_offset", pa.array(offset.astype(np.uint64)))
        return table


def _python_type(arrow_type: pa.DataType) -> type:
    if pa.types.is_string(arrow_type):
        return str
    if pa.types.is_floating(arrow_type):
        return float
    if pa.types.is_boolean(arrow_type):
        return bool
    return int


EVENTS_SINK = Sink(
    topic="events",
    table="events",
    schema=pa.schema(
        [
            ("event_id", pa.string()),
            ("event_type", pa.string()),
            ("user_id", pa.string()),
            ("anonymous_id", pa.string()),
            ("distinct_id", pa.string()),
            ("session_id", pa.string()),
            ("ts", pa.int64()),
            ("received_at", pa.int64()),
            ("country", pa.string()),
            ("platform", pa.string()),
            ("os", pa.string()),
            ("app_version", pa.string()),
            ("path", pa.string()),
            ("referrer", pa.string()),
            ("revenue", pa.float64()),
            ("currency", pa.string()),
            ("properties", pa.string()),
        ]
    ),
    id_field="event_id",
    event_time_field="ts",
    timestamp_fields=("ts", "received_at"),
)

# Events the schema registry quarantined (strata.schemas, docs/ingest.md).
QUARANTINE_SINK = Sink(
    topic="quarantine",
    table="quarantine",
    schema=pa.schema(
        [
            ("event_id", pa.string()),
            ("event_type", pa.string()),
            ("distinct_id", pa.string()),
            ("ts", pa.int64()),
            ("received_at", pa.int64()),
            ("reason", pa.string()),
            ("event", pa.string()),
        ]
    ),
    id_field="event_id",
    event_time_field="ts",
    timestamp_fields=("ts", "received_at"),
)

# Traits of Segment-style `identify` calls (strata.ingest.segment).
IDENTITIES_SINK = Sink(
    topic="identities",
    table="identities",
    schema=pa.schema(
        [
            ("event_id", pa.string()),
            ("user_id", pa.string()),
            ("anonymous_id", pa.string()),
            ("distinct_id", pa.string()),
            ("traits", pa.string()),
            ("ts", pa.int64()),
            ("received_at", pa.int64()),
        ]
    ),
    id_field="event_id",
    event_time_field="ts",
    timestamp_fields=("ts", "received_at"),
)

# Other sinks (window_results, late) register here.
# The stream processor's outputs (strata.processor.runner). Ids are
# deterministic, so records a processor re-appends after a crash are dropped;
# ``emitted_at`` is the processor's (journaled) cycle time.
WINDOW_RESULTS_SINK = Sink(
    topic="window_results",
    table="window_results",
    schema=pa.schema(
        [
            ("id", pa.string()),
            ("metric", pa.string()),
            ("shard", pa.string()),
            ("window_start", pa.int64()),
            ("window_end", pa.int64()),
            ("dims", pa.string()),
            ("aggregates", pa.string()),
            ("event_count", pa.uint64()),
            ("watermark", pa.int64()),
            ("emitted_at", pa.int64()),
        ]
    ),
    id_field="id",
    received_field="emitted_at",
    event_time_field="window_start",
    timestamp_fields=("window_start", "window_end", "watermark", "emitted_at"),
)

LATE_EVENTS_SINK = Sink(
    topic="late",
    table="late_events",
    schema=pa.schema(
        [
            ("id", pa.string()),
            ("metric", pa.string()),
            ("event_id", pa.string()),
            ("event_type", pa.string()),
            ("distinct_id", pa.string()),
            ("ts", pa.int64()),
            ("received_at", pa.int64()),
            ("window_start", pa.int64()),
            ("window_end", pa.int64()),
            ("watermark", pa.int64()),
            ("source_partition", pa.uint16()),
            ("source_offset", pa.uint64()),
            ("window_held", pa.bool_()),
            ("emitted_at", pa.int64()),
        ]
    ),
    id_field="id",
    received_field="emitted_at",
    event_time_field="ts",
    timestamp_fields=("ts", "received_at", "window_start", "window_end", "watermark", "emitted_at"),
)

SINKS: dict[str, Sink] = {
    EVENTS_SINK.topic: EVENTS_SINK,
    WINDOW_RESULTS_SINK.topic: WINDOW_RESULTS_SINK,
    LATE_EVENTS_SINK.topic: LATE_EVENTS_SINK,
    QUARANTINE_SINK.topic: QUARANTINE_SINK,
    IDENTITIES_SINK.topic: IDENTITIES_SINK,
}
