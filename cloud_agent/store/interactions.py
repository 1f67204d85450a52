"""Store operations for the interaction log (a part of `Store`): escalations written in
batches off the request path, read back for the admin API and distillation.

On SQLite the batches go through a sqlite3 connection on a thread of their own (`SqliteLog`),
each as a few multi-row inserts (`SqliteBatchInsert`); on PostgreSQL through the async engine.
An interaction logged again under the same device and request id (a device may reuse an id once
its request is over) replaces the earlier one: the log keeps the last answer the device got.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Insert,
    Table,
    Update,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from cloud_agent.store import tables as t
from cloud_agent.store.database import (
    Transactions,
    mapped_errors,
    now,
    sqlite_pragmas,
)
from cloud_agent.store.records import InteractionRecord, NewInteraction, SessionEvent

__all__ = ["InteractionStore", "SqliteBatchInsert", "SqliteLog", "SqliteStatement"]


_KEY = ("device_id", "request_id")
"""The interactions' unique key: an interaction logged again under it replaces the first."""

_SESSIONS: Table = t.Session.__table__  # type: ignore[assignment]
_DEVICES: Table = t.Device.__table__  # type: ignore[assignment]

SESSION_STARTED = insert(_SESSIONS).values(
    id=bindparam("session"),
    device_id=bindparam("device"),
    server_id=bindparam("server"),
    started_at=bindparam("at"),
)
DEVICE_SEEN = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("device"))
    .values(last_seen_at=bindparam("at"), adapter_version=bindparam("adapter"),
            base_model_sha256=bindparam("sha"))
)  # fmt: skip
SESSION_ENDED = (
    update(_SESSIONS)
    .where(_SESSIONS.c.id == bindparam("session"))
    .values(ended_at=bindparam("at"), close_code=bindparam("code"))
)


