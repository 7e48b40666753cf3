"""Write keys and query tokens.

Keys are stored as SHA-256 hashes (``<data_dir>/keys.json``) and compared in
constant time. A write key may only ingest. A query token belongs to a user
and carries scopes: ``metrics`` (metrics API, dashboard), ``sql`` (the SQL
API) and ``admin`` (keys, tokens, schemas, deletion). Keys from the config
or the environment are added on top: ``query_tokens`` get metrics+sql,
``admin_tokens`` all three. Every process re-reads keys.json within a second
of a change, so a revoked token stops working without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from strata.config import Config
from strata.durable import atomic_write_json, read_json

SCOPES = ("metrics", "sql", "admin")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    user: str
    scopes: frozenset[str]
    kind: str  # "write" or "query"


class Keyring:
    def __init__(self, config: Config) -> None:
        self.path = config.data_path / "keys.json"
        self._static: list[tuple[str, Principal]] = []
        for key in config.auth.write_keys:
            self._static.append((hash_key(key), Principal("write-key", frozenset(), "write")))
        for key in config.auth.query_tokens:
            user = f"token-{hash_key(key)[:8]}"
            self._static.append(
                (hash_key(key), Principal(user, frozenset({"metrics", "sql"}), "query"))
            )
        for key in config.auth.admin_tokens:
            user = f"admin-{hash_key(key)[:8]}"
            self._static.append((hash_key(key), Principal(user, frozenset(SCOPES), "query")))
        self._lock = threading.Lock()
        self._entries: list[tuple[str, Principal]] = []
        self._mtime = -1.0
        self._checked = 0.0
        self._reload(force=True)

    # -- storage -------------------------------------------------------------
    def _load_file(self) -> dict[str, Any]:
        data = read_json(self.path, None)
        return data if isinstance(data, dict) else {"write_keys": [], "tokens": []}

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            mtime = 0.0
        if not force and mtime == self._mtime:
            return
        data = self._load_file()
        entries = list(self._static)
        for item in data.get("write_keys", []):
            entries.append((item["hash"], Principal(item.get("name", "write-key"), frozenset(), "write")))
        for item in data.get("tokens", []):
            entries.append(
                (item["hash"], Principal(item["user"], frozenset(item["scopes"]), "query"))
            )
        with self._lock:
            self._entries = entries
            self._mtime = mtime

    def is_empty(self) -> bool:
        self._reload(force=True)
        return not any(p.kind == "write" for _, p in self._entries) or not any(
            p.kind == "query" for _, p in self._entries
        )

    # -- checks --------------------------------------------------------------
    def authenticate(self, key: str | None) -> Principal | None:
        if not key:
            return None
        self._reload()
        digest = hash_key(key)
        found: Principal | None = None
        for stored, principal in self._entries:
            # Compare every entry: the time taken does not depend on which matched.
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    # -- administration --------------------------------------------------------
    def create_write_key(self, name: str = "write-key") -> str:
        key = "sk_" + secrets.token_urlsafe(24)
        data = self._load_file()
        data.setdefault("write_keys", []).append(
            {"name": name, "hash": hash_key(key), "created_at": int(time.time())}
        )
        atomic_write_json(self.path, data)
        self._reload(force=True)
        return key

    def create_token(self, user: str, scopes: list[str]) -> str:
        unknown = set(scopes) - set(SCOPES)
        if unknown or not scopes:
            raise ValueError(f"scopes: expected a subset of {list(SCOPES)}, got {scopes}")
        token = "qt_" + secrets.token_urlsafe(24)
        data = self._load_file()
        data.setdefault("tokens", []).append(
            {"user": user, "scopes": sorted(scopes), "hash": hash_key(token), "created_at": int(time.time())}
        )
        atomic_write_json(self.path, data)
        self._reload(force=True)
        return token

    def revoke_user(self, user: str) -> int:
        data = self._load_file()
        before = len(data.get("tokens", []))
        data["tokens"] = [t for t in data.get("tokens", []) if t["user"] != user]
        atomic_write_json(self.path, data)
        self._reload(force=True)
        return before - len(data["tokens"])

    def list_tokens(self) -> list[dict[str, Any]]:
        return [
            {"user": t["user"], "scopes": t["scopes"], "created_at": t.get("created_at")}
            for t in self._load_file().get("tokens", [])
        ]


def ensure_initial_keys(config: Config) -> tuple[str, str] | None:
    """On a first start with no keys at all, create one write key and one
    admin token, write them to ``<data_dir>/initial-credentials`` (mode 0600)
    and return them, so ``strata serve`` can print them."""
    keyring = Keyring(config)
    if not keyring.is_empty():
        return None
    write_key = keyring.create_write_key("initial")
    token = keyring.create_token("admin", list(SCOPES))
    path = config.data_path / "initial-credentials"
    path.write_text(f"write_key = {write_key}\nquery_token = {token}\n")
    path.chmod(0o600)
    return write_key, token


def bearer(headers: Any) -> str | None:
    """The key from ``Authorization: Bearer KEY`` or HTTP Basic (user name =
    key, as Segment's SDKs send it)."""
    value = headers.get("authorization") or ""
    scheme, _, credential = value.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return credential.strip() or None
    if scheme == "basic":
        import base64
        import binascii

        try:
            decoded = base64.b64decode(credential.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None
    return None
