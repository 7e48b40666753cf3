"""Window states as the serving store holds them, and the mergeable distinct
count (``UniqSketch``) behind ``uniq(col)``.

A ``WindowState`` is the full aggregation state of one (metric, shard,
window, dimension values) group. Every aggregation is mergeable, so windows
combine into hours and days, and the partial states of several processors
(shards) combine into one answer:

* count: an integer; sum/avg: a float sum (avg = sum / count); min/max: floats.
* uniq: a ``UniqSketch``. It keeps the exact set of 64-bit hashes up to
  ``EXACT_LIMIT`` distinct values and then switches to a HyperLogLog with
  2^14 registers (standard error 1.04/sqrt(16384) = 0.81 %), estimated with
  Ertl's improved raw estimator (no bias tables, no small-range switch).
  Hashing is vectorized (``hash_strings``) and deterministic across
  processes, so sketches written by different processes merge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

from strata.metrics import Metric

HLL_P = 14
HLL_M = 1 << HLL_P
EXACT_LIMIT = 2048  # 16 KiB of hashes = the size of the HLL registers
_Q = 64 - HLL_P
_MASKS = np.array([0] + [(1 << (8 * k)) - 1 for k in range(1, 8)] + [2**64 - 1], dtype=np.uint64)
_MUL1 = np.uint64(0x9E3779B97F4A7C15)
_MUL2 = np.uint64(0xFF51AFD7ED558CCD)
_MUL3 = np.uint64(0xC4CEB9FE1A85EC53)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * _MUL2
    h = h ^ (h >> np.uint64(33))
    h = h * _MUL3
    return h ^ (h >> np.uint64(33))


def hash_strings(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of a string column, 8 bytes per numpy pass (no Python
    loop per value). Nulls hash like the empty string (ClickHouse stores
    missing strings as '')."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    if array.null_count:
        array = array.fill_null("")
    if len(array) == 0:
        return np.empty(0, dtype=np.uint64)
    offset_type: type[np.signedinteger[Any]] = np.int32
    if not (pa.types.is_string(array.type) or pa.types.is_binary(array.type)):
        array = array.cast(pa.large_string())
        offset_type = np.int64
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offset_type)[
        array.offset : array.offset + len(array) + 1
    ]
    starts = offsets[:-1].astype(np.int64)
    lengths = (offsets[1:] - offsets[:-1]).astype(np.int64)
    raw = (
        np.frombuffer(buffers[2], dtype=np.uint8)
        if buffers[2] is not None
        else np.empty(0, np.uint8)
    )
    end = int(offsets[-1])
    padded = np.zeros(end + 16, dtype=np.uint8)
    padded[:end] = raw[:end]
    # Unaligned 8-byte view at every byte position.
    words = np.ndarray(shape=(end + 9,), dtype="<u8", buffer=padded, strides=(1,))
    h = lengths.astype(np.uint64) * _MUL1 ^ np.uint64(0x243F6A8885A308D3)
    longest = int(lengths.max())
    for j in range(0, longest, 8):
        remaining = np.clip(lengths - j, 0, 8)
        word = words[np.minimum(starts + j, end)] & _MASKS[remaining]
        # Strings that ended keep their hash, so a value hashes the same in
        # every batch whatever the longest value next to it.
        h = np.where(remaining > 0, _fmix64((h ^ word) * _MUL1 + np.uint64(j + 1)), h)
    return _fmix64(h)


def hash_strings_at(column: pa.Array | pa.ChunkedArray, rows: np.ndarray | None) -> np.ndarray:
    """``hash_strings(column.take(rows))`` (``rows`` ascending; None: all
    rows), without copying the strings out first.

    A chunk whose values all have the same byte length (ids, UUIDs, codes)
    is hashed as a matrix of 8-byte words gathered row by row, which costs
    a few numpy passes per word and no per-value offsets; other chunks take
    the general path. The hashes are the same either way."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    sizes = [len(chunk) for chunk in chunks]
    if rows is None:
        rows = np.arange(sum(sizes), dtype=np.int64)
    out = np.empty(len(rows), dtype=np.uint64)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cuts = np.searchsorted(rows, bounds).tolist()
    # Fixed-width chunks of the same width share one buffer and one pass.
    by_width: dict[int, list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
    for index, chunk in enumerate(chunks):
        a, b = cuts[index], cuts[index + 1]
        if a == b:
            continue
        local = rows[a:b] - bounds[index]
        values = fixed_width_values(chunk)
        if values is None:
            out[a:b] = hash_strings(chunk.take(pa.array(local)))
        else:
            by_width.setdefault(values.shape[1], []).append((a, b, values, local))
    for width, parts in by_width.items():
        total = sum(b - a for a, b, _, _ in parts)
        # The picked values back to back, with slack so that the last
        # value's last 8-byte word can be read whole.
        packed = np.zeros(total * width + 8, dtype=np.uint8)
        at = 0
        for a, b, values, local in parts:
            np.take(
                values,
                local,
                axis=0,
                out=packed[at * width : (at + b - a) * width].reshape(-1, width),
            )
            at += b - a
        hashes = _hash_fixed(packed, total, width)
        at = 0
        for a, b, _, _ in parts:
            out[a:b] = hashes[at : at + b - a]
            at += b - a
    return out


def fixed_width_values(chunk: pa.Array) -> np.ndarray | None:
    """The bytes of a string chunk as an (n, width) matrix, if every value
    is non-null with the same non-zero byte length; else None."""
    if chunk.null_count or not (pa.types.is_string(chunk.type) or pa.types.is_binary(chunk.type)):
        return None
    buffers = chunk.buffers()
    if buffers[2] is None or len(chunk) == 0:
        return None
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[
        chunk.offset : chunk.offset + len(chunk) + 1
    ]
    first = int(offsets[0])
    width = (int(offsets[-1]) - first) // len(chunk)
    if width == 0 or not np.array_equal(
        offsets, np.arange(first, first + width * len(chunk) + 1, width, dtype=np.int32)
    ):
        return None
    data = np.frombuffer(buffers[2], dtype=np.uint8, count=width * len(chunk), offset=first)
    return data.reshape(len(chunk), width)


def _hash_fixed(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """``hash_strings`` of ``count`` values of ``width`` bytes each, stored
    back to back in ``packed`` (plus 8 bytes of slack). Word ``j`` of every
    value is one strided 8-byte view; the last word is masked to the bytes
    that belong to the value, as the general path does."""
    seed = np.uint64((width * int(_MUL1) ^ 0x243F6A8885A308D3) % 2**64)
    h = np.empty(count, dtype=np.uint64)
    scratch = np.empty_like(h)
    for j in range(0, width, 8):
        word = np.ndarray((count,), dtype="<u8", buffer=packed, offset=j, strides=(width,))
        if width - j < 8:
            np.bitwise_and(word, _MASKS[width - j], out=scratch)
            word = scratch
        if j == 0:
            np.bitwise_xor(word, seed, out=h)
        else:
            np.bitwise_xor(h, word, out=h)
        np.multiply(h, _MUL1, out=h)
        np.add(h, np.uint64(j + 1), out=h)
        _fmix64_inplace(h, scratch)
    return _fmix64_inplace(h, scratch)


def _fmix64_inplace(h: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    shift = np.uint64(33)
    np.right_shift(h, shift, out=scratch)
    np.bitwise_xor(h, scratch, out=h)
    np.multiply(h, _MUL2, out=h)
    np.right_shift(h, shift, out=scratch)
    np.bitwise_xor(h, scratch, out=h)
    np.multiply(h, _MUL3, out=h)
    np.right_shift(h, shift, out=scratch)
    np.bitwise_xor(h, scratch, out=h)
    return h


def hll_positions(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Register index and rank (1 + leading zeros of the remaining bits)."""
    index = (hashes >> np.uint64(_Q)).astype(np.int64)
    rest = (hashes & np.uint64((1 << _Q) - 1)).astype(np.float64)  # < 2^50: exact
    _, exponent = np.frexp(rest)  # rest = mantissa * 2^exponent, 0 -> exponent 0
    rank = (_Q + 1 - exponent).astype(np.uint8)
    return index, rank


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x = x * x
        z_old = z
        z += x * y
        y += y
        if z == z_old:
            return z


def _tau(x: float) -> float:
    if x == 0.0 or x == 1.0:
        return 0.0
    y, z = 1.0, 1 - x
    while True:
        x = math.sqrt(x)
        z_old = z
        y *= 0.5
        z -= (1 - x) ** 2 * y
        if z == z_old:
            return z / 3


def hll_estimate(registers: np.ndarray) -> float:
    """Ertl (2017), "New cardinality estimation algorithms for HyperLogLog
    sketches", improved raw estimator."""
    counts = np.bincount(registers, minlength=_Q + 2).astype(np.float64)
    m = float(HLL_M)
    z = m * _tau(1 - counts[_Q + 1] / m)
    for k in range(_Q, 0, -1):
        z = 0.5 * (z + counts[k])
    z += m * _sigma(counts[0] / m)
    return m * m / (2 * math.log(2)) / z


class UniqSketch:
    """A mergeable distinct count: exact hashes, then HyperLogLog."""

    __slots__ = ("exact", "registers")

    def __init__(self, exact: np.ndarray | None = None, registers: np.ndarray | None = None):
        self.exact = np.empty(0, dtype=np.uint64) if exact is None and registers is None else exact
        self.registers = registers

    def add_hashes(self, hashes: np.ndarray) -> None:
        """Add 64-bit hashes (any order, duplicates allowed)."""
        if self.registers is None:
            assert self.exact is not None
            exact = self.exact
            # One sort of the short concatenation; the exact set stays
            # sorted and unique, so its bytes are a function of the set.
            if len(exact):
                merged = np.concatenate((exact, hashes))
                merged.sort()
            else:
                merged = np.sort(hashes.astype(np.uint64, copy=False))
            if len(merged) > 1:
                fresh = merged[1:] != merged[:-1]
                if not fresh.all():
                    keep = np.empty(len(merged), dtype=bool)
                    keep[0] = True
                    keep[1:] = fresh
                    merged = merged[keep]
                if len(merged) == len(exact):
                    return  # nothing new
            if len(merged) <= EXACT_LIMIT:
                self.exact = merged
                return
            self._to_hll(merged)
            return
        index, rank = hll_positions(hashes)
        np.maximum.at(self.registers, index, rank)

    def add_registers(self, registers: np.ndarray) -> None:
        if self.registers is None:
            assert self.exact is not None
            self._to_hll(self.exact)
        assert self.registers is not None
        np.maximum(self.registers, registers, out=self.registers)

    def _to_hll(self, hashes: np.ndarray) -> None:
        self.registers = np.zeros(HLL_M, dtype=np.uint8)
        index, rank = hll_positions(hashes)
        np.maximum.at(self.registers, index, rank)
        self.exact = None

    def merge(self, other: UniqSketch) -> None:
        if other.registers is not None:
            self.add_registers(other.registers)
        else:
            assert other.exact is not None
            self.add_hashes(other.exact)

    def copy(self) -> UniqSketch:
        return UniqSketch(
            None if self.exact is None else self.exact.copy(),
            None if self.registers is None else self.registers.copy(),
        )

    def estimate(self) -> int:
        if self.registers is None:
            assert self.exact is not None
            return len(self.exact)
        return int(round(hll_estimate(self.registers)))

    def to_bytes(self) -> bytes:
        if self.registers is None:
            assert self.exact is not None
            return b"E" + self.exact.astype("<u8").tobytes()
        return b"H" + self.registers.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> UniqSketch:
        if data[:1] == b"E":
            return cls(exact=np.frombuffer(data, dtype="<u8", offset=1).astype(np.uint64))
        if data[:1] == b"H":
            return cls(registers=np.frombuffer(data, dtype=np.uint8, offset=1).copy())
        raise ValueError("not a uniq sketch")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UniqSketch) and self.to_bytes() == other.to_bytes()


class WindowState(msgspec.Struct, kw_only=True):
    """One group of one window, as the serving store holds it.

    ``values`` follow the metric's aggregations in order: ``None`` for
    count(), a float for sum/min/max/avg (avg keeps the sum), and the
    ``UniqSketch`` bytes for uniq. ``revision`` counts late-data corrections
    after the final firing. Writes replace the whole state (idempotent)."""

    metric: str
    shard: str
    window_start: int
    window_end: int
    dims: list[str]
    count: int
    values: list[Any]
    final: bool = False
    revision: int = 0

    @property
    def key(self) -> tuple[str, str, int, tuple[str, ...]]:
        return (self.metric, self.shard, self.window_start, tuple(self.dims))


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WindowState)


def encode_state(state: WindowState) -> bytes:
    return _encoder.encode(state)


def decode_state(data: bytes) -> WindowState:
    return _decoder.decode(data)


def merge_values(metric: Metric, states: Iterable[WindowState]) -> tuple[int, list[Any]]:
    """Merge the states of several windows/shards of one metric: returns the
    total count and merged values (sketches as ``UniqSketch`` objects)."""
    count = 0
    merged: list[Any] = [None] * len(metric.aggregations)
    for state in states:
        count += state.count
        for i, aggregation in enumerate(metric.aggregations):
            value = state.values[i]
            have = merged[i]
            function = aggregation.function
            if function == "count":
                continue
            if function == "uniq":
                sketch = UniqSketch.from_bytes(value)
                if have is None:
                    merged[i] = sketch
                else:
                    have.merge(sketch)
            elif have is None:
                merged[i] = value
            elif function in ("sum", "avg"):
                merged[i] = have + value
            elif function == "min":
                merged[i] = min(have, value)
            else:
                merged[i] = max(have, value)
    return count, merged


def finalize(metric: Metric, count: int, values: Sequence[Any]) -> dict[str, Any]:
    """Final values by alias: what a metrics response shows."""
    out: dict[str, Any] = {}
    for aggregation, value in zip(metric.aggregations, values, strict=True):
        function = aggregation.function
        if function == "count":
            out[aggregation.alias] = count
        elif function == "uniq":
            sketch = value if isinstance(value, UniqSketch) else UniqSketch.from_bytes(value)
            out[aggregation.alias] = sketch.estimate()
        elif function == "avg":
            out[aggregation.alias] = value / count if count else None
        else:
            out[aggregation.alias] = value
    return out
