"""Sockets for the commands: listening sockets for their servers (a port in use is a
`ConfigError` naming the setting, not a traceback, and not uvicorn exiting the process, which
it does when it cannot bind: it is handed a socket bound here instead), and the TLS context a
client checks a ``wss://`` server's certificate with."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from pathlib import Path

from shared.errors import ConfigError

__all__ = ["cannot_listen", "is_loopback", "listen", "tls_client_context"]


def cannot_listen(key: str, host: str, port: int, exc: OSError) -> ConfigError:
    """The error for a server that could not bind `host`:`port` (the setting `key`)."""
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return ConfigError(key, f"cannot listen on {host}:{port} ({reason})")


def is_loopback(host: str) -> bool:
    """Whether a server bound to `host` is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listen(host: str, port: int, *, key: str) -> socket.socket:
    """A TCP socket listening on `host`:`port` (0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise cannot_listen(key, host, port, exc) from exc


def tls_client_context(url: str, ca_file: Path | None, *, key: str) -> ssl.SSLContext | None:
    """The context a client checks the certificate of the ``wss://`` server at `url` with:
    against the certificate authorities in the PEM file `ca_file` (the setting `key`) instead
    of the system's, for a cloud whose certificate a private CA signed (or that signed it
    itself). None, for the system's, without one; and for a ``ws://`` URL, which has no TLS."""
    if ca_file is None or not url.startswith("wss://"):
        return None
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise ConfigError(key, f"{ca_file}: no such file") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            key, f"{ca_file}: no certificate could be read from it (PEM expected: {exc})"
        ) from None
