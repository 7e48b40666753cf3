"""The web snippet (/sdk.js) in a real Chromium: a page on another origin
loads it, tracks events, navigates away, and the events arrive."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import WRITE_KEY
from tests.fixtures_sdk import wait_loaded

playwright = pytest.importorskip("playwright.sync_api")

PAGE = """<!doctype html><html><head><title>{title}</title>
<script src="{strata}/sdk.js"></script>
<script>
  strata.init({{url: "{strata}", writeKey: "{key}", pageViews: true, {options}}});
  {body}
</script></head><body><a id="next" href="/two.html">next</a></body></html>"""


@pytest.fixture
def site(tmp_path: Path, shared_server: Any) -> Iterator[str]:
    root = tmp_path / "site"
    root.mkdir()
    # Page one only flushes on page hide (interval of a minute): sendBeacon.
    (root / "one.html").write_text(PAGE.format(
        title="One", strata=shared_server.url, key=WRITE_KEY, options="flushInterval: 60000",
        body='strata.track("clicked", {n: 1}); strata.track("clicked", {n: 2});'))
    # Page two sends at once (flushAt 1): fetch with keepalive.
    (root / "two.html").write_text(PAGE.format(
        title="Two", strata=shared_server.url, key=WRITE_KEY, options="flushAt: 1",
        body='strata.identify("user-7"); strata.track("second_page", {ok: true});'))
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_snippet_tracks_and_flushes_on_navigation(site: str, shared_server: Any) -> None:
    script = shared_server.client.get(f"{shared_server.url}/sdk.js")
    assert script.status_code == 200 and len(script.content) < 8_000
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        try:
            page = browser.new_page()
            page.goto(f"{site}/one.html")
            anonymous_id = page.evaluate("strata.anonymousId()")
            assert page.evaluate("strata._queue()") == 3  # page_view + 2 clicks, unsent
            page.click("#next")
            page.wait_for_load_state("load")
            assert page.evaluate("strata.anonymousId()") == anonymous_id  # localStorage
            page.wait_for_function("strata._queue() === 0")
            page.goto("about:blank")  # leave page two as well
        finally:
            browser.close()
    expected = [("clicked", "", "/one.html"), ("clicked", "", "/one.html"),
                ("page_view", "", "/one.html"), ("page_view", "", "/two.html"),
                ("second_page", "user-7", "/two.html")]
    rows: list[Any] = []
    for _ in range(100):
        wait_loaded(shared_server)
        rows = shared_server.sql(
            "SELECT event_type, user_id, path, platform, count() OVER (PARTITION BY event_id) "
            f"FROM events WHERE anonymous_id = '{anonymous_id}' ORDER BY event_type, user_id, path"
        )["rows"]
        if len(rows) >= len(expected):
            break
        time.sleep(0.2)
    assert [tuple(r[:3]) for r in rows] == expected
    assert all(r[3] == "web" and r[4] == 1 for r in rows)
