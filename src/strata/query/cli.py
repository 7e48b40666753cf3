"""`strata tokens`: per-user query tokens from the command line, stored in
``<data_dir>/keys.json`` (the same Keyring as ``strata keys`` and the admin
API ``/v1/admin/tokens``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def cmd_tokens(args: argparse.Namespace) -> int:
    from strata.auth import SCOPES, Keyring
    from strata.cli import _config

    keyring = Keyring(_config(args))
    if args.action == "create":
        if not args.user:
            print("strata: tokens create: --user is required", file=sys.stderr)
            return 2
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            print(
                f"strata: tokens create: --scopes: unknown scope(s) {unknown}; "
                f"choose from {','.join(SCOPES)}",
                file=sys.stderr,
            )
            return 2
        token = keyring.create_token(args.user, scopes)
        print(json.dumps({"user": args.user, "scopes": sorted(set(scopes)), "token": token}))
        return 0
    if args.action == "revoke":
        if not args.user:
            print("strata: tokens revoke: --user is required", file=sys.stderr)
            return 2
        revoked = keyring.revoke_user(args.user)
        print(json.dumps({"user": args.user, "revoked": revoked}))
        return 0 if revoked else 1
    for entry in keyring.list_tokens():
        print(json.dumps(entry))
    return 0


def add_query_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("tokens", help="create, list and revoke per-user query tokens")
    common(p)
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("--user", help="the user the token belongs to")
    p.add_argument("--scopes", default="metrics,sql", help="comma-separated: metrics,sql,admin")
    p.set_defaults(func=cmd_tokens)
