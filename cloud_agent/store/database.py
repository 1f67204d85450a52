"""What every part of `Store` shares: the engine, transactions whose database errors leave as
ours, SQLite's settings and how JSON columns are written.

Database errors are mapped at this boundary: `StoreUnavailable` (retryable: the database is
down or locked) and `StoreError` for the rest.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pydantic_core
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from cloud_agent.errors import EnrollmentRefused, StoreError, StoreUnavailable

__all__ = [
    "Transactions",
    "mapped_errors",
    "now",
    "set_sqlite_pragmas_on_connect",
    "sqlite_pragmas",
    "sqlite_url",
    "to_json",
]


def now() -> datetime:
    return datetime.now(UTC)


def sqlite_url(path: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(path).resolve()}"


class Transactions:
    """The base of the store's parts: an async engine and one transaction at a time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncSession]:
        """One transaction; database errors leave it as `StoreError`/`StoreUnavailable`."""
        with mapped_errors():
            async with self._sessions() as session, session.begin():
                yield session

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the database answers."""
        async with self._tx() as s:
            await s.execute(select(1))


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Database errors (SQLAlchemy's, or sqlite3's own where the log drives it directly) leave
    as `StoreUnavailable` (retryable) or `StoreError`."""
    try:
        yield
    except (EnrollmentRefused, IntegrityError):
        raise
    except (
        OperationalError,
        DBAPIError,
        sqlite3.OperationalError,
        OSError,
        ConnectionError,
    ) as exc:
        raise StoreUnavailable(f"database unavailable: {type(exc).__name__}") from exc
    except (SQLAlchemyError, sqlite3.Error) as exc:
        raise StoreError(f"database error: {type(exc).__name__}") from exc


def to_json(value: Any) -> str:
    """JSON columns are written by pydantic-core's serializer: a fifth of the time of
    `json.dumps` for the small lists an interaction holds (three per logged request)."""
    return pydantic_core.to_json(value).decode()


SqliteSync = Literal["FULL", "NORMAL"]


def set_sqlite_pragmas_on_connect(
    engine: Engine, lock_timeout_s: float, synchronous: SqliteSync = "FULL"
) -> None:
    """Every connection of `engine` in WAL mode with ``synchronous=FULL`` (an acknowledged
    write survives a crash; ``NORMAL`` for writes that may be lost to a power cut, never to a
    crash of the process), foreign keys on, waiting `lock_timeout_s` for another writer."""
    busy_ms = int(lock_timeout_s * 1000)
    event.listen(engine, "connect", lambda conn, _: sqlite_pragmas(conn, busy_ms, synchronous))


def sqlite_pragmas(dbapi_conn: Any, busy_ms: int, synchronous: SqliteSync) -> None:
    """The settings of `set_sqlite_pragmas_on_connect`, on one DB-API connection."""
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
    cursor.close()
