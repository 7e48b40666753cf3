"""The security review (docs/security.md), one test per point, against a real
`strata serve` (one per module). The dashboard's escaping is checked in a
real browser by tests/test_dashboard_browser.py
(``test_text_from_events_is_never_run_as_html``)."""

from __future__ import annotations

import hashlib
import inspect
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ADMIN_TOKEN, QUERY_TOKEN, WRITE_KEY, StrataServer

MARKER = "zz-secret-marker-" + uuid.uuid4().hex[:8]
LIMITED_USER = "alice"

# Every route of the core and ingest apps: method, path (as routed), a
# concrete path to call, a body, and the scope it needs. "write" is a write
# key, "public" needs nothing. test_every_route_is_in_the_table keeps this
# table complete: a new route without an entry here fails.
ROUTES: list[tuple[str, str, str, Any, str]] = [
    ("POST", "/v1/batch", "/v1/batch", {"batch": []}, "write"),
    ("POST", "/v1/track", "/v1/track", {"event_type": "x", "user_id": "u"}, "write"),
    ("POST", "/v1/page", "/v1/page", {"userId": "u"}, "write"),
    ("POST", "/v1/screen", "/v1/screen", {"userId": "u"}, "write"),
    ("POST", "/v1/identify", "/v1/identify", {"userId": "u"}, "write"),
    ("GET", "/sdk.js", "/sdk.js", None, "public"),
    ("POST", "/v1/sql", "/v1/sql", {"sql": "SELECT 1"}, "sql"),
    ("GET", "/v1/metrics/events", "/v1/metrics/events", None, "metrics"),
    ("GET", "/v1/metrics/count", "/v1/metrics/count", None, "metrics"),
    ("GET", "/v1/metrics/dau", "/v1/metrics/dau", None, "metrics"),
    ("GET", "/v1/metrics/wau", "/v1/metrics/wau", None, "metrics"),
    ("GET", "/v1/metrics/mau", "/v1/metrics/mau", None, "metrics"),
    ("GET", "/v1/metrics/active-users", "/v1/metrics/active-users", None, "metrics"),
    ("GET", "/v1/metrics/revenue", "/v1/metrics/revenue", None, "metrics"),
    ("POST", "/v1/metrics/funnel", "/v1/metrics/funnel", {"steps": ["a", "b"]}, "metrics"),
    ("GET", "/v1/metrics/funnel", "/v1/metrics/funnel", None, "metrics"),
    ("GET", "/v1/metrics/retention", "/v1/metrics/retention", None, "metrics"),
    ("GET", "/v1/metrics/top", "/v1/metrics/top", None, "metrics"),
    ("GET", "/v1/metrics/{name}", "/v1/metrics/page_views_by_country", None, "metrics"),
    ("GET", "/v1/status", "/v1/status", None, "metrics"),
    ("GET", "/dashboard/config", "/dashboard/config", None, "metrics"),
    ("POST", "/v1/admin/tokens", "/v1/admin/tokens", {"user": "bob"}, "admin"),
    ("GET", "/v1/admin/tokens", "/v1/admin/tokens", None, "admin"),
    ("DELETE", "/v1/admin/tokens/{user}", "/v1/admin/tokens/nobody", None, "admin"),
    ("POST", "/v1/admin/delete-user", "/v1/admin/delete-user", {"user_id": "nobody"}, "admin"),
    ("POST", "/v1/admin/batch", "/v1/admin/batch", {"date": "2020-01-01"}, "admin"),
    ("POST", "/v1/admin/replay", "/v1/admin/replay", {}, "admin"),
    ("POST", "/v1/admin/retention", "/v1/admin/retention", {}, "admin"),
    ("GET", "/v1/schemas", "/v1/schemas", None, "admin"),
    ("GET", "/v1/schemas/{event_type:path}", "/v1/schemas/x", None, "admin"),
    ("POST", "/v1/schemas/{event_type:path}", "/v1/schemas/x", {}, "admin"),
    ("GET", "/v1/schemas/{event_type:path}/versions/{version}", "/v1/schemas/x/versions/1", None,
     "admin"),
    ("PUT", "/v1/schemas/{event_type:path}/mode", "/v1/schemas/x/mode", {}, "admin"),
    ("POST", "/v1/schemas/{event_type:path}/check", "/v1/schemas/x/check", {}, "admin"),
    ("POST", "/v1/quarantine/replay", "/v1/quarantine/replay", {}, "admin"),
    # Public by design: probes, the Prometheus scrape (aggregate counters, no
    # user data), the API description and the dashboard's static page.
    ("GET", "/healthz", "/healthz", None, "public"),
    ("GET", "/readyz", "/readyz", None, "public"),
    ("GET", "/metrics", "/metrics", None, "public"),
    ("GET", "/openapi.json", "/openapi.json", None, "public"),
    ("GET", "/docs", "/docs", None, "public"),
    ("GET", "/", "/", None, "public"),
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrataServer]:
    base = tmp_path_factory.mktemp("security")
    config = base / "strata.toml"
    config.write_text(
        f"[query.user_limits.{LIMITED_USER}]\nrate_limit_per_minute = 1\nrate_limit_burst = 2\n"
    )
    # Lake files roll every second, so that "caught up" (lag 0 everywhere,
    # the archiver included) does not wait for the default 60 s roll.
    server = StrataServer(base / "data", config_path=config,
                          env={"STRATA_LAKE__ROLL_INTERVAL": '"1s"'}).start()
    yield server
    server.stop()


