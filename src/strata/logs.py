"""Structured logs: one JSON object per line on stderr.

Fields: ts, level, logger, process role, message, and any ``extra`` the
caller passes. Keys and event payloads are never logged (docs/security.md).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_ROLE = "strata"


class JSONFormatter(logging.Formatter):
    _skip = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": _ROLE,
            "pid": os.getpid(),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._skip:
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(role: str, level: str | None = None) -> None:
    global _ROLE
    _ROLE = role
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("STRATA_LOG_LEVEL", "INFO")).upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
