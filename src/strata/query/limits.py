"""Per-user fairness: a token-bucket rate limit and a cap on concurrent
heavy (raw-events) queries, in-process or in Redis.

Token bucket (per user): ``burst`` tokens, refilled at ``rate_per_minute``;
each request costs one token. A request that finds fewer than one token is
refused with the seconds until one is available (HTTP 429 + Retry-After).
The defaults (600/min, burst 120) let a dashboard of ten panels refreshing
every 2 s (300/min) run forever, while a burst of a few hundred queries
from one user is cut after the first 120 (docs/query.md).

Heavy queries (those the router sends to the raw events) also take a slot
from a per-user semaphore of ``max_concurrent_heavy``. In Redis a slot is a
lease that expires after ``lease_ms``, so a crashed API process cannot leak
slots forever.

The Redis backends keep state in Redis only, so every API process sharing
one Redis enforces one limit per user. Both backends use the clock of their
state holder (Redis ``TIME`` for Redis), so API processes with skewed
clocks agree. Why not the ``limits`` library: decision 021.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from strata.config import QueryConfig


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float  # 0 when allowed
    remaining: float  # tokens left after this request

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass(frozen=True)
class UserLimit:
    rate_per_minute: float
    burst: int
    max_concurrent_heavy: int


class RateLimitExceeded(Exception):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# -- token buckets ----------------------------------------------------------------
class TokenBuckets(ABC):
    """Interface: ``take(user, limit, cost)`` -> Decision, atomically."""

    @abstractmethod
    def take(self, user: str, limit: UserLimit, cost: float = 1.0) -> Decision:
        """See the class docstring."""

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing
        """Release connections; the in-process backends have none."""


class MemoryTokenBuckets(TokenBuckets):
    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, user: str, limit: UserLimit, cost: float = 1.0) -> Decision:
        rate_per_s = limit.rate_per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, updated = self._state.get(user, (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + (now - updated) * rate_per_s)
            if tokens >= cost:
                self._state[user] = (tokens - cost, now)
                return Decision(True, 0.0, tokens - cost)
            self._state[user] = (tokens, now)
        wait = (cost - tokens) / rate_per_s if rate_per_s > 0 else 3600.0
        return Decision(False, wait, tokens)


_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
elseif rate > 0 then
  wait = (cost - tokens) / rate
else
  wait = 3600000
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
local ttl = 60000
if rate > 0 then ttl = math.ceil(burst / rate) + 1000 end
redis.call('PEXPIRE', KEYS[1], ttl)
return {allowed, tostring(wait), tostring(tokens)}
"""


class RedisTokenBuckets(TokenBuckets):
    def __init__(self, url: str, prefix: str = "strata:rl:") -> None:
        import redis

        self.redis: Any = redis.Redis.from_url(url)
        self.prefix = prefix
        self._script = self.redis.register_script(_BUCKET_LUA)

    def take(self, user: str, limit: UserLimit, cost: float = 1.0) -> Decision:
        rate_per_ms = limit.rate_per_minute / 60_000.0
        allowed, wait_ms, tokens = self._script(
            keys=[self.prefix + user], args=[repr(rate_per_ms), limit.burst, cost]
        )
        return Decision(bool(int(allowed)), float(wait_ms) / 1000.0, float(tokens))

    def close(self) -> None:
        self.redis.close()


# -- heavy-query slots ---------------------------------------------------------------
class HeavySlots(ABC):
    """Interface: ``acquire(user, limit)`` -> a slot id or None when the user
    already runs ``limit`` heavy queries; ``release(user, slot)``."""

    @abstractmethod
    def acquire(self, user: str, limit: int) -> str | None:
        """See the class docstring."""

    @abstractmethod
    def release(self, user: str, slot: str) -> None:
        """See the class docstring."""

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing
        """Release connections; the in-process backends have none."""