def _call(srv: StrataServer, method: str, path: str, body: Any, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return srv.client.request(method, srv.url + path, json=body, headers=headers)


def _token_for(srv: StrataServer, user: str, scopes: list[str]) -> str:
    response = srv.client.post(f"{srv.url}/v1/admin/tokens", json={"user": user, "scopes": scopes},
                               headers=srv.headers(ADMIN_TOKEN))
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def test_every_route_is_in_the_table(tmp_path: Path) -> None:
    """The table above lists every route the two apps serve (built in-process)."""
    from starlette.routing import Route

    from strata.config import load_config
    from strata.ingest.app import IngestService, ingest_routes
    from strata.ingest.committer import GroupCommitter
    from strata.server.core import build_app
    from strata.server.pipeline import Pipeline
    from strata.server.worker import EXTRA_INGEST_ROUTES

    config = load_config(overrides={"data_dir": str(tmp_path / "data")})
    pipeline = Pipeline.open(config)
    try:
        routes = list(build_app(pipeline).routes)
        service = IngestService(config, GroupCommitter(pipeline.log), pipeline.keyring)
        routes += ingest_routes(service)
        for factory in EXTRA_INGEST_ROUTES:
            routes += factory(service)
    finally:
        pipeline.stop()
    served = {
        (method, route.path)
        for route in routes if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD", "OPTIONS"}
    }
    table = {(method, path) for method, path, *_ in ROUTES}
    assert served - table == set(), "routes without a required scope in this table"
    assert table - served == set(), "table entries for routes that no longer exist"


@pytest.mark.parametrize(("method", "routed", "path", "body", "scope"), ROUTES,
                         ids=[f"{m} {p}" for m, p, *_ in ROUTES])
def test_each_route_needs_its_scope(srv: StrataServer, method: str, routed: str, path: str,
                                    body: Any, scope: str) -> None:
    """Ingest keys cannot query, query tokens cannot administer, and nothing
    but a write key can append events."""
    refused = (401, 403)
    if scope == "public":
        assert _call(srv, method, path, body, None).status_code not in refused
        return
    assert _call(srv, method, path, body, None).status_code == 401
    assert _call(srv, method, path, body, "not-a-key").status_code == 401
    write = _call(srv, method, path, body, WRITE_KEY).status_code
    query = _call(srv, method, path, body, QUERY_TOKEN).status_code
    admin = _call(srv, method, path, body, ADMIN_TOKEN).status_code
    if scope == "write":
        assert write not in refused
        assert query in refused and admin in refused  # query tokens are not write keys
    else:
        assert write in refused
        assert admin not in refused
        assert (query in refused) == (scope == "admin")


def test_keys_are_stored_hashed_and_compared_in_constant_time(srv: StrataServer) -> None:
    token = _token_for(srv, "carol", ["metrics"])
    stored = (srv.data_dir / "keys.json").read_text()
    assert token not in stored
    assert hashlib.sha256(token.encode()).hexdigest() in stored
    for plain in (WRITE_KEY, QUERY_TOKEN, ADMIN_TOKEN):
        assert plain not in stored
    assert _call(srv, "GET", "/v1/status", None, token).status_code == 200
    # Code review point, kept as a regression guard: authentication hashes
    # the presented key and compares digests with hmac.compare_digest over
    # every entry, so the time taken does not depend on which (or whether
    # one) matched.
    from strata.auth import Keyring

    source = inspect.getsource(Keyring.authenticate)
    assert "hmac.compare_digest" in source and "==" not in source
    assert "break" not in source and "return principal" not in source


def test_no_keys_or_event_payloads_in_logs(srv: StrataServer) -> None:
    good = [{"event_type": "signup", "user_id": f"{MARKER}-user",
             "properties": {"note": MARKER}, "path": f"/{MARKER}"}]
    assert srv.post_batch(good).status_code == 200
    # Rejected events, failing SQL, a wrong key holding the marker: the error
    # paths are where payloads usually leak into logs.
    bad = [{"event_type": "", "user_id": MARKER}, {"event_type": MARKER, "timestamp": MARKER}]
    srv.post_batch(bad)
    srv.client.post(f"{srv.url}/v1/batch", content=b"{" + MARKER.encode(),
                    headers=srv.headers(WRITE_KEY))
    _call(srv, "POST", "/v1/sql", {"sql": f"SELECT no_such_column_{MARKER.replace('-', '_')}"},
          ADMIN_TOKEN)
    _call(srv, "POST", "/v1/sql", {"sql": f"SELECT '{MARKER}' FROM nowhere_table"}, ADMIN_TOKEN)
    _call(srv, "GET", "/v1/status", None, f"{MARKER}-key")
    srv.wait_caught_up()
    time.sleep(1.0)  # let the children flush their stderr into the log file
    text = srv.log_text()
    assert text, "the server log is empty: nothing was checked"
    for secret in (MARKER, WRITE_KEY, QUERY_TOKEN, ADMIN_TOKEN):
        assert secret not in text, f"{secret!r} found in the server log"


def test_cors_is_open_only_for_browser_ingest(srv: StrataServer) -> None:
    origin = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    for path in ("/v1/batch", "/v1/track", "/v1/page"):
        response = srv.client.options(srv.url + path, headers=origin)
        assert response.status_code == 204
        assert response.headers["access-control-allow-origin"] == "*"
        # Bearer keys, never cookies: a cross-site page cannot ride on a session.
        assert "access-control-allow-credentials" not in response.headers
    for method, path in (("GET", "/v1/status"), ("POST", "/v1/sql"), ("GET", "/v1/metrics/dau"),
                         ("GET", "/v1/admin/tokens"), ("GET", "/dashboard/config")):
        response = srv.client.request(method, srv.url + path, headers={**origin, **srv.headers()},
                                      json={"sql": "SELECT 1"} if method == "POST" else None)
        assert "access-control-allow-origin" not in response.headers, path
        preflight = srv.client.options(srv.url + path, headers=origin)
        assert "access-control-allow-origin" not in preflight.headers, path


def test_dashboard_page_forbids_inline_script(srv: StrataServer) -> None:
    """The browser test proves the escaping; this pins the second line of
    defence, the Content-Security-Policy on the page."""
    response = srv.client.get(srv.url + "/")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    assert response.headers["x-content-type-options"] == "nosniff"


SANDBOX_ESCAPES = [
    "SELECT * FROM file('/etc/passwd', 'LineAsString')",
    "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
    "SELECT * FROM system.users",
    "SELECT 1 SETTINGS readonly = 0",
    "INSERT INTO events (event_id) VALUES ('x')",
    "ALTER TABLE events DELETE WHERE 1",
    "DROP TABLE events",
    "SELECT 1; DROP TABLE events",
    "SELECT * FROM remote('127.0.0.1', system.one)",
    "SELECT * FROM executable('id', 'TSV', 'x String')",
    "CREATE TABLE t (x Int8) ENGINE = Memory",
]


def test_sql_sandbox_refuses_escapes_and_changes_nothing(srv: StrataServer) -> None:
    srv.post_batch([{"event_type": "sandbox", "user_id": "s1"}])
    srv.wait_caught_up()
    before = srv.scalar("SELECT count() FROM events")
    for sql in SANDBOX_ESCAPES:
        response = _call(srv, "POST", "/v1/sql", {"sql": sql}, ADMIN_TOKEN)
        assert response.status_code == 400, (sql, response.status_code, response.text)
        assert "error" in response.json()
    assert srv.scalar("SELECT count() FROM events") == before


def test_per_user_rate_limits(srv: StrataServer) -> None:
    limited = _token_for(srv, LIMITED_USER, ["metrics", "sql"])
    codes = [_call(srv, "POST", "/v1/sql", {"sql": "SELECT 1"}, limited).status_code
             for _ in range(4)]
    assert codes[:2] == [200, 200] and 429 in codes[2:], codes
    refused = _call(srv, "POST", "/v1/sql", {"sql": "SELECT 1"}, limited)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    # Another user's bucket is untouched.
    assert _call(srv, "POST", "/v1/sql", {"sql": "SELECT 1"}, QUERY_TOKEN).status_code == 200


def test_revoked_tokens_stop_working(srv: StrataServer) -> None:
    token = _token_for(srv, "dave", ["metrics", "sql"])
    assert _call(srv, "GET", "/v1/status", None, token).status_code == 200
    assert _call(srv, "DELETE", "/v1/admin/tokens/dave", None, ADMIN_TOKEN).status_code == 200
    deadline = time.monotonic() + 30  # keyrings re-read keys.json at most once a second
    while _call(srv, "GET", "/v1/status", None, token).status_code != 401:
        assert time.monotonic() < deadline, "revoked token still accepted"
        time.sleep(0.2)


def test_keys_json_is_not_world_readable(srv: StrataServer) -> None:
    mode = (srv.data_dir / "keys.json").stat().st_mode & 0o777
    assert mode & 0o077 == 0, oct(mode)
    json.loads((srv.data_dir / "keys.json").read_text())
