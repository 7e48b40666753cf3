"""The memory bounds of decision 095: chDB's caches as configured, the raw
table's primary index in the bounded cache, glibc malloc handing large
freed buffers back instead of keeping them in its arenas, and the embedded
log's batch index at 3 int64 per batch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from strata.config import ConfigError, load_config
from strata.store import Store
from strata.store.client import chdb_server_settings


def test_chdb_server_settings_bound_every_cache_and_extras_win() -> None:
    settings = chdb_server_settings(
        cache_bytes=1000, max_memory_bytes=0, extra={"mark_cache_size": "7"}
    )
    assert settings == {
        "mark_cache_size": "7",
        "index_mark_cache_size": "1000",
        "primary_index_cache_size": "1000",
    }
    assert chdb_server_settings(cache_bytes=1, max_memory_bytes=5)["max_server_memory_usage"] == "5"


def test_store_opens_chdb_with_the_configured_bounds(tmp_path: Path) -> None:
    config = load_config(
        overrides={
            "data_dir": str(tmp_path),
            "store": {
                "chdb_cache_bytes": 123_456_789,
                "chdb_max_memory_bytes": 3_000_000_000,
                "chdb_settings": {"query_condition_cache_size": "4242"},
            },
        },
        environ={},
    )
    store = Store.open(config)
    try:
        _, rows = store.query_rows(
            "SELECT name, value FROM system.server_settings WHERE name IN {names:Array(String)}",
            {"names": ["mark_cache_size", "index_mark_cache_size", "primary_index_cache_size",
                       "max_server_memory_usage", "query_condition_cache_size"]},
        )
        assert dict(rows) == {
            "mark_cache_size": "123456789",
            "index_mark_cache_size": "123456789",
            "primary_index_cache_size": "123456789",
            "max_server_memory_usage": "3000000000",
            "query_condition_cache_size": "4242",
        }
        # The raw table's primary index is loaded into that cache, not kept
        # per part for the part's life.
        count = 50_000
        store.insert_arrow("events", pa.table({
            "event_id": [f"e{i}" for i in range(count)],
            "event_type": ["page_view"] * count,
            "distinct_id": [f"u{i % 997}" for i in range(count)],
            "ts": pa.array([1_790_000_000_000 + i for i in range(count)], pa.timestamp("ms")),
        }))
        assert store.scalar("SELECT count() FROM events WHERE event_type = 'page_view' "
                            "AND distinct_id = 'u5'") == len(range(5, count, 997))
        assert store.scalar("SELECT sum(primary_key_bytes_in_memory) FROM system.parts "
                            "WHERE active AND database = currentDatabase() "
                            "AND table = 'events'") == 0
        assert store.scalar("SELECT value FROM system.metrics "
                            "WHERE metric = 'PrimaryIndexCacheBytes'") > 0
    finally:
        store.close()


@pytest.mark.parametrize(
    "field, value",
    [
        ("server.malloc_mmap_threshold", -1),
        ("server.malloc_arena_max", -1),
        ("server.malloc_trim_interval", "soon"),
        ("store.chdb_cache_bytes", -1),
        ("store.chdb_max_memory_bytes", -5),
    ],
)
def test_memory_settings_are_validated(field: str, value: object) -> None:
    section, name = field.split(".")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides={section: {name: value}}, environ={})


# Freed large buffers with small live objects allocated between them: the
# pattern of the loader's joined JSON and log reads next to long-lived
# buffers. glibc raises its mmap threshold after the first large free, so
# later large buffers come from the heap, and the live small chunks above
# them keep the freed space in the arena.
FRAGMENT = textwrap.dedent(
    """
    import ctypes, json, sys
    from strata import allocator
    if sys.argv[1] == "bounded":
        assert allocator.configure(mmap_threshold_bytes=1 << 20, arena_max=2)
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    first = bytearray(2 << 20)
    del first  # one large free: glibc raises its mmap threshold past 2 MiB
    big, pinned = [], []
    for i in range(64):
        big.append(bytearray(2 << 20))
        pinned.append(bytes(1000 + i))  # malloc'd (over pymalloc's 512 B), stays alive
    del big
    print(json.dumps({"free_in_arenas": libc.mallinfo2().fordblks}))
    """
)


def _free_in_arenas(variant: str) -> int:
    result = subprocess.run([sys.executable, "-c", FRAGMENT, variant], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["free_in_arenas"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_large_freed_buffers_go_back_to_the_system_not_the_arenas() -> None:
    from strata import allocator

    if allocator._glibc() is None:
        pytest.skip("not glibc")
    # Control: with glibc's defaults the 128 MiB freed stay in the arenas ...
    assert _free_in_arenas("default") > 64 << 20
    # ... with strata's settings they were separate mappings, unmapped on free.
    assert _free_in_arenas("bounded") < 16 << 20


def test_embedded_log_index_costs_at_most_40_bytes_per_batch(tmp_path: Path) -> None:
    """Every process that opens the log holds the index of every batch until
    retention deletes its segment: 3 int64 per batch (lists of Python ints
    took 125 B)."""
    import tracemalloc

    from strata.log.embedded import EmbeddedLog

    log = EmbeddedLog(tmp_path / "log", fsync="never")
    try:
        log.create_topic("events", 1)
        producer = log.producer()
        for _ in range(500):  # warm up buffers and the first segment
            producer.produce("events", 0, None, b"x" * 100)
            producer.flush()
        batches = 10_000
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for _ in range(batches):
                producer.produce("events", 0, None, b"x" * 100)
                producer.flush()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        assert log.end_offsets("events") == {0: 500 + batches}
        assert grown / batches <= 40, f"{grown / batches:.1f} B per batch"
    finally:
        log.close()
