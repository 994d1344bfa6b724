"""Logging set-up: plain text lines, or one JSON object per line (`log.format = "json"`)."""

from __future__ import annotations

import json
import logging
import sys
import time

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _ClientFaults(logging.Filter):
    """aiohttp logs a client's broken request body (bad gzip, a connection dropped mid-body)
    with a traceback after poold has answered 400: the client's fault, not an error of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        if type(exc).__module__.startswith("aiohttp.http_exceptions"):  # malformed HTTP: a 400
            return False
        return type(exc).__name__ not in ("RequestPayloadError", "ClientPayloadError",
                                          "ConnectionResetError")


def setup(level: str, fmt: str) -> None:
    """(Re)configures the root logger; called at start and on reload."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaults) for f in server.filters):
        server.addFilter(_ClientFaults())
