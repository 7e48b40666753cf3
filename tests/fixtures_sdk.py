"""A real scripted HTTP server for SDK tests: it records every request,
can hold requests at a gate, answer 429 a number of times, and proxy the
rest to a live strata server."""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


class ScriptedServer:
    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        self.gate = threading.Event()
        self.gate.set()
        self.too_many = 0  # answer this many requests with 429
        self.retry_after = "0"
        self.requests: list[dict[str, Any]] = []  # {"at", "events", "status"}
        self.started = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length)
                with owner.lock:
                    owner.started += 1
                owner.gate.wait()
                raw = gzip.decompress(body) if self.headers.get("content-encoding") == "gzip" else body
                events = json.loads(raw)["batch"]
                with owner.lock:
                    throttle = owner.too_many > 0
                    if throttle:
                        owner.too_many -= 1
                    retry_after = owner.retry_after
                if throttle:
                    status, payload, headers = 429, b'{"error":"slow down"}', {"Retry-After": retry_after}
                elif owner.upstream is None:
                    status, headers = 200, {}
                    payload = json.dumps({"accepted": len(events), "rejected": []}).encode()
                else:
                    forwarded = {k: v for k, v in self.headers.items()
                                 if k.lower() in ("authorization", "content-type", "content-encoding")}
                    answer = httpx.post(f"{owner.upstream}{self.path}", content=body,
                                        headers=forwarded, timeout=60)
                    status, payload, headers = answer.status_code, answer.content, {}
                with owner.lock:
                    owner.requests.append({"at": time.monotonic(), "events": events, "status": status})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def event_ids(self, status: int = 200) -> list[str]:
        with self.lock:
            return [e["event_id"] for r in self.requests if r["status"] == status for e in r["events"]]

    def wait_started(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.started >= count:
                    return
            time.sleep(0.01)
        raise AssertionError(f"only {self.started} requests started")

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_loaded(server: Any, timeout: float = 120.0) -> None:
    """Wait until the loaders (events, quarantine, identities) caught up with
    the log. Other consumers (the archiver rolls Parquet files once a
    minute) are not waited for: these tests read the store only."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = server.status()
        loaders = {k: v for k, v in status["consumers"].items() if k.startswith("loader-")}
        if loaders and all(v.get("lag_events") == 0 for v in loaders.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"loaders did not catch up: {status}")
