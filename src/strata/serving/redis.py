"""Redis serving store (distributed shape), through redis-py.

Layout, under ``prefix`` (default ``strata:``):

* ``w:<metric>:<window_start>`` hash: field ``<shard>\\x1f<dims JSON>`` ->
  msgpack ``WindowState``. HSET replaces a group's full state.
* ``wi:<metric>`` sorted set of window starts (score = member) that have a
  hash, for range reads. A delete removes the member in the same Lua script
  that empties the hash, so a concurrent put by another shard is never lost
  from the index.
* ``rev:<metric>`` sorted set of ``<start>:<end>`` revised ranges.
* ``progress`` hash: shard -> JSON {metric: watermark}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis

from strata.serving.base import ServingError, ServingStore, WindowKey
from strata.serving.state import WindowState, decode_state, encode_state

_DELETE = """
for i, field in ipairs(ARGV) do
  if i > 1 then redis.call('HDEL', KEYS[1], field) end
end
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
"""


def _field(shard: str, dims: Sequence[str]) -> str:
    return f"{shard}\x1f{json.dumps(list(dims), separators=(',', ':'))}"


class RedisServingStore(ServingStore):
    def __init__(self, url: str, prefix: str = "strata:") -> None:
        self.prefix = prefix
        self.client: Any = redis.Redis.from_url(url, socket_timeout=10)
        self._delete = self.client.register_script(_DELETE)

    def _k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def _call(self, action: str, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except redis.RedisError as exc:
            raise ServingError(f"redis {action} failed: {exc}") from exc

    def put_windows(self, states: Sequence[WindowState]) -> None:
        if not states:
            return
        pipe = self.client.pipeline(transaction=False)
        for state in states:
            pipe.hset(
                self._k("w", state.metric, state.window_start),
                _field(state.shard, state.dims),
                encode_state(state),
            )
            pipe.zadd(self._k("wi", state.metric), {str(state.window_start): state.window_start})
        self._call("put", pipe.execute)

    def delete_windows(self, keys: Sequence[WindowKey]) -> None:
        by_window: dict[tuple[str, int], list[str]] = {}
        for metric, shard, start, dims in keys:
            by_window.setdefault((metric, start), []).append(_field(shard, dims))
        if not by_window:
            return
        pipe = self.client.pipeline(transaction=False)
        for (metric, start), fields in by_window.items():
            self._delete(
                keys=[self._k("w", metric, start), self._k("wi", metric)],
                args=[str(start), *fields],
                client=pipe,
            )
        self._call("delete", pipe.execute)

    def windows(self, metric: str, start_ms: int, end_ms: int) -> list[WindowState]:
        starts = self._call(
            "range", self.client.zrangebyscore, self._k("wi", metric), start_ms, f"({end_ms}"
        )
        if not starts:
            return []
        pipe = self.client.pipeline(transaction=False)
        for start in starts:
            pipe.hgetall(self._k("w", metric, int(start)))
        states = [
            decode_state(data)
            for found in self._call("read", pipe.execute)
            for data in found.values()
        ]
        states.sort(key=lambda s: (s.window_start, s.shard, s.dims))
        return states

    def add_revised(self, metric: str, ranges: Sequence[tuple[int, int]]) -> None:
        if ranges:
            mapping = {f"{a}:{b}": a for a, b in ranges}
            self._call("revised", self.client.zadd, self._k("rev", metric), mapping)

    def revised(self, metric: str, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
        # Windows are at most one day long: look back that far for overlaps.
        members = self._call(
            "revised",
            self.client.zrangebyscore,
            self._k("rev", metric),
            start_ms - 86_400_000,
            f"({end_ms}",
        )
        ranges = []
        for member in members:
            a, _, b = member.decode().partition(":")
            if int(b) > start_ms:
                ranges.append((int(a), int(b)))
        return sorted(ranges)

    def set_progress(self, shard: str, watermarks: dict[str, int]) -> None:
        self._call("progress", self.client.hset, self._k("progress"), shard, json.dumps(watermarks))

    def progress(self) -> dict[str, dict[str, int]]:
        found = self._call("progress", self.client.hgetall, self._k("progress"))
        return {k.decode(): json.loads(v) for k, v in found.items()}

    def clear(self) -> None:
        keys = list(self.client.scan_iter(match=self.prefix + "*", count=1000))
        if keys:
            self._call("clear", self.client.delete, *keys)

    def close(self) -> None:
        self.client.close()
