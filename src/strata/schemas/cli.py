"""`strata schema add|list|show|mode` and `strata quarantine replay`.

With a running server (found through ``--url``, ``STRATA_URL`` or
``<data_dir>/run/serve.json``) the commands go through its admin API: the
core process owns chDB (one process per data directory), and replay needs
it. Without one they work on the data directory directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Common = Callable[[argparse.ArgumentParser], None]


def add_commands(sub: Any, common: Common) -> None:
    """Register the subcommands on the `strata` parser."""
    p = sub.add_parser("schema", help="manage event schemas (registry)")
    actions = p.add_subparsers(dest="schema_action", required=True)
    a = actions.add_parser("add", help="register a new version of an event type's schema")
    common(a)
    a.add_argument("event_type")
    a.add_argument("file", help="JSON Schema file for the properties object ('-' for stdin)")
    a.add_argument("--mode", choices=["BACKWARD", "FORWARD", "FULL", "NONE"])
    a = actions.add_parser("list", help="list event types with schemas")
    common(a)
    a = actions.add_parser("show", help="show an event type's versions or one version")
    common(a)
    a.add_argument("event_type")
    a.add_argument("--version", help="a version number or 'latest'")
    a = actions.add_parser("mode", help="set an event type's compatibility mode")
    common(a)
    a.add_argument("event_type")
    a.add_argument("mode", choices=["BACKWARD", "FORWARD", "FULL", "NONE"])
    for a in actions.choices.values():
        a.add_argument("--url")
        a.add_argument("--token")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("quarantine", help="quarantined events")
    actions = p.add_subparsers(dest="quarantine_action", required=True)
    a = actions.add_parser("replay", help="append quarantined events that now validate to events")
    common(a)
    a.add_argument("--event-type")
    a.add_argument("--url")
    a.add_argument("--token")
    p.set_defaults(func=cmd_quarantine)


def _fail(message: str, code: int = 2) -> int:
    print(f"strata: {message}", file=sys.stderr)
    return code


def _server(args: argparse.Namespace) -> tuple[Any, str | None, str | None]:
    from strata.cli import _config, _server_url, _token

    config = _config(args)
    url = _server_url(config, args.url)
    if url is not None and not args.url:
        import httpx

        try:  # serve.json outlives a killed server
            httpx.get(f"{url}/healthz", timeout=3)
        except httpx.HTTPError:
            url = None
    return config, url, _token(config, args.token)


def _call(method: str, url: str, token: str | None, body: Any = None) -> tuple[int, Any]:
    import httpx

    if token is None:
        raise SystemExit(_fail("an admin token is required (--token or STRATA_TOKEN)"))
    response = httpx.request(
        method, url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=300
    )
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": response.text}
    return response.status_code, payload


def _print(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def cmd_schema(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from strata.schemas import IncompatibleSchema, SchemaError, SchemaRegistry, UnknownSchema

    config, url, token = _server(args)
    action = args.schema_action
    schema: Any = None
    if action == "add":
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            schema = json.loads(text)
        except OSError as exc:
            return _fail(f"schema add: cannot read {args.file}: {exc}")
        except json.JSONDecodeError as exc:
            return _fail(f"schema add: {args.file} is not valid JSON: {exc}")
    if url is not None:
        base = f"{url}/v1/schemas"
        subject = f"{base}/{quote(args.event_type, safe='')}" if action != "list" else base
        if action == "add":
            status, payload = _call("POST", subject, token, {"schema": schema, "mode": args.mode})
        elif action == "list":
            status, payload = _call("GET", base, token)
        elif action == "show":
            target = f"{subject}/versions/{args.version}" if args.version else subject
            status, payload = _call("GET", target, token)
        else:
            status, payload = _call("PUT", f"{subject}/mode", token, {"mode": args.mode})
        if status >= 400:
            for problem in payload.get("problems", []):
                print(f"  {problem}", file=sys.stderr)
            return _fail(f"schema {action}: {payload.get('error')}", 1)
        _print(payload)
        return 0
    registry = SchemaRegistry(
        config.data_path / "schemas", default_mode=config.schemas.default_mode
    )
    try:
        if action == "add":
            _print(registry.register(args.event_type, schema, mode=args.mode))
        elif action == "list":
            _print({"subjects": registry.subjects()})
        elif action == "show":
            if args.version:
                version = None if args.version == "latest" else int(args.version)
                _print(registry.get(args.event_type, version))
            else:
                _print(registry.subject(args.event_type))
        else:
            _print(registry.set_mode(args.event_type, args.mode))
    except IncompatibleSchema as exc:
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return _fail(f"schema {action}: {exc}", 1)
    except (SchemaError, UnknownSchema, ValueError) as exc:
        return _fail(f"schema {action}: {exc}", 1)
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    config, url, token = _server(args)
    if url is not None:
        status, payload = _call(
            "POST", f"{url}/v1/quarantine/replay", token, {"event_type": args.event_type}
        )
        if status >= 400:
            return _fail(f"quarantine replay: {payload.get('error')}", 1)
        _print(payload)
        return 0
    from strata.log import open_log
    from strata.schemas import SchemaRegistry
    from strata.schemas.quarantine import replay
    from strata.store import Store

    log = open_log(config)
    try:
        store = Store.open(config)
    except Exception as exc:
        log.close()
        return _fail(f"quarantine replay: cannot open the store ({exc}); is serve running?")
    try:
        registry = SchemaRegistry(config.data_path / "schemas")
        _print(replay(config, store, log, registry, event_type=args.event_type))
    finally:
        store.close()
        log.close()
    return 0