class InteractionStore(Transactions):
    """The interaction log and the session events written with it."""

    def __init__(self, engine: AsyncEngine, *, lock_timeout_s: float = 15.0) -> None:
        super().__init__(engine)
        dialect = engine.dialect
        sqlite = dialect.name == "sqlite"
        self._sqlite_interactions = (
            SqliteBatchInsert.for_dialect(t.INTERACTIONS, dialect, replace_on=_KEY)
            if sqlite
            else None
        )
        self._log = (
            SqliteLog(engine.url.database, lock_timeout_s)
            if sqlite and engine.url.database not in (None, "", ":memory:")
            else None
        )
        self._driver = (
            {stmt: SqliteStatement(stmt, dialect)
             for stmt in (SESSION_STARTED, DEVICE_SEEN, SESSION_ENDED)}
            if self._log is not None
            else {}
        )  # fmt: skip

    async def record_interaction(self, it: NewInteraction) -> None:
        await self.record_interactions([it])

    async def record_interactions(
        self, batch: list[NewInteraction], sessions: list[SessionEvent] | None = None
    ) -> None:
        """Store many interactions and session events in one transaction (the server writes
        them in batches: one commit, and one fsync, for hundreds of records). Of interactions
        with the same device and request id, the last is kept."""
        sessions = sessions or []
        if not batch and not sessions:
            return
        if len({(it.device_id, it.request_id) for it in batch}) < len(batch):
            batch = list({(it.device_id, it.request_id): it for it in batch}.values())
        created = now()
        before, after = _session_writes(sessions)
        # The insert's parameters are built here, on the event loop: the writing thread then
        # holds the GIL only to bind them.
        inserts = (
            self._sqlite_interactions.statements([_interaction_values(it, created) for it in batch])
            if self._sqlite_interactions is not None
            else []
        )
        if self._log is not None:
            driver = self._driver
            await self._log.write(
                [driver[stmt].bound(rows) for stmt, rows in before]
                + inserts
                + [driver[stmt].bound(rows) for stmt, rows in after]
            )
            return

        def write(s: Session) -> None:
            for stmt, rows in before:
                s.execute(stmt, rows)
            if self._sqlite_interactions is not None:
                connection = s.connection()
                for statement in inserts:
                    connection.exec_driver_sql(statement.sql, statement.params)
            elif batch:
                # PostgreSQL (asyncpg: no worker thread, no GIL hand-overs): a Core insert on
                # the table; the ORM's bulk path costs a fifth more per row.
                s.execute(_POSTGRES_UPSERT, [
                    dict(zip(INTERACTION_COLUMNS, _interaction_values(it, created), strict=True))
                    for it in batch])  # fmt: skip
            for stmt, rows in after:
                s.execute(stmt, rows)

        async with self._tx() as session:
            await session.run_sync(write)

    async def list_interactions(
        self,
        *,
        limit: int = 100,
        device_id: str | None = None,
        status: str | None = None,
        request_id: str | None = None,
        rated_only: bool = False,
        rated_since: datetime | None = None,
        before_id: int | None = None,
        keys: Collection[tuple[str, str]] | None = None,
    ) -> list[InteractionRecord]:
        """Newest first, each with the latest feedback on it (if any); `rated_only` keeps those
        that have feedback, `rated_since` those with feedback stored since then. `before_id`
        pages back: the interactions older than the one with that id (the last `id` of the
        previous page). `keys` keeps those with these (device id, request id) pairs."""
        async with self._tx() as s:
            query = select(t.Interaction).order_by(t.Interaction.id.desc()).limit(limit)
            if before_id is not None:
                query = query.where(t.Interaction.id < before_id)
            if device_id is not None:
                query = query.where(t.Interaction.device_id == device_id)
            if status is not None:
                query = query.where(t.Interaction.status == status)
            if request_id is not None:
                query = query.where(t.Interaction.request_id == request_id)
            if keys is not None:
                pair = tuple_(t.Interaction.device_id, t.Interaction.request_id)
                query = query.where(pair.in_(list(keys)))
            if rated_only or rated_since is not None:
                feedback = select(t.Feedback.request_id).where(
                    t.Feedback.device_id == t.Interaction.device_id,
                    t.Feedback.request_id == t.Interaction.request_id,
                )
                if rated_since is not None:
                    feedback = feedback.where(t.Feedback.created_at >= rated_since)
                query = query.where(feedback.exists())
            rows = (await s.scalars(query)).all()
            # The feedback on those rows, joined against the same query rather than listed by
            # id: a list of tens of thousands of ids exceeds the drivers' parameter limits.
            page = query.with_only_columns(
                t.Interaction.device_id, t.Interaction.request_id
            ).subquery()
            fb_rows = (
                await s.scalars(
                    select(t.Feedback)
                    .join(
                        page,
                        (t.Feedback.device_id == page.c.device_id)
                        & (t.Feedback.request_id == page.c.request_id),
                    )
                    .order_by(t.Feedback.created_at)
                )
            ).all()
            ratings = {(f.device_id, f.request_id): f for f in fb_rows}
            out = []
            for r in rows:
                fb = ratings.get((r.device_id, r.request_id))
                out.append(
                    InteractionRecord(
                        id=r.id,
                        device_id=r.device_id,
                        request_id=r.request_id,
                        created_at=r.created_at,
                        messages=list(r.prompt.get("messages", [])),
                        placeholders=list(r.prompt.get("placeholders", [])),
                        answer=r.answer,
                        status=r.status,
                        error_name=r.error_name,
                        intent=r.intent,
                        route_reasons=list(r.route_reasons),
                        latency_ms=r.latency_ms,
                        prompt_tokens=r.prompt_tokens,
                        completion_tokens=r.completion_tokens,
                        backend=r.backend,
                        model=r.model,
                        fact_ids=list(r.fact_ids),
                        rating=fb.rating if fb else None,
                        correction=fb.correction if fb else None,
                    )
                )
            return out

    async def count_training_candidates(self, since: datetime | None = None) -> int:
        """Answered escalations that could teach the next adapter, new since `since`: answers
        quoted from a knowledge fact logged since then, and answers rated up or corrected
        since then: what the distillation dataset trusts, before it leaves out duplicates and
        follow-ups."""
        i, f = t.Interaction, t.Feedback
        rated = select(f.request_id).where(
            f.device_id == i.device_id,
            f.request_id == i.request_id,
            or_(f.rating == "positive", f.correction.is_not(None)),
        )
        quoted = i.backend == "knowledge"
        if since is not None:
            rated = rated.where(f.created_at >= since)
            quoted = and_(quoted, i.created_at >= since)
        query = (
            select(func.count()).select_from(i).where(i.status == "ok", or_(quoted, rated.exists()))
        )
        async with self._tx() as s:
            return int(await s.scalar(query) or 0)


@dataclass(frozen=True, slots=True)
class DriverStatement:
    """SQL for sqlite3 itself, with its parameters: one row, or many (`many`)."""

    sql: str
    params: Sequence[Any]
    many: bool = False


