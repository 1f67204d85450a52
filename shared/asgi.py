"""uvicorn for programs that handle their own signals."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

__all__ = ["SignalFreeServer"]


class SignalFreeServer(uvicorn.Server):
    """uvicorn without its signal handling. By itself it takes SIGINT and SIGTERM while it
    serves, and once shut down raises the signal again for the handler it found, which ends a
    program before it can stop the rest of its work; a program using this one sets
    `should_exit` from its own handlers instead."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
