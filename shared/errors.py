"""Exceptions raised by `shared`.

    EdgeloopError                 root of every exception edgeloop raises on purpose
     ├── ConfigError              a configuration value is missing or invalid (names the key)
     ├── InputFileError           an input file (workload, items, intents) is missing or malformed
     ├── KeyFileError             a key file is missing, unreadable or not an Ed25519 key
     └── SignatureError           a signature does not verify against the given key

The roots of `protocol`, `edge_agent` and `cloud_agent` derive from `EdgeloopError`, so an
application can catch everything of ours in one clause.
"""

from __future__ import annotations

__all__ = ["ConfigError", "EdgeloopError", "InputFileError", "KeyFileError", "SignatureError"]


class EdgeloopError(Exception):
    """Root of every exception edgeloop raises on purpose."""


class ConfigError(EdgeloopError):
    """A configuration value is missing or invalid.

    `key` is the dotted path of the offending setting (``cloud.port``) and `source` says where
    the value came from (a file path or an environment variable name).
    """

    def __init__(self, key: str, problem: str, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"configuration key {key!r}{where}: {problem}")


class InputFileError(EdgeloopError):
    """An input file (a workload, job items, intents) is missing, unreadable or malformed; the
    message names the file and, for JSON Lines, the line."""


class KeyFileError(EdgeloopError):
    """A key file is missing, unreadable or does not hold an Ed25519 key."""


class SignatureError(EdgeloopError):
    """A signature does not verify against the given public key."""
