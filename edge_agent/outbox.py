"""The durable outbox: feedback, reports and update statuses wait here until the cloud acks.

SQLite in WAL mode with ``synchronous=FULL``: when `put` returns, the entry survives the app
being killed (``kill -9``) or the device losing power. Entries carry the idempotency key the
cloud stores them under, so a resend after a lost ack is stored once.

The outbox is bounded (`capacity` entries). Past the cap it drops, and counts, by this policy:
the oldest ``report`` first (telemetry is the cheapest to lose), then the oldest entry of any
kind. Feedback is therefore only lost when the outbox holds nothing but feedback.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_agent.errors import EdgeAgentError

__all__ = ["Outbox", "OutboxEntry", "OutboxError"]

EntryKind = Literal["feedback", "report", "update_status"]


class OutboxError(EdgeAgentError):
    """The outbox file cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    idempotency_key: str
    kind: EntryKind
    payload: dict[str, Any]
    created_at: float
    attempts: int


class Outbox:
    """A bounded, durable queue of messages waiting for the cloud's ack."""

    def __init__(self, path: str | Path, *, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.path = Path(path)
        self.capacity = capacity
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox ("
                " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                " idempotency_key TEXT NOT NULL UNIQUE,"
                " kind TEXT NOT NULL,"
                " payload TEXT NOT NULL,"
                " created_at REAL NOT NULL,"
                " attempts INTEGER NOT NULL DEFAULT 0)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox_dropped (kind TEXT PRIMARY KEY, n INTEGER)"
            )
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot open the outbox at {self.path}: {exc}") from exc

    def put(self, kind: EntryKind, idempotency_key: str, payload: dict[str, Any]) -> None:
        """Store an entry durably (a second put of the same key is a no-op)."""
        with self._lock, self._write():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO outbox(idempotency_key, kind, payload, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (idempotency_key, kind, json.dumps(payload), time.time()),
                )
                self._enforce_cap()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _enforce_cap(self) -> None:
        (size,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        excess = size - self.capacity
        while excess > 0:
            row = (
                self._db.execute(
                    "SELECT seq, kind FROM outbox WHERE kind = 'report' ORDER BY seq LIMIT 1"
                ).fetchone()
                or self._db.execute("SELECT seq, kind FROM outbox ORDER BY seq LIMIT 1").fetchone()
            )
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[0],))
            self._db.execute(
                "INSERT INTO outbox_dropped(kind, n) VALUES (?, 1)"
                " ON CONFLICT(kind) DO UPDATE SET n = n + 1",
                (row[1],),
            )
            excess -= 1

    def pending(self, limit: int = 100) -> list[OutboxEntry]:
        """The oldest entries not yet acknowledged; each call counts as an attempt."""
        with self._lock, self._write():
            rows = self._db.execute(
                "SELECT idempotency_key, kind, payload, created_at, attempts FROM outbox"
                " ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
            if rows:
                self._db.executemany(
                    "UPDATE outbox SET attempts = attempts + 1 WHERE idempotency_key = ?",
                    [(r[0],) for r in rows],
                )
        return [OutboxEntry(r[0], r[1], json.loads(r[2]), r[3], r[4] + 1) for r in rows]

    def ack(self, idempotency_key: str) -> bool:
        """The cloud stored it: forget it. False if it was not here (an ack for a resend)."""
        with self._lock, self._write():
            cursor = self._db.execute(
                "DELETE FROM outbox WHERE idempotency_key = ?", (idempotency_key,)
            )
        return cursor.rowcount > 0

    def __len__(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(n)

    def waiting(self) -> tuple[dict[str, int], float | None]:
        """The entries waiting, by kind, and how many seconds the oldest has waited (None:
        nothing waits)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, count(*), min(created_at) FROM outbox GROUP BY kind"
            ).fetchall()
        oldest = min((row[2] for row in rows), default=None)
        return {kind: int(n) for kind, n, _ in rows}, (
            None if oldest is None else max(0.0, time.time() - oldest)
        )

    def dropped(self) -> dict[str, int]:
        """Entries dropped past the cap, by kind, since the outbox was created."""
        with self._lock:
            return dict(self._db.execute("SELECT kind, n FROM outbox_dropped").fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self) -> _Mapped:
        return _Mapped(self.path)


class _Mapped:
    """Turn sqlite3 errors into `OutboxError` (no payloads in the message)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, sqlite3.Error):
            raise OutboxError(f"outbox {self.path}: {type(exc).__name__}") from exc
