"""CLI commands of the lake: ``batch``, ``replay``, ``retention apply``, ``delete-user``.

chDB allows one process per data directory. When ``strata serve`` runs (its
``run/serve.json`` names a reachable URL, or ``--url``/``STRATA_URL`` is
given), these commands send the work to the server's admin API with an
admin token. Otherwise they open the store, the lake and the log themselves;
if another process holds the store they stop with a message saying so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import date
from typing import Any

from strata.config import Config


def _fail(message: str, code: int = 2) -> int:
    print(f"strata: {message}", file=sys.stderr)
    return code


def _server(config: Config, args: argparse.Namespace) -> tuple[str, str] | None:
    """(url, admin token) of a running server, or None to run locally."""
    from strata.cli import _server_url, _token

    if getattr(args, "local", False):
        return None
    url = _server_url(config, getattr(args, "url", None))
    if url is None:
        return None
    import httpx

    try:
        httpx.get(f"{url}/healthz", timeout=5)
    except httpx.HTTPError as exc:
        if getattr(args, "url", None):
            raise SystemExit(_fail(f"cannot reach {url}: {exc}")) from exc
        return None  # a stale serve.json: the server is gone
    token = getattr(args, "token", None) or _token(config, None)
    if token is None:
        raise SystemExit(_fail("a server is running: an admin token is required (--token or STRATA_TOKEN)"))
    return url, token


def _post(server: tuple[str, str], path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import httpx

    url, token = server
    response = httpx.post(
        f"{url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=None
    )
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": response.text}
    return response.status_code, payload


class _Local:
    """The store, lake, log and batch job of this process (no server running)."""

    def __init__(self, config: Config, *, with_log: bool = True) -> None:
        from strata.lake.base import Lake
        from strata.lake.batch import BatchJob
        from strata.masking import DeletedUsers
        from strata.store import Store

        try:
            self.store = Store.open(config)
        except Exception as exc:
            raise SystemExit(
                _fail(
                    f"cannot open the store in {config.data_path} ({str(exc).splitlines()[0][:200]}); "
                    "if `strata serve` is running, pass --url so the command goes through it"
                )
            ) from exc
        self.log = None
        if with_log:
            from strata.log import open_log

            self.log = open_log(config)
        self.lake = Lake.open(config)
        self.deleted_users = DeletedUsers(config.data_path)
        self.job = BatchJob(
            config, self.store, self.lake, deleted_users=self.deleted_users, log_=self.log
        )
        # No loader runs in this process: a rewritten day's finalized
        # distinct counts are recomputed at once (decision 096).
        from strata.query.day_answers import DayAnswers

        self.job.on_revised = DayAnswers(lambda: self.store, self.store.metrics).recompute_now

    def close(self) -> None:
        self.store.close()
        if self.log is not None:
            self.log.close()


def print_report(rows: list[dict[str, Any]]) -> None:
    """The reconciliation report as a table: streaming vs batch per aggregation."""
    if not rows:
        print("(nothing recomputed: no events for that range)")
        return
    header = ["day", "metric", "aggregation", "streaming", "batch", "difference", "changed_windows", "late_events"]
    lines = [header] + [
        [
            str(r["day"]),
            str(r["metric"]),
            str(r["aggregation"]),
            f"{r['streaming']:.6g}",
            f"{r['batch']:.6g}",
            f"{r['difference']:+.6g}",
            str(r["changed_windows"]),
            str(r["late_events"]),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * w for w in widths))


def _run(
    args: argparse.Namespace,
    path: str,
    body: dict[str, Any],
    local: Callable[[_Local], Any],
    show: Callable[[Any], None],
) -> int:
    from strata.cli import _config
    from strata.lake.batch import BatchError

    config = _config(args)
    server = _server(config, args)
    if server is not None:
        status, payload = _post(server, path, body)
        if status != 200:
            return _fail(str(payload.get("error", payload)), 1)
        show(payload)
        return 0
    runner = _Local(config)
    try:
        result = local(runner)
    except (BatchError, ValueError) as exc:
        return _fail(str(exc), 1)
    finally:
        runner.close()
    show(result)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    if bool(args.date) == bool(args.backfill):
        return _fail("batch: give exactly one of --date D or --backfill METRIC")
    if args.date:
        try:
            day = date.fromisoformat(args.date)
        except ValueError:
            return _fail("batch: --date: expected YYYY-MM-DD")
        body: dict[str, Any] = {"date": day.isoformat()}

        def local(r: _Local) -> Any:
            return {"report": [row.as_dict() for row in r.job.recompute_day(day)]}
    else:
        body = {"backfill": args.backfill}

        def local(r: _Local) -> Any:
            return {"report": [row.as_dict() for row in r.job.backfill(args.backfill, progress=True)]}

    return _run(args, "/v1/admin/batch", body, local, lambda p: print_report(p["report"]))


def cmd_replay(args: argparse.Namespace) -> int:
    from strata.query.api import APIError, parse_time

    try:
        start = parse_time(args.start, "--from")
        end = parse_time(args.end, "--to")
    except APIError as exc:
        return _fail(f"replay: {exc.message}")
    if start is None or end is None:
        return _fail("replay: --from and --to are required")
    if end <= start:
        return _fail("replay: --to must be after --from")
    body = {"from": start, "to": end, "source": args.source, "metric": args.metric}

    def local(r: _Local) -> Any:
        from strata.lake.replay import replay

        if args.metric:
            r.job.metric(args.metric)
        used, rows = replay(
            r.job, start, end, source=args.source,
            metrics=[args.metric] if args.metric else None, progress=True,
        )
        return {"source": used, "report": [row.as_dict() for row in rows]}

    def show(payload: Any) -> None:
        print(f"replayed from the {payload['source']}", file=sys.stderr)
        print_report(payload["report"])

    return _run(args, "/v1/admin/replay", body, local, show)


def cmd_retention(args: argparse.Namespace) -> int:
    from strata.query.api import APIError, parse_time

    try:
        now = parse_time(args.now, "--now")
    except APIError as exc:
        return _fail(f"retention: {exc.message}")

    def local(r: _Local) -> Any:
        from strata.lake import retention

        return retention.apply(r.job.config, store=r.store, lake=r.lake, log_=r.log, now=now).as_dict()

    return _run(
        args, "/v1/admin/retention", {"now": now}, local, lambda p: print(json.dumps(p, indent=2))
    )


def cmd_delete_user(args: argparse.Namespace) -> int:
    user_id = args.user_id
    if not user_id or len(user_id) > 256:
        return _fail("delete-user: the user id must be 1-256 characters")

    def local(r: _Local) -> Any:
        from strata.lake.gdpr import delete_user

        return delete_user(
            user_id, store=r.store, lake=r.lake, batch=r.job, deleted_users=r.deleted_users
        ).as_dict()

    return _run(
        args, "/v1/admin/delete-user", {"user_id": user_id}, local,
        lambda p: print(json.dumps(p, indent=2)),
    )


def add_lake_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the lake's subcommands on the ``strata`` parser."""

    def remote(p: argparse.ArgumentParser) -> None:
        common(p)
        p.add_argument("--url", help="a running server (default: run/serve.json, STRATA_URL)")
        p.add_argument("--token", help="admin token for the server")
        p.add_argument("--local", action="store_true", help="never use a running server")

    p = sub.add_parser("batch", help="recompute a day of rollups from the lake, or backfill a metric")
    remote(p)
    p.add_argument("--date", help="the UTC day to recompute, YYYY-MM-DD")
    p.add_argument("--backfill", metavar="METRIC", help="compute METRIC over the whole lake")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("replay", help="recompute the rollups of a time range exactly")
    remote(p)
    p.add_argument("--from", dest="start", required=True, help="ISO-8601 or epoch ms")
    p.add_argument("--to", dest="end", required=True, help="ISO-8601 or epoch ms (exclusive)")
    p.add_argument("--source", choices=["auto", "log", "lake"], default="auto")
    p.add_argument("--metric")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("retention", help="apply the retention policy to every layer")
    remote(p)
    p.add_argument("action", choices=["apply"])
    p.add_argument("--now", help="the policy's clock (ISO-8601 or epoch ms; default: now)")
    p.set_defaults(func=cmd_retention)

    p = sub.add_parser("delete-user", help="remove one user from every layer (GDPR)")
    remote(p)
    p.add_argument("user_id")
    p.set_defaults(func=cmd_delete_user)
