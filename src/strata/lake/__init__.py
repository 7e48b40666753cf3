"""The lake: the Parquet archive of raw events and everything built on it
(archiver, batch recompute and backfill, replay, retention, user deletion).

See docs/storage.md. ``Lake.open(config)`` is the one place that resolves the
lake's filesystem (local by default, S3 or any pyarrow filesystem by URI).
"""

from strata.lake.base import LAKE_SCHEMA, Lake, LakeError, LakeFile

__all__ = ["LAKE_SCHEMA", "Lake", "LakeError", "LakeFile"]
