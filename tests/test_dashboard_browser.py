"""The dashboard in a real browser (Debian's Chromium through Playwright).

One `strata serve` per module with generated traffic. The page signs in,
its panels fill, and the numbers it shows (DAU, today's events, funnel
steps) are compared with what the metrics API answers for the very calls
the page made (each panel publishes them in ``data-api``). The explorer's
rendered rows are compared with ``/v1/sql``. Text from data must never run
as HTML. Screenshots go to ``test-artifacts/``.

Run as a script to refresh the README screenshot under demo traffic:
``python tests/test_dashboard_browser.py --screenshot docs/dashboard.png``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

if __name__ == "__main__":  # run as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import ADMIN_TOKEN, QUERY_TOKEN, WRITE_KEY, StrataServer  # noqa: E402

# redis_url: the shared redis-server fixture in tests/conftest.py.

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
REFRESH = "2s"  # [dashboard] refresh_interval for these servers (default 5s)
PANELS = ["live", "users", "revenue", "pageviews", "funnel", "top", "health"]
XSS_TYPE = '<img src=x onerror="window.__xss=1">'
XSS_PATH = "<script>window.__xss=2</script>"

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


# -- fixtures -----------------------------------------------------------------------
def run_traffic(url: str, total: int, rate: float = 600) -> threading.Thread:
    from strata import generate

    thread = threading.Thread(
        target=generate.run,
        args=(url, WRITE_KEY),
        kwargs={
            "rate": rate,
            "duration": 120,
            "total_events": total,
            "progress": False,
            "duplicate_share": 0.0,
            "seed": 7,
        },
        daemon=True,
    )
    thread.start()
    return thread


def wait_quiet(server: StrataServer, timeout: float = 90) -> int:
    """Wait until the raw table stops changing and the loader has no lag."""
    deadline = time.monotonic() + timeout
    previous = -1
    while time.monotonic() < deadline:
        status = server.status()
        loader_lag = status["consumers"]["loader-events"]["lag_events"]
        count = int(server.scalar("SELECT count() FROM events"))
        if loader_lag == 0 and count == previous:
            return count
        previous = count
        time.sleep(0.5)
    raise AssertionError("the pipeline did not settle")


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("dashboard") / "data"
    server = StrataServer(data, env={"STRATA_DASHBOARD__REFRESH_INTERVAL": REFRESH}).start()
    traffic = run_traffic(server.url, total=3000)
    try:
        yield {"server": server, "traffic": traffic}
    finally:
        traffic.join(60)
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


class PageErrors:
    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: (
                self.errors.append(msg.text)
                if msg.type == "error" and "Failed to load resource" not in msg.text
                else None
            ),
        )


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    # bypass_csp: Playwright's wait_for_function evaluates strings, which the
    # page's CSP forbids. It also means the untrusted-text test checks the
    # page's own escaping, not the CSP behind it.
    context = browser.new_context(viewport={"width": 1400, "height": 1900}, bypass_csp=True)
    tab = context.new_page()
    tab.errors = PageErrors(tab)
    yield tab
    context.close()


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def sign_in(page: Any, url: str, token: str = QUERY_TOKEN) -> None:
    page.goto(url + "/")
    page.fill("#token-input", token)
    page.click("#signin-button")
    page.wait_for_selector("#app-view:not([hidden])", timeout=30_000)


def value(page: Any, selector: str) -> float | None:
    raw = page.get_attribute(selector, "data-value")
    return None if raw in (None, "") else float(raw)


def api_calls(page: Any, panel: str) -> list[str]:
    return json.loads(page.get_attribute(f"#panel-{panel}", "data-api") or "[]")


def wait_panels(page: Any, timeout_ms: int = 60_000) -> None:
    for panel in PANELS:
        page.wait_for_selector(f"#panel-{panel}[data-ready]", timeout=timeout_ms)


# -- sign-in ----------------------------------------------------------------------------
def test_without_a_token_only_the_sign_in_shows(dash: dict[str, Any], page: Any) -> None:
    server = dash["server"]
    page.goto(server.url + "/")
    page.wait_for_selector("#signin-view:not([hidden])")
    assert page.is_hidden("#app-view")
    assert not page.is_visible("#panel-live")
    # A wrong token: a clear error, still only the sign-in, nothing stored.
    page.fill("#token-input", "qt_not_a_token")
    page.click("#signin-button")
    page.wait_for_selector("#signin-error:not([hidden])")
    assert "Wrong token" in page.text_content("#signin-error")
    assert page.is_hidden("#app-view")
    assert page.evaluate("sessionStorage.getItem('strata.token')") is None
    # The right one: the dashboard, the token kept for this tab only.
    page.fill("#token-input", QUERY_TOKEN)
    page.click("#signin-button")
    page.wait_for_selector("#app-view:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('strata.token')") == QUERY_TOKEN
    assert page.is_hidden("#signin-view")
    page.reload()
    page.wait_for_selector("#app-view:not([hidden])")
    # The configured refresh interval is what the page starts with.
    assert page.input_value("#refresh-select") == "2000"
    page.click("#signout")
    page.wait_for_selector("#signin-view:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('strata.token')") is None
    assert not page.errors.errors


def test_assets_are_served_from_the_package_with_a_strict_policy(dash: dict[str, Any]) -> None:
    server = dash["server"]
    index = server.client.get(server.url + "/")
    assert index.status_code == 200
    assert "script-src 'self'" in index.headers["content-security-policy"]
    assert "https://" not in index.text and "http://" not in index.text  # no CDN
    vendored = server.client.get(server.url + "/dashboard/static/vendor/echarts/echarts.min.js")
    assert vendored.status_code == 200 and len(vendored.content) > 500_000
    assert "script-src 'self'" in vendored.headers["content-security-policy"]
    again = server.client.get(
        server.url + "/dashboard/static/vendor/echarts/echarts.min.js",
        headers={"If-None-Match": vendored.headers["etag"]},
    )
    assert again.status_code == 304  # revalidated, not downloaded again
    missing = server.client.get(server.url + "/dashboard/static/nope.js")
    assert missing.status_code == 404
    # API routes still win over the dashboard's.
    assert server.client.get(server.url + "/v1/status").status_code == 401
    config = server.client.get(
        server.url + "/dashboard/config", headers=server.headers(QUERY_TOKEN)
    )
    assert config.status_code == 200
    assert config.json()["refresh_interval_ms"] == 2000
    assert config.json()["funnel_steps"] == ["page_view", "signup", "add_to_cart", "purchase"]
    assert server.client.get(server.url + "/dashboard/config").status_code == 401


# -- panels against the API -----------------------------------------------------------------
def test_panels_show_the_numbers_the_metrics_api_returns(dash: dict[str, Any], page: Any) -> None:
    server = dash["server"]
    sign_in(page, server.url)
    # While traffic flows, the panels fill.
    page.wait_for_function(
        "Number(document.querySelector('#today-events-value').dataset.value || 0) > 0",
        timeout=60_000,
    )
    wait_panels(page)
    dash["traffic"].join(120)
    total = wait_quiet(server)
    assert total >= 2900  # the generator's 3000 events, minus none: sanity

    api = httpx.Client(base_url=server.url, headers=server.headers(QUERY_TOKEN), timeout=60)

    def compare() -> tuple[bool, str]:
        """One consistent reading: the page's numbers against fresh API calls
        to exactly the URLs the page used (and the funnel's body)."""
        today_page = value(page, "#today-events-value")
        dau_page = value(page, "#dau-value")
        steps_page = [
            float(x)
            for x in page.eval_on_selector_all(
                "#funnel-table tbody td.num[data-value]", "els => els.map(e => e.dataset.value)"
            )
        ]
        today_url = next(u for u in api_calls(page, "live") if "granularity=1d" in u)
        dau_url = next(u for u in api_calls(page, "users") if u.startswith("/v1/metrics/dau"))
        today_api = sum(r["events"] for r in api.get(today_url).json()["rows"])
        dau_rows = api.get(dau_url).json()["rows"]
        dau_api = dau_rows[-1]["users"] if dau_rows else 0
        steps = [s.strip() for s in page.input_value("#funnel-steps").split(",")]
        funnel_body = page.evaluate(
            "JSON.parse(document.querySelector('#panel-funnel details.query pre').textContent"
            ".split('body: ')[1].split('\\n')[0])"
        )
        assert funnel_body["steps"] == steps
        funnel = api.post("/v1/metrics/funnel", json=funnel_body).json()
        steps_api = [float(s["users"]) for s in funnel["rows"][0]["steps"]]
        got = (today_page, dau_page, steps_page)
        want = (float(today_api), float(dau_api), steps_api)
        return got == want, f"page {got} != api {want}"

    deadline = time.monotonic() + 60
    ok, detail = compare()
    while not ok and time.monotonic() < deadline:
        time.sleep(1)
        ok, detail = compare()
    assert ok, detail
    # Against the raw events as well: today's count is exact.
    assert value(page, "#today-events-value") == server.scalar(
        "SELECT count() FROM events WHERE ts >= toStartOfDay(now())"
    )
    steps = [
        value(page, f"#funnel-table tr[data-step='{s}'] td.num")
        for s in ["page_view", "signup", "add_to_cart", "purchase"]
    ]
    assert steps[0] and steps[0] >= steps[1] >= steps[2] >= steps[3] > 0
    # The seed metric's panel reads its live endpoint and draws the windows
    # the API reports open as provisional.
    assert int(page.get_attribute("#panel-pageviews", "data-windows")) >= 1
    assert url_is_live(api_calls(page, "pageviews"))
    live = api.get(api_calls(page, "pageviews")[-1]).json()
    # Revised ranges (the generator sends a share of late events) are marked,
    # as many as the API lists for the page's own call.
    deadline = time.monotonic() + 30
    while True:
        url = api_calls(page, "pageviews")[-1]
        shown = int(page.get_attribute("#panel-pageviews", "data-revised-ranges"))
        live = api.get(url).json()
        if shown == len(live["revised_ranges"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert shown == len(live["revised_ranges"])
    if live["open_window_ranges"]:
        assert int(page.get_attribute("#panel-pageviews", "data-open-windows")) >= 1
        assert "provisional" in page.text_content("#panel-pageviews .panel-status")
    # Every panel can show its API calls.
    for panel in PANELS:
        assert api_calls(page, panel), panel
        page.click(f"#panel-{panel} details.query summary")
        assert "/v1/" in page.text_content(f"#panel-{panel} details.query pre") or panel == "live"
    # Refreshes read the live path only: no SQL was posted.
    assert not any(u.startswith("/v1/sql") for p in PANELS for u in api_calls(page, p))
    screenshot(page, "dashboard-panels.png")
    assert not page.errors.errors


def test_range_and_granularity_drive_the_api_calls(dash: dict[str, Any], page: Any) -> None:
    from urllib.parse import parse_qs, urlsplit

    from strata.query.api import parse_time

    server = dash["server"]
    sign_in(page, server.url)
    wait_panels(page)

    def params_once(check: Any) -> dict[str, list[str]]:
        """The page-views call's parameters, once a refresh satisfies ``check``
        (changes made during a refresh get their own refresh right after)."""
        deadline = time.monotonic() + 30
        while True:
            params = parse_qs(urlsplit(api_calls(page, "pageviews")[-1]).query)
            if check(params) or time.monotonic() > deadline:
                return params
            time.sleep(0.2)

    page.select_option("#range-select", "24h")
    page.select_option("#granularity-select", "1h")
    params = params_once(lambda p: p.get("granularity") == ["1h"])
    assert params["granularity"] == ["1h"]
    span = parse_time(params["to"][0], "to") - parse_time(params["from"][0], "from")
    assert span == 86_400_000
    page.select_option("#range-select", "custom")
    page.fill("#custom-from", "2026-01-01T00:00")
    page.fill("#custom-to", "2026-01-11T00:00")
    page.dispatch_event("#custom-to", "change")
    page.select_option("#granularity-select", "auto")
    params = params_once(
        lambda p: (
            p.get("from") == ["2026-01-01T00:00:00.000Z"]
            and p.get("to") == ["2026-01-11T00:00:00.000Z"]
            and p.get("granularity") == ["1d"]
        )
    )
    assert params["from"] == ["2026-01-01T00:00:00.000Z"]
    assert params["to"] == ["2026-01-11T00:00:00.000Z"]
    assert params["granularity"] == ["1d"]  # auto: daily buckets for a 10-day range
    page.wait_for_selector("#panel-pageviews[data-windows='0']", timeout=30_000)
    # A request the API refuses turns the panel into a visible error state.
    page.fill("#funnel-steps", "page_view")
    page.click("#funnel-form button")
    page.wait_for_selector("#panel-funnel[data-ready=error]", timeout=30_000)
    assert "at least 2 steps" in page.text_content("#panel-funnel .panel-status")
    assert "unavailable" in page.get_attribute("#panel-funnel", "class")


# -- query explorer --------------------------------------------------------------------------
def test_explorer_renders_the_rows_of_the_query(dash: dict[str, Any], page: Any) -> None:
    server = dash["server"]
    dash["traffic"].join(120)
    wait_quiet(server)
    sign_in(page, server.url)
    sql = (
        "SELECT event_type, count() AS events FROM events "
        "WHERE event_type IN ('page_view', 'signup', 'add_to_cart', 'purchase') "
        "GROUP BY event_type ORDER BY event_type"
    )
    page.fill("#sql-input", sql)
    page.click("#sql-run")
    page.wait_for_selector("#panel-explorer[data-state=done]", timeout=60_000)
    expected = server.sql(sql)
    headers = page.eval_on_selector_all(
        "#sql-results thead th", "els => els.map(e => e.textContent)"
    )
    rows = page.eval_on_selector_all(
        "#sql-results tbody tr", "trs => trs.map(tr => [...tr.cells].map(td => td.textContent))"
    )
    assert headers == ["event_type", "events"]
    assert rows == [[str(c) for c in row] for row in expected["rows"]]
    assert page.text_content("#sql-served-from") == expected["served_from"]
    assert page.text_content("#sql-rowcount") == str(len(expected["rows"]))
    assert "ms" in page.text_content("#sql-elapsed")
    assert page.text_content("#sql-route").strip() not in ("", "–")
    assert page.is_visible("#sql-chart")
    # A query the router answers from a rollup says so.
    rollup_sql = (
        "SELECT country, count() AS views FROM events WHERE event_type = 'page_view' "
        "AND ts >= toStartOfDay(now()) - INTERVAL 1 DAY AND ts < toStartOfDay(now()) + INTERVAL 1 DAY "
        "GROUP BY country ORDER BY views DESC, country"
    )
    page.fill("#sql-input", rollup_sql)
    page.press("#sql-input", "Control+Enter")
    page.wait_for_selector("#panel-explorer[data-runs='2']", timeout=60_000)
    assert page.get_attribute("#panel-explorer", "data-state") == "done"
    expected = server.sql(rollup_sql)
    assert page.text_content("#sql-served-from") == expected["served_from"]
    assert "rollup" in page.text_content("#sql-route")
    # A bad query: the server's 4xx message, shown as text.
    page.fill("#sql-input", "DROP TABLE events")
    page.click("#sql-run")
    page.wait_for_selector("#panel-explorer[data-runs='3']", timeout=30_000)
    assert page.get_attribute("#panel-explorer", "data-state") == "error"
    assert page.text_content("#sql-error").startswith("400")
    # The batch reconciliation reports: one SQL query, only when asked.
    page.click("#recon-button")
    page.wait_for_function(
        "!['', 'loading…'].includes(document.querySelector('#recon-status').textContent)",
        timeout=30_000,
    )
    reports = server.sql(
        "SELECT day, metric, aggregation FROM reconciliation "
        "ORDER BY run_at DESC, metric, aggregation LIMIT 50"
    )["rows"]
    shown = page.eval_on_selector_all(
        "#recon-table tbody tr",
        "trs => trs.map(tr => [...tr.cells].slice(0, 3).map(td => td.textContent))",
    )
    assert shown == [[str(c) for c in row] for row in reports]
    if not reports:
        assert "no reconciliation reports yet" in page.text_content("#recon-status")
    screenshot(page, "dashboard-explorer.png")
    assert not page.errors.errors


# -- freshness --------------------------------------------------------------------------------
def test_an_event_posted_to_the_api_shows_within_6_seconds(dash: dict[str, Any], page: Any) -> None:
    server = dash["server"]
    dash["traffic"].join(120)
    wait_quiet(server)
    sign_in(page, server.url)
    page.wait_for_function(
        "Number(document.querySelector('#today-events-value').dataset.value || 0) > 0",
        timeout=60_000,
    )
    before = value(page, "#today-events-value")
    event = {
        "event_type": "fresh_check",
        "user_id": "fresh-user",
        "event_id": uuid.uuid4().hex,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    response = server.post_batch([event])
    assert response.status_code == 200, response.text
    posted = time.monotonic()
    page.wait_for_function(
        f"Number(document.querySelector('#today-events-value').dataset.value) >= {before + 1}",
        timeout=15_000,
    )
    took = time.monotonic() - posted
    assert took <= 6.0, f"the page showed the event after {took:.1f} s"


# -- untrusted text --------------------------------------------------------------------------
def test_text_from_events_is_never_run_as_html(dash: dict[str, Any], page: Any) -> None:
    server = dash["server"]
    event_id = "xss-" + uuid.uuid4().hex
    event = {
        "event_type": XSS_TYPE,
        "user_id": "<b>mallory</b>",
        "event_id": event_id,
        "path": XSS_PATH,
        "app_version": XSS_PATH,
        "properties": {"note": "<script>window.__xss=3</script>"},
    }
    assert server.post_batch([event]).status_code == 200
    sign_in(page, server.url)
    # The top event types table shows the event type, as text.
    page.wait_for_function(
        "[...document.querySelectorAll('#top-types-table td')].some(td => td.textContent === "
        + json.dumps(XSS_TYPE)
        + ")",
        timeout=60_000,
    )
    page.select_option("#top-dimension", "app_version")  # few values: the payload is in the top 10
    page.wait_for_function(
        "[...document.querySelectorAll('#top-dims-table td')].some(td => td.textContent === "
        + json.dumps(XSS_PATH)
        + ")",
        timeout=60_000,
    )
    page.fill(
        "#sql-input",
        f"SELECT event_type, path, user_id, properties FROM events WHERE event_id = '{event_id}'",
    )
    page.click("#sql-run")
    page.wait_for_selector("#panel-explorer[data-state=done]", timeout=60_000)
    cells = page.eval_on_selector_all(
        "#sql-results tbody td", "tds => tds.map(td => td.textContent)"
    )
    assert cells[:3] == [XSS_TYPE, XSS_PATH, "<b>mallory</b>"]
    assert "<script>window.__xss=3</script>" in cells[3]
    time.sleep(0.5)  # give an injected handler the chance to fire
    assert page.evaluate("window.__xss") is None
    assert page.query_selector("img[src=x]") is None
    assert page.query_selector("#app-view script") is None
    assert page.query_selector("#sql-results b") is None
    screenshot(page, "dashboard-untrusted-text.png")


# -- the Redis serving store ------------------------------------------------------------------
def test_the_page_works_with_the_redis_serving_store(
    redis_url: str, tmp_path: Path, page: Any
) -> None:
    server = StrataServer(
        tmp_path / "data",
        env={
            "STRATA_SERVING__BACKEND": "redis",
            "STRATA_SERVING__REDIS_URL": redis_url,
            "STRATA_DASHBOARD__REFRESH_INTERVAL": REFRESH,
        },
    ).start()
    try:
        run_traffic(server.url, total=600, rate=600).join(60)
        wait_quiet(server)
        sign_in(page, server.url)
        wait_panels(page)
        assert page.get_attribute("#panel-pageviews", "data-ready") == "true"
        api = httpx.Client(base_url=server.url, headers=server.headers(QUERY_TOKEN), timeout=60)

        def compare() -> tuple[bool, str]:
            url = api_calls(page, "pageviews")[-1]
            answer = api.get(url).json()
            rows = answer["rows"]
            # The open windows come from the serving store, i.e. from Redis.
            assert "serving" in answer["served_from"], answer["served_from"]
            want = float(sum(r.get("views", r.get("events", 0)) for r in rows))
            got = float(page.get_attribute("#panel-pageviews", "data-total") or -1)
            dau_url = next(u for u in api_calls(page, "users") if u.startswith("/v1/metrics/dau"))
            dau_rows = api.get(dau_url).json()["rows"]
            today = server.scalar("SELECT count() FROM events WHERE ts >= toStartOfDay(now())")
            page_values = (got, value(page, "#dau-value"), value(page, "#today-events-value"))
            api_values = (want, float(dau_rows[-1]["users"]), float(today))
            return page_values == api_values, f"page {page_values} != api {api_values}"

        deadline = time.monotonic() + 60
        ok, detail = compare()
        while not ok and time.monotonic() < deadline:
            time.sleep(1)
            ok, detail = compare()
        assert ok, detail
        assert url_is_live(api_calls(page, "pageviews"))
        assert "serving" in page.text_content("#panel-pageviews .panel-status")
        import redis

        assert redis.Redis.from_url(redis_url).dbsize() > 0  # the live windows live there
        screenshot(page, "dashboard-redis.png")
        assert not page.errors.errors
    finally:
        server.stop()


def url_is_live(urls: list[str]) -> bool:
    """The panel read the configured metric's live endpoint (no fallback)."""
    return any(u.startswith("/v1/metrics/page_views_by_country") for u in urls) and not any(
        u.startswith("/v1/metrics/count") for u in urls
    )


# -- the README screenshot ----------------------------------------------------------------------
def backfill_demo_history(url: str, minutes: int = 50, per_minute: int = 240) -> None:
    """Demo traffic for the last ``minutes``, oldest first (so it is on time
    for the processor), so the charts have history to show."""
    from strata.generate import TrafficModel

    model = TrafficModel(seed=11)
    now = int(time.time() * 1000)
    with httpx.Client(timeout=60) as client:
        for offset in range(minutes, 0, -1):
            batch = model.batch(per_minute, now - offset * 60_000)
            response = client.post(
                f"{url}/v1/batch",
                json={"batch": batch},
                headers={"Authorization": f"Bearer {WRITE_KEY}"},
            )
            response.raise_for_status()


def take_demo_screenshot(path: Path) -> None:
    """Start strata with demo traffic and screenshot the dashboard."""
    import tempfile

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        server = StrataServer(Path(tmp) / "data").start()
        backfill_demo_history(server.url)
        traffic = run_traffic(server.url, total=6_000, rate=60)
        try:
            time.sleep(15)
            with sync_playwright() as p:
                instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                tab = instance.new_page(viewport={"width": 1400, "height": 1500})
                sign_in(tab, server.url, ADMIN_TOKEN)
                tab.wait_for_selector("#panel-pageviews[data-ready]", timeout=60_000)
                tab.click("#sql-run")
                tab.wait_for_selector("#panel-explorer[data-state=done]", timeout=60_000)
                time.sleep(11)  # two refreshes: events/s has samples
                tab.screenshot(path=str(path), full_page=True)
                instance.close()
        finally:
            traffic.join(1)
            server.stop()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--screenshot":
        take_demo_screenshot(Path(sys.argv[2]))
    else:
        raise SystemExit("usage: python tests/test_dashboard_browser.py --screenshot PATH")
