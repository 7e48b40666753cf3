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
* ``owner:<shard>`` integer: the shard's owner epoch (``claim`` = INCR).
  Fenced writes run as Lua scripts that compare it with the writer's epoch
  first, so the check and the write are one atomic step in Redis; ``clear``
  keeps these keys, so an old epoch can never become current again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import redis

from strata.serving.base import Fence, FencedError, ServingError, ServingStore, WindowKey
from strata.serving.state import WindowState, decode_state, encode_state

# Every script: KEYS[1] = the owner key, ARGV[1] = the writer's epoch ('' =
# unfenced). A stale epoch aborts the script before it writes anything.
_FENCE = """
if ARGV[1] ~= '' then
  local current = tonumber(redis.call('GET', KEYS[1]) or '0')
  if current ~= tonumber(ARGV[1]) then
    return redis.error_reply('FENCED ' .. current)
  end
end
"""

# KEYS[2i], KEYS[2i+1] = window hash, window index; ARGV[3i-1..3i+1] = field, state, start.
_PUT = (
    _FENCE
    + """
for i = 1, (#KEYS - 1) / 2 do
  redis.call('HSET', KEYS[2 * i], ARGV[3 * i - 1], ARGV[3 * i])
  redis.call('ZADD', KEYS[2 * i + 1], ARGV[3 * i + 1], ARGV[3 * i + 1])
end
return 1
"""
)

# KEYS[2], KEYS[3] = window hash, window index; ARGV[2] = start, ARGV[3..] = fields.
_DELETE = (
    _FENCE
    + """
for i = 3, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
end
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[2])
end
return 1
"""
)

# KEYS[2] = revised set; ARGV[2..] = members (score = the range start before ':').
_REVISED = (
    _FENCE
    + """
for i = 2, #ARGV do
  local start = string.match(ARGV[i], '^(-?%d+):')
  redis.call('ZADD', KEYS[2], start, ARGV[i])
end
return 1
"""
)

# KEYS[2] = progress hash; ARGV[2] = shard, ARGV[3] = JSON watermarks.
_PROGRESS = (
    _FENCE
    + """
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
)

_PUT_CHUNK = 500  # states per script call: bounds the time Redis is blocked


def _field(shard: str, dims: Sequence[str]) -> str:
    return f"{shard}\x1f{json.dumps(list(dims), separators=(',', ':'))}"


class RedisServingStore(ServingStore):
    def __init__(self, url: str, prefix: str = "strata:") -> None:
        self.prefix = prefix
        self.client: Any = redis.Redis.from_url(url, socket_timeout=10)
        self._put = self.client.register_script(_PUT)
        self._delete = self.client.register_script(_DELETE)
        self._revised = self.client.register_script(_REVISED)
        self._progress = self.client.register_script(_PROGRESS)

    def _k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    def _call(self, action: str, function: Any, *args: Any, fence: Fence | None = None) -> Any:
        try:
            return function(*args)
        except redis.ResponseError as exc:
            # A pipeline prefixes the script's error with the command's position.
            found = re.search(r"FENCED (-?\d+)", str(exc))
            if fence is not None and found:
                raise FencedError(fence, int(found.group(1))) from None
            raise ServingError(f"redis {action} failed: {exc}") from exc
        except redis.RedisError as exc:
            raise ServingError(f"redis {action} failed: {exc}") from exc

    def _fence_args(self, fence: Fence | None) -> tuple[str, str]:
        """(owner key, epoch) for the scripts; the key is a dummy when unfenced."""
        if fence is None:
            return self._k("owner", ""), ""
        return self._k("owner", fence.shard), str(fence.epoch)

    def claim(self, shard: str) -> Fence:
        epoch = self._call("claim", self.client.incr, self._k("owner", shard))
        return Fence(shard, int(epoch))

    def check_fence(self, fence: Fence) -> None:
        current = self._call("fence", self.client.get, self._k("owner", fence.shard))
        if int(current or 0) != fence.epoch:
            raise FencedError(fence, int(current or 0))

    def put_windows(self, states: Sequence[WindowState], *, fence: Fence | None = None) -> None:
        owner, epoch = self._fence_args(fence)
        for begin in range(0, len(states), _PUT_CHUNK):
            keys = [owner]
            args: list[Any] = [epoch]
            for state in states[begin : begin + _PUT_CHUNK]:
                keys += [
                    self._k("w", state.metric, state.window_start),
                    self._k("wi", state.metric),
                ]
                args += [_field(state.shard, state.dims), encode_state(state), state.window_start]
            self._call("put", lambda k=keys, a=args: self._put(keys=k, args=a), fence=fence)

    def delete_windows(self, keys: Sequence[WindowKey], *, fence: Fence | None = None) -> None:
        by_window: dict[tuple[str, int], list[str]] = {}
        for metric, shard, start, dims in keys:
            by_window.setdefault((metric, start), []).append(_field(shard, dims))
        if not by_window:
            return
        owner, epoch = self._fence_args(fence)
        pipe = self.client.pipeline(transaction=False)
        for (metric, start), fields in by_window.items():
            self._delete(
                keys=[owner, self._k("w", metric, start), self._k("wi", metric)],
                args=[epoch, str(start), *fields],
                client=pipe,
            )
        self._call("delete", pipe.execute, fence=fence)

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

    def add_revised(
        self, metric: str, ranges: Sequence[tuple[int, int]], *, fence: Fence | None = None
    ) -> None:
        if ranges:
            owner, epoch = self._fence_args(fence)
            members = sorted({f"{int(a)}:{int(b)}" for a, b in ranges})
            keys = [owner, self._k("rev", metric)]
            self._call(
                "revised", lambda: self._revised(keys=keys, args=[epoch, *members]), fence=fence
            )

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

    def prune_revised(self, metric: str, before_ms: int) -> None:
        # Scores are range starts; idempotent, so it needs no fence.
        self._call(
            "revised",
            self.client.zremrangebyscore,
            self._k("rev", metric),
            "-inf",
            f"({int(before_ms)}",
        )

    def set_progress(
        self, shard: str, watermarks: dict[str, int], *, fence: Fence | None = None
    ) -> None:
        owner, epoch = self._fence_args(fence)
        keys = [owner, self._k("progress")]
        args = [epoch, shard, json.dumps(watermarks)]
        self._call("progress", lambda: self._progress(keys=keys, args=args), fence=fence)

    def progress(self) -> dict[str, dict[str, int]]:
        found = self._call("progress", self.client.hgetall, self._k("progress"))
        return {k.decode(): json.loads(v) for k, v in found.items()}

    def clear(self) -> None:
        owners = self._k("owner", "")
        keys = [
            key
            for key in self.client.scan_iter(match=self.prefix + "*", count=1000)
            if not key.decode().startswith(owners)
        ]
        if keys:
            self._call("clear", self.client.delete, *keys)

    def close(self) -> None:
        self.client.close()
