"""The query layer: metrics API, sandboxed SQL, routing, caching, limits."""
