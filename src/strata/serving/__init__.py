"""Real-time serving: the live windows the processor writes and the query
layer reads. See ``strata.serving.base`` for the contract.

``open_serving(config)`` is the one place that picks a backend.
"""

from __future__ import annotations

from strata.config import Config
from strata.serving.base import Fence, FencedError, ServingError, ServingStore, WindowKey

__all__ = ["Fence", "FencedError", "ServingError", "ServingStore", "WindowKey", "open_serving"]


def open_serving(config: Config) -> ServingStore:
    settings = config.serving
    if settings.backend == "memory":
        from strata.serving.memory import MemoryServingStore

        return MemoryServingStore()
    if settings.backend == "redis":
        from strata.serving.redis import RedisServingStore

        return RedisServingStore(settings.redis_url, prefix=settings.redis_prefix)
    raise ValueError(f"serving.backend: unknown backend {settings.backend!r}")
