"""Admin API for per-user query tokens (``admin`` scope), over
``strata.auth.Keyring`` -- the same store as ``strata keys``/``strata tokens``.

* ``POST /v1/admin/tokens`` ``{"user": "ana", "scopes": ["metrics", "sql"]}``
  -> 201 ``{"user", "scopes", "token"}``; the token is shown only here.
* ``GET /v1/admin/tokens`` -> ``{"tokens": [{"user", "scopes", "created_at"}]}``
  (hashes and tokens are never returned).
* ``DELETE /v1/admin/tokens/{user}`` -> ``{"user", "revoked": n}``; every
  process stops accepting the user's tokens within a second.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.routing import Route

from strata.auth import SCOPES
from strata.query.api import JSON, APIError, CoreAPI, json_endpoint

_USER = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")


class TokenAdmin:
    def __init__(self, api: CoreAPI) -> None:
        self.api = api

    async def create(self, request: Request) -> Any:
        self.api.require(request, "admin")
        try:
            payload = msgspec.json.decode(await request.body(), type=dict[str, Any])
        except msgspec.MsgspecError as exc:
            raise APIError(400, f"body: malformed JSON: {exc}") from exc
        user = payload.get("user")
        if not isinstance(user, str) or not _USER.match(user):
            raise APIError(400, "user: required, 1-128 characters of A-Z a-z 0-9 _ . @ -")
        scopes = payload.get("scopes", ["metrics", "sql"])
        if (
            not isinstance(scopes, list)
            or not scopes
            or not all(isinstance(s, str) and s in SCOPES for s in scopes)
        ):
            raise APIError(400, f"scopes: expected a non-empty subset of {list(SCOPES)}")
        token = self.api.pipeline.keyring.create_token(user, sorted(set(scopes)))
        return JSON({"user": user, "scopes": sorted(set(scopes)), "token": token}, status_code=201)

    async def list(self, request: Request) -> Any:
        self.api.require(request, "admin")
        return {"tokens": self.api.pipeline.keyring.list_tokens()}

    async def revoke(self, request: Request) -> Any:
        self.api.require(request, "admin")
        user = request.path_params["user"]
        if not _USER.match(user):
            raise APIError(400, "user: invalid user name")
        revoked = self.api.pipeline.keyring.revoke_user(user)
        if not revoked:
            raise APIError(404, f"user: no tokens for {user!r}")
        return {"user": user, "revoked": revoked}


def token_routes(api: CoreAPI) -> list[Route]:
    admin = TokenAdmin(api)
    return [
        Route("/v1/admin/tokens", json_endpoint(admin.create), methods=["POST"]),
        Route("/v1/admin/tokens", json_endpoint(admin.list), methods=["GET"]),
        Route("/v1/admin/tokens/{user}", json_endpoint(admin.revoke), methods=["DELETE"]),
    ]
