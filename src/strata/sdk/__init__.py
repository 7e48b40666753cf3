"""strata's Python SDK: ``Client`` and ``AsyncClient`` send events with
client-side batching, retries and the same event_ids on every retry.

Importable without the server's dependencies (standard library + httpx).
"""

from strata.sdk._core import OVERFLOW_POLICIES, ClientStats, OverflowPolicy, QueueFull
from strata.sdk.client import AsyncClient, Client

__all__ = ["OVERFLOW_POLICIES", "AsyncClient", "Client", "ClientStats", "OverflowPolicy", "QueueFull"]