class SqliteStatement:
    """A Core statement compiled once for SQLite's driver: rows of named values in, the
    driver's SQL and positional parameters out, each value bound as the column's type binds it
    (times as SQLAlchemy stores them, JSON as text)."""

    def __init__(self, statement: Insert | Update, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._params = [
            (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in compiled.positiontup or ()
        ]
        """Each positional parameter's name, and how its value is converted (None: as is)."""

    def bound(self, rows: Iterable[Mapping[str, Any]]) -> DriverStatement:
        params = self._params
        return DriverStatement(
            self.sql,
            [
                tuple(row[k] if convert is None else convert(row[k]) for k, convert in params)
                for row in rows
            ],
            many=True,
        )


Writes = list[tuple[Insert | Update, list[dict[str, Any]]]]
"""Statements, each with its rows."""


def _session_writes(sessions: list[SessionEvent]) -> tuple[Writes, Writes]:
    """What session events write: before a batch's interactions (sessions started, and their
    devices seen), and after them (sessions ended)."""
    started = [e for e in sessions if e.kind == "started"]
    ended = [e for e in sessions if e.kind == "ended"]
    before: Writes = []
    if started:
        before.append(
            (
                SESSION_STARTED,
                [
                    {
                        "session": e.session_id,
                        "device": e.device_id,
                        "server": e.server_id or "",
                        "at": e.at,
                    }
                    for e in started
                ],
            )
        )
        before.append(
            (
                DEVICE_SEEN,
                [
                    {
                        "device": e.device_id,
                        "at": e.at,
                        "adapter": e.adapter_version,
                        "sha": e.base_model_sha256,
                    }
                    for e in started
                ],
            )
        )
    after: Writes = (
        [
            (
                SESSION_ENDED,
                [{"session": e.session_id, "at": e.at, "code": e.close_code} for e in ended],
            )
        ]
        if ended
        else []
    )
    return before, after


class SqliteBatchInsert:
    """Many rows into one SQLite table as a few multi-row ``INSERT ... VALUES (...), (...)``
    statements, driver-level.

    SQLite runs on a thread beside the event loop (`SqliteLog`), and Python's sqlite3 releases
    the GIL around every row an executemany steps through; with the event loop busy on the
    other side, each of those hand-overs costs more than the insert itself (the interaction log
    took a third of the server's CPU per request in `bench/cloud_roundtrip.py`). One statement
    per chunk hands the GIL over once per chunk. Chunks have power-of-two sizes, so a handful of
    statement texts cover every batch and stay in sqlite3's statement cache. Rows are tuples of
    the table's columns but the primary key, in table order (`columns`); values are bound as the
    dialect's own bind processors would bind them (JSON columns as JSON text). With
    `replace_on` (the columns of a unique constraint), a row whose key is stored already
    replaces the stored one's other columns (``ON CONFLICT ... DO UPDATE``)."""

    def __init__(
        self,
        table: Table,
        dialect: Dialect,
        max_variables: int,
        *,
        replace_on: Sequence[str] = (),
    ) -> None:
        columns = [c for c in table.columns if not c.primary_key]
        quote = dialect.identifier_preparer.quote
        head = (
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(c.name) for c in columns)}) VALUES "
        )
        row = "(" + ", ".join("?" * len(columns)) + ")"
        tail = ""
        if replace_on:
            updated = [c.name for c in columns if c.name not in replace_on]
            tail = (
                f" ON CONFLICT ({', '.join(quote(c) for c in replace_on)}) DO UPDATE SET "
                + ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in updated)
            )
        self.columns = [c.key for c in columns]
        """The keys of the columns a row holds, in order."""
        self._converts = [
            (i, convert)
            for i, c in enumerate(columns)
            if (convert := c.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        """The columns whose values are converted for binding, by position, and how."""
        self.chunk = 1
        while self.chunk * 2 * len(columns) <= max_variables and self.chunk < 256:
            self.chunk *= 2
        """Most rows per statement: a power of two, within SQLite's limit on parameters."""
        self._sql = {
            2**k: head + ", ".join([row] * 2**k) + tail for k in range(self.chunk.bit_length())
        }

    @classmethod
    def for_dialect(
        cls, table: Table, dialect: Dialect, *, replace_on: Sequence[str] = ()
    ) -> SqliteBatchInsert:
        # Up to 999 parameters per statement before SQLite 3.32, 32766 since.
        version = getattr(dialect.dbapi, "sqlite_version_info", (3, 32, 0))
        return cls(table, dialect, 32766 if version >= (3, 32, 0) else 999, replace_on=replace_on)

    def statements(self, rows: list[tuple[Any, ...]]) -> list[DriverStatement]:
        """The statements, with their parameters, that insert `rows` in order."""
        out = []
        start = 0
        while start < len(rows):
            size = self.chunk
            while size > len(rows) - start:
                size //= 2
            # Column by column (converted where the column says), then interleaved row by row:
            # a few C-level passes per chunk rather than a Python step per value.
            columns: list[Any] = list(zip(*rows[start : start + size], strict=True))
            for i, convert in self._converts:
                columns[i] = _bound(convert, columns[i])
            out.append(
                DriverStatement(
                    self._sql[size],
                    tuple(itertools.chain.from_iterable(zip(*columns, strict=True))),
                )
            )
            start += size
        return out


INTERACTION_COLUMNS = (
    "device_id", "request_id", "session_id", "created_at", "prompt", "answer", "status",
    "error_name", "intent", "route_reasons", "priority", "latency_ms", "prompt_tokens",
    "completion_tokens", "backend", "model", "fact_ids",
)  # fmt: skip
"""The interactions table's columns but its key, in table order: what `_interaction_values`
gives (a test holds them to the table)."""


def _interaction_values(it: NewInteraction, created: datetime) -> tuple[Any, ...]:
    return (
        it.device_id, it.request_id, it.session_id, created,
        {"messages": it.messages, "placeholders": it.placeholders}, it.answer, it.status,
        it.error_name, it.intent, it.route_reasons, it.priority, it.latency_ms,
        it.prompt_tokens, it.completion_tokens, it.backend, it.model, it.fact_ids,
    )  # fmt: skip


_POSTGRES_UPSERT = (_insert := postgresql.insert(t.INTERACTIONS)).on_conflict_do_update(
    index_elements=list(_KEY),
    set_={c: _insert.excluded[c] for c in INTERACTION_COLUMNS if c not in _KEY},
)
"""The interactions insert on PostgreSQL: a stored (device, request) pair is replaced."""


class SqliteLog:
    """Writes the interaction log's batches to a SQLite file: each batch in one call to a
    thread of its own, over a sqlite3 connection of its own to the same file.

    Each trip to a worker thread makes it and the busy event loop hand the GIL back and forth,
    so a batch takes one trip, and in it as few calls into SQLite as can be: a batch that is a
    single statement (the usual one: up to 256 interactions, no session events) runs as a
    transaction of its own, with no ``BEGIN`` and ``COMMIT`` around it. That also spares SQLite
    its statement journal: inside an explicit transaction, a statement that may fail halfway
    (a constraint) first copies every page it changes, so it can be undone alone, and for a
    multi-row insert that was a hundred temporary-file writes per batch.

    Its commits do not wait for the disk (``synchronous=NORMAL``, in WAL mode): a crash of the
    process loses none, a power cut may lose the last of them, and the database stays whole.
    The log is bookkeeping, kept in memory up to `InteractionRecorder.max_delay_s` before it
    is written at all; waiting for an fsync each batch cost the server a twentieth of its
    round trips in `bench.cloud_roundtrip`. Feedback and everything acknowledged to a device
    is written through the store's own connections, which wait (``FULL``)."""

    def __init__(self, path: str, lock_timeout_s: float) -> None:
        self._path = path
        self._lock_timeout_s = lock_timeout_s
        self._connection: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeloop-log")

    async def write(self, statements: Sequence[DriverStatement]) -> None:
        """Run `statements` in one transaction on the log's thread."""
        if statements:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._run, statements)

    def _run(self, statements: Sequence[DriverStatement]) -> None:
        with mapped_errors():
            connection = self._connect()
            if len(statements) == 1 and not statements[0].many:
                connection.execute(statements[0].sql, statements[0].params)
                return
            connection.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements:
                    if statement.many:
                        connection.executemany(statement.sql, statement.params)
                    else:
                        connection.execute(statement.sql, statement.params)
            except BaseException:
                connection.rollback()
                raise
            connection.execute("COMMIT")

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            # isolation_level=None: sqlite3 begins no transaction by itself; `_run` says when.
            connection = sqlite3.connect(
                self._path, timeout=self._lock_timeout_s, isolation_level=None,
                check_same_thread=False,
            )  # fmt: skip
            sqlite_pragmas(connection, int(self._lock_timeout_s * 1000), "NORMAL")
            self._connection = connection
        return self._connection

    async def close(self) -> None:
        """Wait for a batch being written, then close the connection."""
        await asyncio.to_thread(self._thread.shutdown)
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _bound(convert: Callable[[Any], Any], values: Sequence[Any]) -> list[Any]:
    """`values` converted for binding. Rows of a batch share some values (its timestamp, the
    empty tuple): each object is converted once."""
    out = list(values)
    seen: dict[int, Any] = {}
    for i, value in enumerate(out):
        bound = seen.get(id(value), _MISSING)
        if bound is _MISSING:
            bound = seen[id(value)] = convert(value)
        out[i] = bound
    return out


_MISSING = object()