class MemoryHeavySlots(HeavySlots):
    def __init__(self) -> None:
        self._running: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def acquire(self, user: str, limit: int) -> str | None:
        with self._lock:
            running = self._running.setdefault(user, set())
            if len(running) >= limit:
                return None
            slot = uuid.uuid4().hex
            running.add(slot)
            return slot

    def release(self, user: str, slot: str) -> None:
        with self._lock:
            self._running.get(user, set()).discard(slot)


_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


class RedisHeavySlots(HeavySlots):
    def __init__(self, url: str, lease_ms: int, prefix: str = "strata:heavy:") -> None:
        import redis

        self.redis: Any = redis.Redis.from_url(url)
        self.lease_ms = lease_ms
        self.prefix = prefix
        self._acquire = self.redis.register_script(_ACQUIRE_LUA)

    def acquire(self, user: str, limit: int) -> str | None:
        slot = uuid.uuid4().hex
        ok = self._acquire(keys=[self.prefix + user], args=[limit, self.lease_ms, slot])
        return slot if int(ok) else None

    def release(self, user: str, slot: str) -> None:
        self.redis.zrem(self.prefix + user, slot)

    def close(self) -> None:
        self.redis.close()


# -- the policy ------------------------------------------------------------------------
class QueryLimits:
    """The per-user policy over a pair of backends. ``check(user)`` raises
    RateLimitExceeded when the bucket is empty; ``heavy(user)`` is a context
    manager that raises it when the user's heavy slots are all taken."""

    def __init__(
        self, config: QueryConfig, buckets: TokenBuckets, slots: HeavySlots, backend: str
    ) -> None:
        self.config = config
        self.buckets = buckets
        self.slots = slots
        self.backend = backend
        self.refused = 0

    def limit_for(self, user: str) -> UserLimit:
        override = self.config.user_limits.get(user)
        default = UserLimit(
            float(self.config.rate_limit_per_minute),
            self.config.rate_limit_burst,
            self.config.max_concurrent_heavy,
        )
        if override is None:
            return default
        return UserLimit(
            float(override.rate_limit_per_minute or default.rate_per_minute),
            override.rate_limit_burst or default.burst,
            override.max_concurrent_heavy or default.max_concurrent_heavy,
        )

    def check(self, user: str, cost: float = 1.0) -> Decision:
        limit = self.limit_for(user)
        decision = self.buckets.take(user, limit, cost)
        if not decision.allowed:
            self.refused += 1
            raise RateLimitExceeded(
                f"rate limit: {user!r} may send {limit.rate_per_minute:g} queries per minute "
                f"(burst {limit.burst}); retry in {decision.retry_after_s:.1f} s",
                decision.retry_after_s,
            )
        return decision

    @contextmanager
    def heavy(self, user: str) -> Iterator[None]:
        limit = self.limit_for(user).max_concurrent_heavy
        slot = self.slots.acquire(user, limit)
        if slot is None:
            self.refused += 1
            raise RateLimitExceeded(
                f"rate limit: {user!r} already runs {limit} heavy (raw-events) "
                "queries; wait for one to finish",
                1.0,
            )
        try:
            yield
        finally:
            self.slots.release(user, slot)

    def close(self) -> None:
        self.buckets.close()
        self.slots.close()


def open_limits(
    config: QueryConfig, *, redis_url: str = "", redis_prefix: str = "strata:"
) -> QueryLimits:
    """The one place that picks the limiter backends (``query.backend``). On
    Redis the buckets and heavy slots live under ``<redis_prefix>rl:`` and
    ``<redis_prefix>heavy:`` (``serving.redis_prefix``), one set per deployment."""
    if config.backend == "memory":
        return QueryLimits(config, MemoryTokenBuckets(), MemoryHeavySlots(), "memory")
    if config.backend == "redis":
        lease_ms = int(config.sql_max_execution_s * 1000) + 30_000
        return QueryLimits(
            config,
            RedisTokenBuckets(redis_url, prefix=f"{redis_prefix}rl:"),
            RedisHeavySlots(redis_url, lease_ms, prefix=f"{redis_prefix}heavy:"),
            "redis",
        )
    raise ValueError(f"query.backend: unknown backend {config.backend!r}")
