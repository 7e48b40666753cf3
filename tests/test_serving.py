"""The ServingStore contract, one suite for both backends (in-process and a
real redis-server started by the fixture)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from strata.config import MetricConfig, load_config
from strata.metrics import compile_metric
from strata.serving import ServingStore, open_serving
from strata.serving.memory import MemoryServingStore
from strata.serving.redis import RedisServingStore
from strata.serving.state import (
    UniqSketch,
    WindowState,
    decode_state,
    encode_state,
    finalize,
    merge_values,
)

METRIC = compile_metric(
    MetricConfig(
        name="m",
        dimensions=["country"],
        aggregations={
            "n": "count()",
            "users": "uniq(user_id)",
            "rev": "sum(revenue)",
            "top": "max(revenue)",
        },
    )
)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[ServingStore]:
    if request.param == "memory":
        subject: ServingStore = MemoryServingStore()
    else:
        url = request.getfixturevalue("redis_url")
        subject = RedisServingStore(url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield subject
    subject.clear()
    subject.close()


def sketch(*users: str) -> bytes:
    import pyarrow as pa

    from strata.serving.state import hash_strings

    s = UniqSketch()
    s.add_hashes(np.unique(hash_strings(pa.array(list(users)))))
    return s.to_bytes()


def state(
    start: int, dims: list[str], count: int, users: tuple[str, ...], shard: str = "all", **kw
) -> WindowState:
    return WindowState(
        metric="m",
        shard=shard,
        window_start=start,
        window_end=start + 300_000,
        dims=dims,
        count=count,
        values=[None, sketch(*users), float(count), float(count)],
        **kw,
    )


def test_put_replaces_full_state_idempotently(store: ServingStore) -> None:
    store.put_windows([state(0, ["DE"], 1, ("a",))])
    store.put_windows([state(0, ["DE"], 3, ("a", "b"))])
    store.put_windows([state(0, ["DE"], 3, ("a", "b"))])  # a replay: same result
    [got] = store.windows("m", 0, 1)
    assert got == state(0, ["DE"], 3, ("a", "b"))


def test_range_reads_shards_and_order(store: ServingStore) -> None:
    store.put_windows(
        [
            state(600_000, ["FR"], 1, ("c",)),
            state(0, ["DE"], 1, ("a",), shard="p1"),
            state(0, ["DE"], 2, ("a", "b"), shard="p0"),
            state(300_000, ["DE"], 5, ("x",), final=True, revision=2),
        ]
    )
    got = store.windows("m", 0, 600_000)
    assert [(s.window_start, s.shard) for s in got] == [(0, "p0"), (0, "p1"), (300_000, "all")]
    assert got[2].final and got[2].revision == 2
    assert store.windows("m", 600_000, 600_001)[0].dims == ["FR"]
    assert store.windows("other", 0, 10**12) == []
    # Shards merge: counts add, distinct users do not double count.
    count, values = merge_values(METRIC, got[:2])
    assert finalize(METRIC, count, values) == {"n": 3, "users": 2, "rev": 3.0, "top": 2.0}


def test_delete_is_idempotent_and_keeps_other_groups(store: ServingStore) -> None:
    store.put_windows([state(0, ["DE"], 1, ("a",)), state(0, ["FR"], 1, ("b",))])
    store.delete_windows(
        [("m", "all", 0, ("DE",)), ("m", "all", 0, ("DE",)), ("m", "all", 5, ("X",))]
    )
    assert [s.dims for s in store.windows("m", 0, 1)] == [["FR"]]
    store.delete_windows([("m", "all", 0, ("FR",))])
    assert store.windows("m", 0, 1) == []
    store.put_windows([state(0, ["DE"], 7, ("a",))])  # the window comes back
    assert [s.count for s in store.windows("m", 0, 1)] == [7]


def test_revised_ranges_and_progress(store: ServingStore) -> None:
    store.add_revised("m", [(0, 300_000), (600_000, 900_000)])
    store.add_revised("m", [(0, 300_000)])
    assert store.revised("m", 0, 10**9) == [(0, 300_000), (600_000, 900_000)]
    assert store.revised("m", 299_999, 300_000) == [(0, 300_000)]
    assert store.revised("m", 300_000, 600_000) == []
    store.set_progress("p0", {"m": 5})
    store.set_progress("p1", {"m": 7})
    store.set_progress("p0", {"m": 9})
    assert store.progress() == {"p0": {"m": 9}, "p1": {"m": 7}}


def test_state_encoding_roundtrip() -> None:
    s = state(0, ["DE"], 2, ("a", "b"), final=True, revision=1)
    assert decode_state(encode_state(s)) == s


def test_open_serving_picks_backend(redis_url: str, tmp_path) -> None:  # noqa: F811
    memory = open_serving(load_config(overrides={"data_dir": str(tmp_path)}))
    assert isinstance(memory, MemoryServingStore)
    remote = open_serving(
        load_config(
            overrides={
                "data_dir": str(tmp_path),
                "serving.backend": "redis",
                "serving.redis_url": redis_url,
            }
        )
    )
    assert isinstance(remote, RedisServingStore)
    remote.close()


def test_fenced_writes_need_the_current_owner_epoch(store: ServingStore) -> None:
    """claim() supersedes every earlier fence of the shard: a stale fence's
    writes raise FencedError and change nothing; unfenced writes still work;
    clear() keeps the epochs (decision 090)."""
    from strata.serving import FencedError

    old = store.claim("p0")
    store.put_windows([state(0, ["DE"], 1, ("a",), shard="p0")], fence=old)
    store.set_progress("p0", {"m": 5}, fence=old)
    new = store.claim("p0")
    assert new.epoch == old.epoch + 1 and store.claim("p1").epoch == 1
    store.put_windows([state(0, ["DE"], 2, ("a", "b"), shard="p0")], fence=new)
    attempts = [
        lambda: store.put_windows([state(0, ["DE"], 9, ("z",), shard="p0")], fence=old),
        lambda: store.delete_windows([("m", "p0", 0, ("DE",))], fence=old),
        lambda: store.add_revised("m", [(0, 300_000)], fence=old),
        lambda: store.set_progress("p0", {"m": 1}, fence=old),
        lambda: store.check_fence(old),
    ]
    for attempt in attempts:
        with pytest.raises(FencedError, match="superseded by epoch"):
            attempt()
    [kept] = store.windows("m", 0, 300_000)
    assert kept.count == 2 and store.progress() == {"p0": {"m": 5}}
    assert store.revised("m", 0, 300_000) == []
    store.check_fence(new)
    store.put_windows([state(300_000, ["FR"], 1, ("c",), shard="all")])  # unfenced
    store.clear()
    assert store.claim("p0").epoch == new.epoch + 1
