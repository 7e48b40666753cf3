"""The `strata` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from strata.config import Config, ConfigError, load_config


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "port", None) is not None:
        overrides["server.port"] = args.port
    if getattr(args, "host", None):
        overrides["server.host"] = args.host
    if getattr(args, "workers", None) is not None:
        overrides["server.ingest_workers"] = args.workers
    return load_config(getattr(args, "config", None), overrides=overrides)


def _server_url(config: Config, explicit: str | None) -> str | None:
    if explicit:
        return explicit.rstrip("/")
    if os.environ.get("STRATA_URL"):
        return os.environ["STRATA_URL"].rstrip("/")
    info = config.data_path / "run" / "serve.json"
    if info.exists():
        return str(json.loads(info.read_text())["url"])
    return None


def _token(config: Config, explicit: str | None, kind: str = "query_token") -> str | None:
    if explicit:
        return explicit
    env = os.environ.get("STRATA_TOKEN" if kind == "query_token" else "STRATA_WRITE_KEY")
    if env:
        return env
    listed = config.auth.admin_tokens or config.auth.query_tokens if kind == "query_token" else config.auth.write_keys
    if listed:
        return listed[0]
    creds = config.data_path / "initial-credentials"
    if creds.exists():
        for line in creds.read_text().splitlines():
            name, _, value = line.partition(" = ")
            if name.strip() == kind:
                return value.strip()
    return None


def _fail(message: str, code: int = 2) -> int:
    print(f"strata: {message}", file=sys.stderr)
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    from strata.server.supervisor import serve

    return serve(_config(args), demo=args.demo, demo_rate=args.demo_rate)


def cmd_generate(args: argparse.Namespace) -> int:
    from strata.generate import run

    config = load_config(args.config) if args.config else None
    key = args.write_key or (
        _token(config, None, "write_key") if config else os.environ.get("STRATA_WRITE_KEY")
    )
    if not key:
        return _fail("generate: a write key is required (--write-key or STRATA_WRITE_KEY)")
    if args.rate <= 0:
        return _fail("generate: --rate must be positive")
    stats = run(
        args.url.rstrip("/"),
        key,
        rate=args.rate,
        duration=args.duration,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        seed=args.seed,
        progress=not args.quiet,
        total_events=args.events,
    )
    if not args.quiet:
        print(
            json.dumps(
                {
                    "sent_events": stats.sent_events,
                    "accepted": stats.accepted,
                    "rejected": stats.rejected,
                    "retried_batches": stats.retried_batches,
                    "duplicate_batches": stats.duplicate_batches,
                    "errors": stats.errors,
                }
            )
        )
    return 0 if stats.errors == 0 else 1


def cmd_sql(args: argparse.Namespace) -> int:
    import httpx

    config = _config(args)
    url = _server_url(config, args.url)
    token = _token(config, args.token)
    if url is None:
        return _fail("sql: no running server found (start `strata serve` or pass --url)")
    if token is None:
        return _fail("sql: a query token is required (--token or STRATA_TOKEN)")
    try:
        response = httpx.post(
            f"{url}/v1/sql", json={"sql": args.query}, headers={"Authorization": f"Bearer {token}"}, timeout=120
        )
    except httpx.HTTPError as exc:
        return _fail(f"sql: cannot reach {url}: {exc}")
    payload = response.json()
    if response.status_code != 200:
        return _fail(str(payload.get("error", response.text)), 1)
    if args.json:
        print(json.dumps(payload, default=str))
        return 0
    columns = payload["columns"]
    rows = [[("" if v is None else str(v)) for v in row] for row in payload["rows"]]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"({len(rows)} rows, {payload['elapsed_ms']} ms, served from {payload['served_from']})", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    config = _config(args)
    url = _server_url(config, args.url)
    token = _token(config, args.token)
    if url is None or token is None:
        return _fail("status: need a running server and a query token")
    response = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    print(json.dumps(response.json(), indent=2))
    return 0 if response.status_code == 200 else 1


def cmd_keys(args: argparse.Namespace) -> int:
    from strata.auth import Keyring

    config = _config(args)
    keyring = Keyring(config)
    if args.action == "create-write-key":
        print(keyring.create_write_key(args.name or "write-key"))
    elif args.action == "create-token":
        if not args.user:
            return _fail("keys create-token: --user is required")
        try:
            print(keyring.create_token(args.user, args.scopes.split(",")))
        except ValueError as exc:
            return _fail(f"keys create-token: {exc}")
    elif args.action == "revoke":
        if not args.user:
            return _fail("keys revoke: --user is required")
        print(f"revoked {keyring.revoke_user(args.user)} token(s)")
    else:
        for token in keyring.list_tokens():
            print(json.dumps(token))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="Self-hostable event analytics pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML config file")
        p.add_argument("--data-dir", help="data directory (default ./strata-data)")

    p = sub.add_parser("serve", help="run the embedded pipeline behind one URL")
    common(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="ingest worker processes (default: one per core)")
    p.add_argument("--demo", action="store_true", help="also send generated demo traffic")
    p.add_argument("--demo-rate", type=int, default=200)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="send realistic synthetic traffic")
    p.add_argument("--url", required=True)
    p.add_argument("--write-key")
    p.add_argument("--config")
    p.add_argument("--rate", type=float, default=1000, help="events per second")
    p.add_argument("--duration", type=float, default=10, help="seconds; 0 runs until stopped")
    p.add_argument("--events", type=int, help="stop after this many events")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sql", help="run a read-only SQL query")
    common(p)
    p.add_argument("query")
    p.add_argument("--url")
    p.add_argument("--token")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("status", help="pipeline status: offsets, lag, watermark")
    common(p)
    p.add_argument("--url")
    p.add_argument("--token")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("keys", help="manage write keys and query tokens")
    common(p)
    p.add_argument("action", choices=["create-write-key", "create-token", "revoke", "list"])
    p.add_argument("--user")
    p.add_argument("--name")
    p.add_argument("--scopes", default="metrics,sql")
    p.set_defaults(func=cmd_keys)

    from strata.schemas.cli import add_commands as add_schema_commands

    add_schema_commands(sub, common)
    from strata.lake.cli import add_lake_commands

    add_lake_commands(sub, common)  # batch, replay, retention, delete-user
    from strata.query.cli import add_query_commands

    add_query_commands(sub, common)  # tokens
    from strata.processor.__main__ import add_arguments as add_process_arguments
    from strata.processor.__main__ import run as run_processor

    p = sub.add_parser("process", help="run the stream processor alone (Redis serving store)")
    add_process_arguments(p)
    p.set_defaults(func=run_processor)
    from strata.server.roles import add_role_commands

    add_role_commands(sub, common)  # ingest, query-api (distributed shape)
    return parser




def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        code = args.func(args)
    except ConfigError as exc:
        code = _fail(str(exc))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
