"""Listening sockets for the commands' servers: a port in use is a `ConfigError` naming the
setting, not a traceback (and not uvicorn exiting the process, which it does when it cannot
bind; it is handed a socket bound here instead)."""

from __future__ import annotations

import os
import socket

from shared.errors import ConfigError

__all__ = ["cannot_listen", "listen"]


def cannot_listen(key: str, host: str, port: int, exc: OSError) -> ConfigError:
    """The error for a server that could not bind `host`:`port` (the setting `key`)."""
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return ConfigError(key, f"cannot listen on {host}:{port} ({reason})")


def listen(host: str, port: int, *, key: str) -> socket.socket:
    """A TCP socket listening on `host`:`port` (0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise cannot_listen(key, host, port, exc) from exc
