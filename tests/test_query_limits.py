"""Rate limits, heavy-query slots and the result cache, in-process and in a
real redis-server (started on a free loopback port, killed by PID)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from strata.config import load_config
from strata.query.cache import MemoryCache, RedisCache, ResultCache, fingerprint
from strata.query.limits import QueryLimits, RateLimitExceeded, open_limits
from strata.query.results import QueryResult
from strata.query.router import TimeRange


def _limits(backend: str, redis_url: str = "", **query: object) -> QueryLimits:
    config = load_config(
        overrides={
            **{f"query.{k}": v for k, v in query.items()},
            "query.backend": backend,
            "query.redis_url": redis_url,
        }
    )
    return open_limits(config.query, redis_url=redis_url)


def _burst(limits: QueryLimits, user: str, n: int) -> list[bool]:
    out = []
    for _ in range(n):
        try:
            limits.check(user)
            out.append(True)
        except RateLimitExceeded as exc:
            assert exc.retry_after_s > 0
            out.append(False)
    return out


def test_memory_bucket_cuts_a_burst_per_user() -> None:
    limits = _limits("memory", rate_limit_per_minute=1, rate_limit_burst=5)
    assert _burst(limits, "a", 8) == [True] * 5 + [False] * 3
    assert _burst(limits, "b", 1) == [True]


def test_defaults_spare_a_dashboard_but_stop_a_burst() -> None:
    limits = _limits("memory")
    # A burst of 300 queries at once from one user is cut at the burst size.
    allowed = sum(_burst(limits, "burst", 300))
    assert 100 <= allowed < 300
    # Ten panels every 2 s need 300 per minute; the default refill is 600/min.
    assert limits.limit_for("dash").rate_per_minute >= 300


def test_per_user_override() -> None:
    limits = _limits("memory", rate_limit_burst=2, user_limits={"vip": {"rate_limit_burst": 50}})
    assert sum(_burst(limits, "vip", 60)) == 50
    assert sum(_burst(limits, "plain", 10)) == 2


def test_heavy_slots_are_per_user_and_released() -> None:
    limits = _limits("memory", max_concurrent_heavy=1)
    with limits.heavy("a"):
        with pytest.raises(RateLimitExceeded), limits.heavy("a"):
            pass
        with limits.heavy("b"):
            pass
    with limits.heavy("a"):
        pass


def test_redis_bucket_is_shared_by_two_api_processes(redis_url: str) -> None:
    first = _limits("redis", redis_url, rate_limit_per_minute=1, rate_limit_burst=6)
    second = _limits("redis", redis_url, rate_limit_per_minute=1, rate_limit_burst=6)
    results = []
    for i in range(10):
        results += _burst(first if i % 2 else second, "shared-user", 1)
    assert results[:6] == [True] * 6 and not any(results[6:])
    # Another user is not affected.
    assert _burst(second, "someone-else", 1) == [True]
    first.close()
    second.close()


def test_redis_heavy_slots_shared(redis_url: str) -> None:
    first = _limits("redis", redis_url, max_concurrent_heavy=1)
    second = _limits("redis", redis_url, max_concurrent_heavy=1)
    with first.heavy("h"):
        with pytest.raises(RateLimitExceeded), second.heavy("h"):
            pass
    with second.heavy("h"):
        pass


@pytest.fixture(params=["memory", "redis"])
def cache(request: pytest.FixtureRequest, redis_url: str) -> Iterator[ResultCache]:
    backend: ResultCache = MemoryCache() if request.param == "memory" else RedisCache(redis_url)
    backend.clear()
    yield backend
    backend.close()


def test_cache_roundtrip_and_range_invalidation(cache: ResultCache) -> None:
    from datetime import date, datetime
    from decimal import Decimal

    result = QueryResult(
        ["t", "d", "n", "x", "s"],
        [(datetime(2026, 1, 1, 0, 5), date(2026, 1, 1), 3, Decimal("1.5"), "US")],
        {"served_from": "rollup_5m"},
    )
    day = TimeRange(1_000_000, 2_000_000)
    key_a = fingerprint("SELECT 1", day, "alice")
    key_b = fingerprint("SELECT 1", day, "bob")
    assert key_a != key_b
    other = QueryResult(["x"], [(1,)])
    cache.put(key_a, result, 60_000, day)
    disjoint = TimeRange(5_000_000, 6_000_000)
    cache.put(fingerprint("SELECT 2", disjoint, "alice"), other, 60_000, disjoint)
    cache.put(fingerprint("SELECT 3", TimeRange(), "alice"), other, 60_000, TimeRange())
    cached = cache.get(key_a)
    assert cached is not None and cached.rows == result.rows and cached.columns == result.columns
    assert cached.meta == {"served_from": "rollup_5m"}
    cached.meta["cache"] = "hit"  # a caller's change does not leak into the entry
    again = cache.get(key_a)
    assert again is not None and "cache" not in again.meta
    assert cache.get(key_b) is None
    # A revision of [1.5M, 1.6M) removes the overlapping entry and the
    # unbounded one, and keeps the disjoint one.
    assert cache.invalidate(1_500_000, 1_600_000) == 2
    assert cache.get(key_a) is None
    kept = cache.get(fingerprint("SELECT 2", TimeRange(5_000_000, 6_000_000), "alice"))
    assert kept is not None and kept.rows == [(1,)]


def test_cache_entries_expire(cache: ResultCache) -> None:
    key = fingerprint("SELECT 9", TimeRange(), "u")
    cache.put(key, QueryResult(["v"], [(1,)]), 50, TimeRange())
    deadline = time.monotonic() + 10
    while cache.get(key) is not None:
        assert time.monotonic() < deadline, "entry never expired"
        time.sleep(0.05)


def test_tokens_cli_creates_lists_and_revokes(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from strata.auth import Keyring
    from strata.cli import main

    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as done:
            main(["tokens", *argv, "--data-dir", str(tmp_path)])
        return int(done.value.code or 0)

    assert run("create", "--user", "ana", "--scopes", "metrics") == 0
    token = json.loads(capsys.readouterr().out)["token"]
    keyring = Keyring(load_config(overrides={"data_dir": str(tmp_path)}))
    principal = keyring.authenticate(token)
    assert principal is not None and principal.user == "ana"
    assert principal.scopes == frozenset({"metrics"})
    assert run("list") == 0 and '"ana"' in capsys.readouterr().out
    assert run("create", "--user", "bo", "--scopes", "root") == 2
    assert "scope" in capsys.readouterr().err
    assert run("revoke", "--user", "ana") == 0
    assert Keyring(load_config(overrides={"data_dir": str(tmp_path)})).authenticate(token) is None
