"""The deleted-users list: masks a deleted user's records on every read path.

The log is append-only, so ``strata delete-user`` cannot remove a user's
records from it. Instead it appends the user to
``<data_dir>/gdpr/deleted_users.json`` *before* it deletes anything else,
and every reader of the log (loader, archiver, processor, replay) drops the
user's records with ``DeletedUsers.keep_mask``. An entry masks records the
server received up to the deletion (``received_at <= deleted_at``); events
the user sends afterwards are new data. An entry is dropped once log
retention has removed every record it could match (strata.lake.retention).

A record belongs to user ``X`` when ``user_id == X`` or ``distinct_id == X``
(the second covers anonymous visitors deleted by their anonymous id).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from strata.durable import atomic_write_json, read_json


def deleted_users_path(data_path: Path) -> Path:
    return data_path / "gdpr" / "deleted_users.json"


class DeletedUsers:
    """The list, re-read whenever the file changes (cheap ``stat`` per call).

    Thread-safe. Several processes may read it; writers are the delete-user
    command and retention, which run in the process that owns the store.
    """

    def __init__(self, data_path: Path) -> None:
        self.path = deleted_users_path(data_path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, int] = {}

    def entries(self) -> dict[str, int]:
        """user id -> deletion time (epoch ms)."""
        with self._lock:
            try:
                stat = os.stat(self.path)
                stamp = (stat.st_mtime_ns, stat.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                raw = read_json(self.path, {}) or {}
                self._entries = {str(k): int(v) for k, v in raw.get("users", {}).items()}
                self._stamp = stamp
            return dict(self._entries)

    def add(self, user_id: str, deleted_at_ms: int) -> None:
        """Durably add (or refresh) an entry."""
        entries = self.entries()
        entries[user_id] = max(deleted_at_ms, entries.get(user_id, 0))
        self._save(entries)

    def remove(self, users: list[str]) -> None:
        """Drop entries (retention: the log no longer holds their records)."""
        entries = self.entries()
        self._save({u: at for u, at in entries.items() if u not in set(users)})

    def _save(self, entries: dict[str, int]) -> None:
        with self._lock:
            atomic_write_json(self.path, {"users": entries})
            self._stamp = None

    def keep_mask(self, table: pa.Table) -> np.ndarray | None:
        """Boolean mask over ``table``'s rows, False for masked records, or
        None when nothing is masked (the common case: no copy needed).

        ``table`` needs ``user_id``, ``distinct_id`` and ``received_at``
        (epoch ms as int64, or a timestamp column)."""
        entries = self.entries()
        if not entries or table.num_rows == 0:
            return None
        users = pa.array(list(entries), pa.string())
        cutoffs = pa.array(list(entries.values()), pa.int64())
        masked = np.zeros(table.num_rows, dtype=bool)
        received = table.column("received_at")
        if pa.types.is_timestamp(received.type):
            received = received.cast(pa.int64())
        received_np = received.to_numpy(zero_copy_only=False)
        for column in ("user_id", "distinct_id"):
            index = pc.index_in(table.column(column), value_set=users)
            hit = index.is_valid().to_numpy(zero_copy_only=False)
            if not hit.any():
                continue
            positions = index.fill_null(0).to_numpy(zero_copy_only=False)
            limit = cutoffs.to_numpy()[positions]
            masked |= hit & (received_np <= limit)
        if not masked.any():
            return None
        return ~masked

    def filter(self, table: pa.Table) -> pa.Table:
        """``table`` without masked records."""
        keep = self.keep_mask(table)
        return table if keep is None else table.filter(pa.array(keep))
