"""The C heap of strata's long-running processes (decision 095).

Python's large objects (the loader's joined JSON, log reads, numpy arrays,
``bytes`` over 512 B) come from glibc ``malloc``. Under sustained loading
glibc kept what they freed: its mmap threshold rises to the size of a freed
large buffer (up to 32 MiB), so later buffers land in the heap arenas, and a
thread-heavy process gets up to 8 arenas per core whose free chunks are
only returned when they sit at an arena's top. Measured in the core process
at 50k events/s (docs/benchmarks.md, "Core process memory under sustained
loading"), the arenas held 500-850 MiB of free memory after 1-3 minutes;
with the settings below they hold 10-45 MiB.

``configure`` must run before the process starts threads (the arena limit
applies to arenas created afterwards). Everything here is a no-op where
glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
import threading

from strata.config import Config, parse_duration_ms

log = logging.getLogger("strata.allocator")

# mallopt(3) parameters, from glibc's malloc.h.
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (not musl)
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = libc
        except (OSError, AttributeError):
            return None
    return _libc


def configure(*, mmap_threshold_bytes: int, arena_max: int) -> bool:
    """Apply the malloc settings; 0 leaves a setting at glibc's default.

    ``mmap_threshold_bytes``: allocations at least this big get their own
    mapping, returned to the system when freed (a fixed value also stops
    glibc from raising the threshold). ``arena_max``: most malloc arenas.
    Returns False (and changes nothing) where glibc is not the allocator.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = True
    if mmap_threshold_bytes > 0:
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold_bytes))) and ok
    if arena_max > 0:
        ok = bool(libc.mallopt(M_ARENA_MAX, int(arena_max))) and ok
    if not ok:
        log.warning(
            "allocator: mallopt refused a setting (mmap threshold %d, arenas %d)",
            mmap_threshold_bytes,
            arena_max,
        )
    return ok


def trim() -> bool:
    """Return the free pages of every malloc arena to the system
    (``malloc_trim(0)``); True if memory was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def start_trimmer(interval_s: float, stop: threading.Event) -> threading.Thread | None:
    """Call ``trim`` every ``interval_s`` seconds until ``stop`` is set, in a
    daemon thread (``None`` if ``interval_s`` <= 0 or glibc is absent).
    A trim walks the arenas under their locks: milliseconds per call."""
    if interval_s <= 0 or _glibc() is None:
        return None

    def loop() -> None:
        while not stop.wait(interval_s):
            trim()

    thread = threading.Thread(target=loop, name="malloc-trim", daemon=True)
    thread.start()
    return thread


def setup(config: Config) -> threading.Event:
    """``configure`` and ``start_trimmer`` from ``config.server``; returns the
    trimmer's stop event. Call first thing in a long-running process."""
    server = config.server
    configure(mmap_threshold_bytes=server.malloc_mmap_threshold, arena_max=server.malloc_arena_max)
    stop = threading.Event()
    start_trimmer(parse_duration_ms(server.malloc_trim_interval) / 1000, stop)
    return stop


def freeze_startup_heap(config: Config, process: str) -> int:
    """Move every object alive now into the collector's permanent generation
    (``gc.freeze()``, after one full collection) when ``server.gc_freeze``
    is on; returns how many objects were frozen (0 when off).

    Call once a long-running process has finished starting (imports, the
    pipeline, the app). A full collection traverses every tracked object;
    the ~100k objects a process creates at start-up (pandas, numpy, sqlglot,
    clickhouse-connect, the app) made each one 40-155 ms, and those pauses
    were the p99 of rollup-served queries (decision 098). Frozen objects are
    still freed by reference counting; only cycles among them stay."""
    if not config.server.gc_freeze:
        return 0
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    from strata.telemetry import REGISTRY

    REGISTRY.set("strata_gc_frozen_objects", frozen, {"process": process})
    log.info("allocator: froze %d start-up objects (%s)", frozen, process)
    return frozen
