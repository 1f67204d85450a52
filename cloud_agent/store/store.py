"""`Store`: every read and write the cloud agent makes, over SQLAlchemy's async engine.

SQLite (the embedded default, ``sqlite+aiosqlite:///path``) runs in WAL mode with
``synchronous=FULL`` so an acknowledged write survives a crash; PostgreSQL
(``postgresql+asyncpg://...``) serves several replicas. The schema is migrated with Alembic on
open. Database errors leave as `StoreUnavailable` (retryable: the database is down or locked)
and `StoreError` for the rest (`cloud_agent.store.database`).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from cloud_agent.errors import EnrollmentRefused, StoreError, StoreUnavailable
from cloud_agent.store import tables as t
from cloud_agent.store.database import now, set_sqlite_pragmas_on_connect, sqlite_url, to_json
from cloud_agent.store.interactions import InteractionStore
from cloud_agent.store.jobs import JobStore
from cloud_agent.store.keyed import KeyedMessageStore
from cloud_agent.store.records import DeviceRecord
from cloud_agent.store.rollouts import RolloutStore

__all__ = [
    "FORGOTTEN", "MAX_ROUTING_HOURS", "MAX_TOKEN_NOTE", "REVOCATIONS", "Store", "hash_token",
    "sqlite_url",
]  # fmt: skip

MAX_TOKEN_NOTE = 256
"""The longest note an enrollment token keeps (its column's size)."""
MAX_ROUTING_HOURS = 24 * 366
"""The widest window the routing summary is asked for through the admin API and the CLI."""

REVOCATIONS = "edgeloop_revocations"
"""The PostgreSQL channel a revocation is announced on (payload: the device id), in the
transaction that revokes: the CLI's revocations reach the replicas as the API's do."""
FORGOTTEN = "edgeloop_forgotten"
"""The channel a device's erasure (`forget_device`) is announced on, likewise: each replica
then drops what it learned in memory from the device's feedback."""

MIGRATIONS = Path(__file__).with_name("migrations")


def hash_token(token: str) -> str:
    """Enrollment tokens are stored hashed: a leaked database does not leak usable tokens."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def _upgrade(connection: Connection) -> None:
    cfg = _alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _device(row: t.Device) -> DeviceRecord:
    return DeviceRecord(
        id=row.id,
        public_key=row.public_key,
        name=row.name,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        revoked_at=row.revoked_at,
        adapter_version=row.adapter_version,
        privacy_violations=row.privacy_violations,
    )


class Store(InteractionStore, KeyedMessageStore, JobStore, RolloutStore):
    """The cloud agent's persistent state: devices and enrollment, retention and privacy
    events here; the interaction log (`InteractionStore`), what devices send once per key
    (`KeyedMessageStore`), offline jobs (`JobStore`) and adapters with their rollouts
    (`RolloutStore`) in their own modules."""

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True, lock_timeout_s: float = 15.0) -> Store:
        """Connect to `url` and bring its schema up to date.

        `lock_timeout_s` is how long a SQLite write waits for another writer before the store
        reports itself unavailable.
        """
        kwargs: dict[str, Any] = {"json_serializer": to_json}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": lock_timeout_s}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=10)
        engine = create_async_engine(url, **kwargs)
        if url.startswith("sqlite"):
            set_sqlite_pragmas_on_connect(engine.sync_engine, lock_timeout_s)
        store = cls(engine, lock_timeout_s=lock_timeout_s)
        try:
            if migrate:
                async with engine.begin() as conn:
                    await conn.run_sync(_upgrade)
        except (OSError, SQLAlchemyError) as exc:
            await store.close()
            raise StoreUnavailable(f"cannot open the store: {exc}") from exc
        return store

    async def close(self) -> None:
        if self._log is not None:
            await self._log.close()
        await self.engine.dispose()

    # --- devices and enrollment -----------------------------------------------------------

    async def create_enrollment_token(
        self, ttl: timedelta = timedelta(days=7), note: str | None = None
    ) -> str:
        """A new one-time token (ValueError for a note longer than `MAX_TOKEN_NOTE`)."""
        if note is not None and len(note) > MAX_TOKEN_NOTE:
            raise ValueError(f"a token's note holds at most {MAX_TOKEN_NOTE} characters")
        token = f"elt_{secrets.token_urlsafe(24)}"
        issued = now()
        async with self._tx() as s:
            s.add(
                t.EnrollmentToken(
                    token_sha256=hash_token(token),
                    created_at=issued,
                    expires_at=issued + ttl,
                    note=note,
                )
            )
        return token

    async def enroll_device(
        self, token: str, device_id: str, public_key: str, name: str | None = None
    ) -> DeviceRecord:
        """Consume a one-time token and store the device, atomically."""
        enrolled = now()
        async with self._tx() as s:
            row = await s.get(t.EnrollmentToken, hash_token(token), with_for_update=True)
            if row is None or row.used_at is not None or row.expires_at < enrolled:
                raise EnrollmentRefused("enrollment token unknown, used or expired")
            existing = await s.scalar(select(t.Device).where(t.Device.public_key == public_key))
            if existing is not None:
                raise EnrollmentRefused("this public key is already enrolled")
            row.used_at, row.device_id = enrolled, device_id
            device = t.Device(
                id=device_id, public_key=public_key, name=name, created_at=enrolled,
                privacy_violations=0,
            )  # fmt: skip
            s.add(device)
        return _device(device)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        async with self._tx() as s:
            row = await s.get(t.Device, device_id)
            return _device(row) if row is not None else None

    async def get_devices(self, device_ids: Sequence[str]) -> dict[str, DeviceRecord]:
        """The devices enrolled under any of `device_ids`, by id (one query for all)."""
        async with self._tx() as s:
            rows = await s.scalars(select(t.Device).where(t.Device.id.in_(device_ids)))
            return {row.id: _device(row) for row in rows}

    async def list_devices(self) -> list[DeviceRecord]:
        async with self._tx() as s:
            rows = (await s.scalars(select(t.Device).order_by(t.Device.created_at))).all()
            return [_device(r) for r in rows]

    async def revoke_device(self, device_id: str) -> bool:
        """Revoke a device; False if it was already revoked. On PostgreSQL every replica
        listening on `REVOCATIONS` hears of it when the transaction commits."""
        async with self._tx() as s:
            return await self._revoke(s, device_id)

    async def _revoke(self, s: AsyncSession, device_id: str) -> bool:
        result = await s.execute(
            update(t.Device)
            .where(t.Device.id == device_id, t.Device.revoked_at.is_(None))
            .values(revoked_at=now())
        )
        changed = bool(result.rowcount)  # type: ignore[attr-defined]
        if changed:
            await self._announce(s, REVOCATIONS, device_id)
        return changed

    async def _announce(self, s: AsyncSession, channel: str, payload: str) -> None:
        """Tell the replicas listening on `channel` (PostgreSQL `NOTIFY`; nothing on SQLite),
        at commit, and not at all if the transaction rolls back."""
        if self.engine.dialect.name == "postgresql":
            await s.execute(select(func.pg_notify(channel, payload)))

    async def forget_device(self, device_id: str) -> dict[str, int] | None:
        """Erase what the store holds of a device (a user's request to be forgotten, a device
        given up): its interactions, feedback, reports, update statuses and deployments,
        privacy events, sessions and enrollment token, in one transaction. What stays is a
        revoked tombstone (the id and the public key, so the key cannot authenticate again),
        with its name and counters cleared. Returns the rows deleted per table; None for an
        unknown device."""
        by_device = (
            ("interactions", t.Interaction),
            ("feedback", t.Feedback),
            ("report_reasons", t.ReportReason),  # before the reports they refer to
            ("reports", t.Report),
            ("status_reports", t.StatusReport),
            ("deployments", t.Deployment),
            ("privacy_events", t.PrivacyEvent),
            ("sessions", t.Session),
            ("enrollment_tokens", t.EnrollmentToken),
        )
        async with self._tx() as s:
            if await s.get(t.Device, device_id) is None:
                return None
            counts = {}
            for name, table in by_device:
                result = await s.execute(delete(table).where(table.device_id == device_id))
                counts[name] = int(result.rowcount)  # type: ignore[attr-defined]
            await self._revoke(s, device_id)
            await self._announce(s, FORGOTTEN, device_id)
            await s.execute(
                update(t.Device).where(t.Device.id == device_id).values(
                    name=None, last_seen_at=None, base_model_sha256=None, adapter_version=None,
                    privacy_violations=0, forgotten_at=now(),
                )
            )  # fmt: skip
            return counts

    async def revoked_since(self, since: datetime) -> list[str]:
        """Ids of the devices revoked at or after `since` (by any replica or the CLI)."""
        async with self._tx() as s:
            rows = await s.scalars(select(t.Device.id).where(t.Device.revoked_at >= since))
            return list(rows)

    async def forgotten_since(self, since: datetime) -> list[str]:
        """Ids of the devices erased (`forget_device`) at or after `since`."""
        async with self._tx() as s:
            rows = await s.scalars(select(t.Device.id).where(t.Device.forgotten_at >= since))
            return list(rows)

    async def pin_signing_key(self, public_key: str) -> str:
        """The public half of the cluster's bundle-signing key in use: `public_key` if none
        is recorded yet (it is recorded now), else the last recorded (the first, or the last
        it was rotated to). Replicas starting together agree: the first write wins."""
        for _ in range(2):
            try:
                async with self._tx() as s:
                    keys = await self._signing_keys(s)
                    if keys:
                        return keys[-1].public_key
                    s.add(t.SigningKey(id=1, public_key=public_key, created_at=now()))
                    return public_key
            except IntegrityError:
                continue  # another replica wrote it first: read theirs
        raise StoreError("the signing key could not be recorded")

    async def signing_keys(self) -> list[tuple[str, str | None]]:
        """Every bundle-signing key the cluster has had, oldest first, with the previous
        key's endorsement of it (None for the first): the last is the one in use."""
        async with self._tx() as s:
            return [(row.public_key, row.endorsement) for row in await self._signing_keys(s)]

    async def rotate_signing_key(self, previous: str, public_key: str, endorsement: str) -> None:
        """Record that the key in use, `previous`, was rotated to `public_key`, which it
        endorsed. Raises `StoreError` when `previous` is not the key in use (another rotation
        came first)."""
        try:
            async with self._tx() as s:
                keys = await self._signing_keys(s)
                if not keys or keys[-1].public_key != previous:
                    raise StoreError("the signing key was rotated meanwhile: not the key in use")
                s.add(t.SigningKey(id=keys[-1].id + 1, public_key=public_key, created_at=now(),
                                   endorsement=endorsement))  # fmt: skip
        except IntegrityError as exc:
            raise StoreError("the signing key was rotated meanwhile") from exc

    @staticmethod
    async def _signing_keys(s: AsyncSession) -> list[t.SigningKey]:
        return list(await s.scalars(select(t.SigningKey).order_by(t.SigningKey.id)))

    # --- adapters and deployments -----------------------------------------------------------

    async def list_adapters(self) -> list[dict[str, Any]]:
        """Published adapter bundles, newest first (the closed loop writes them)."""
        async with self._tx() as s:
            rows = (await s.scalars(select(t.Adapter).order_by(t.Adapter.version.desc()))).all()
            return [
                {
                    "version": r.version,
                    "name": r.name,
                    "base_model_sha256": r.base_model_sha256,
                    "created_at": r.created_at.isoformat(),
                    "metrics": dict(r.metrics),
                }
                for r in rows
            ]

    async def deployment_summary(self) -> list[dict[str, Any]]:
        """Per adapter version, how many devices report each deployment status."""
        async with self._tx() as s:
            rows = (
                await s.execute(
                    select(t.Deployment.version, t.Deployment.status, func.count())
                    .group_by(t.Deployment.version, t.Deployment.status)
                    .order_by(t.Deployment.version.desc())
                )
            ).all()
        summary: dict[int, dict[str, int]] = {}
        for version, status, count in rows:
            summary.setdefault(version, {})[status] = count
        return [{"version": v, "devices": c} for v, c in summary.items()]

    # --- retention ------------------------------------------------------------------------

    async def purge(self, before: datetime, *, chunk: int = 5000) -> dict[str, int]:
        """Delete what was recorded before `before`: interactions, feedback, device reports,
        privacy events, ended sessions and expired enrollment tokens. Devices (and their
        privacy violation counts), adapters, rollouts and jobs stay. Returns the rows deleted
        per table.

        Interactions go in chunks of `chunk` rows, one transaction each, so a large purge
        never holds SQLite's write lock for long."""
        counts = {"interactions": 0}
        while True:
            async with self._tx() as s:
                old = (
                    select(t.Interaction.id)
                    .where(t.Interaction.created_at < before)
                    .order_by(t.Interaction.id)
                    .limit(chunk)
                )
                result = await s.execute(delete(t.Interaction).where(t.Interaction.id.in_(old)))
            deleted = int(result.rowcount)  # type: ignore[attr-defined]
            counts["interactions"] += deleted
            if deleted < chunk:
                break
        async with self._tx() as s:
            for name, statement in (
                ("feedback", delete(t.Feedback).where(t.Feedback.created_at < before)),
                # A report's reasons first: they refer to it.
                (
                    "report_reasons",
                    delete(t.ReportReason).where(t.ReportReason.created_at < before),
                ),
                ("reports", delete(t.Report).where(t.Report.created_at < before)),
                (
                    "privacy_events",
                    delete(t.PrivacyEvent).where(t.PrivacyEvent.created_at < before),
                ),
                ("sessions", delete(t.Session).where(t.Session.ended_at < before)),
                (
                    "enrollment_tokens",
                    delete(t.EnrollmentToken).where(t.EnrollmentToken.expires_at < before),
                ),
            ):
                result = await s.execute(statement)
                counts[name] = int(result.rowcount)  # type: ignore[attr-defined]
        return counts

    # --- privacy --------------------------------------------------------------------------

    async def record_privacy_event(self, device_id: str, request_id: str, kinds: list[str]) -> None:
        """Count raw personal data seen from a device. Only the kinds are stored."""
        async with self._tx() as s:
            s.add(
                t.PrivacyEvent(
                    device_id=device_id, request_id=request_id, kinds=sorted(set(kinds)),
                    created_at=now(),
                )
            )  # fmt: skip
            await s.execute(
                update(t.Device)
                .where(t.Device.id == device_id)
                .values(privacy_violations=t.Device.privacy_violations + 1)
            )

    async def privacy_event_count(self) -> int:
        async with self._tx() as s:
            return int(await s.scalar(select(func.count()).select_from(t.PrivacyEvent)) or 0)
