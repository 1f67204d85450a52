"""`Cluster`: what one cloud replica tells the others, over PostgreSQL ``LISTEN/NOTIFY``.

Channels (a payload is text of at most 8,000 bytes):

- ``edgeloop_rollouts``: rollouts changed (`PublicationFeed`);
- ``edgeloop_revocations``: a device was revoked; the store sends it in the transaction that
  revokes (`cloud_agent.store.REVOCATIONS`), so `edgeloop cloud revoke` and `forget` on any
  host end the device's session wherever it is;
- ``edgeloop_forgotten``: a device was erased (`cloud_agent.store.FORGOTTEN`), likewise sent
  by the store: each replica unlearns what its feedback taught the knowledge index;
- ``edgeloop_sessions``: devices that opened a session on a replica (`SESSIONS`), so the one
  session a device may have holds across replicas: a replica still holding an older session of
  that device closes it as replaced.

With SQLite there is one replica: `notify` calls this process's handlers directly. A
notification is best effort (one sent while a replica's listening connection is down does not
reach it); what must not be missed is also polled from the store by its user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from cloud_agent.metrics import Metrics

__all__ = ["SESSIONS", "Cluster"]

log = logging.getLogger("edgeloop.cloud.cluster")

SESSIONS = "edgeloop_sessions"

Handler = Callable[[str], Awaitable[None]]


class Cluster:
    """One listening connection per replica; handlers are subscribed before `start`."""

    reconnect_s = (1.0, 30.0)
    """First and longest wait before listening again after the connection was lost."""
    notify_timeout_s = 5.0
    """How long a notice may take to send: a database that stopped answering does not hold up
    what sends it (a session opening, a revocation)."""

    def __init__(self, database_url: str, *, metrics: Metrics | None = None) -> None:
        self.database_url = database_url
        self.metrics = metrics
        self.replica_id = secrets.token_hex(8)
        """This process among the replicas, for notices its senders should not act on when
        they hear them back (a session it opened, a reload it made)."""
        self._handlers: dict[str, list[Handler]] = {}
        self._connection: Any = None
        self._lock = asyncio.Lock()
        """One query at a time on the connection (asyncpg refuses a second one meanwhile)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False

    @property
    def shared(self) -> bool:
        """Whether other replicas can share this store (PostgreSQL) and hear its notices."""
        return self.database_url.startswith("postgresql")

    @property
    def listening(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    def subscribe(self, channel: str, handler: Handler) -> None:
        self._handlers.setdefault(channel, []).append(handler)

    async def start(self) -> None:
        """Listen on every subscribed channel (PostgreSQL); raises if the database cannot be
        reached now, as the store would."""
        if self.shared:
            await self._listen()

    async def stop(self) -> None:
        self._stopped = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close(timeout=5)

    async def notify(self, channel: str, payload: str) -> None:
        """Tell every replica, this one included. Without a listening connection (SQLite, or
        PostgreSQL while it reconnects) only this replica's handlers hear it."""
        if self.listening:
            try:
                async with self._lock:
                    # The listening connection hears its own notification: this replica
                    # reacts through the same path as every other one.
                    await self._connection.execute(
                        "SELECT pg_notify($1, $2)", channel, payload,
                        timeout=self.notify_timeout_s,
                    )  # fmt: skip
                return
            except Exception as exc:  # noqa: BLE001 - the connection went; tell ourselves
                log.warning("could not notify other replicas on %s (%s)", channel, exc)
        for handler in self._handlers.get(channel, ()):
            await handler(payload)

    async def _listen(self) -> None:
        import asyncpg

        connection = await asyncpg.connect(_asyncpg_dsn(self.database_url))
        for channel in self._handlers:
            await connection.add_listener(channel, self._notified)
        connection.add_termination_listener(self._lost)
        self._connection = connection

    def _notified(self, _connection: Any, _pid: int, channel: str, payload: str) -> None:
        if self.metrics is not None:
            self.metrics.cluster_notices.labels(channel).inc()
        for handler in self._handlers.get(channel, ()):
            self._spawn(self._run(handler, channel, payload))

    async def _run(self, handler: Handler, channel: str, payload: str) -> None:
        try:
            await handler(payload)
        except Exception:  # noqa: BLE001 - one failed handler must not stop listening
            log.exception("handling a notification on %s failed", channel)

    def _lost(self, _connection: Any) -> None:
        if not self._stopped:
            log.warning("the listening connection to PostgreSQL was lost; reconnecting")
            self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        wait, longest = self.reconnect_s
        while not self._stopped:
            await asyncio.sleep(wait)
            try:
                await self._listen()
            except Exception as exc:  # noqa: BLE001 - the database may be down a while yet
                log.warning("listening again failed (%s); next try in %.0f s", exc, wait)
                wait = min(longest, wait * 2)
            else:
                log.info("listening to other replicas again")
                return

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)
