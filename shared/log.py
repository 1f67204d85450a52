"""Logging setup shared by the CLI, the cloud service and the edge SDK.

Libraries never configure logging; programs call `configure_logging` once at start-up.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal

__all__ = ["QUIETED_LOGGERS", "configure_logging"]

LogFormat = Literal["text", "json"]

QUIETED_LOGGERS = ("websockets", "alembic")
"""Libraries held at WARNING: websockets logs every handshake failure at INFO with a traceback,
and Alembic narrates every migration step at INFO (the store logs what matters)."""

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str | int = "INFO", fmt: LogFormat = "text") -> None:
    """Send edgeloop's logs to stderr, as human text or as one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
