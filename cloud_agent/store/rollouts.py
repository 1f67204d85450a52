"""Store operations for adapter bundles and their rollouts (a mixin of `Store`).

A published bundle gets a rollout that starts as ``canary``: a deterministic share of the
enrolled devices (ranked by a hash of version and device id, at least one device), chosen once
when the bundle is published and kept with the rollout, is offered it first. The rollout
policy (`cloud_agent.rollout`) moves it to ``active`` (every device), ``halted`` or
``rolled_back``; this module only records and answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update

from cloud_agent.store import tables as t
from cloud_agent.store.database import Transactions, now
from protocol import BundleManifest, UpdateOffer

__all__ = ["AdapterRecord", "Offers", "RolloutHealth", "RolloutStore", "canary_cohort"]

OFFERED_STATES = ("canary", "active")
BLOCK_BYTES = 1 << 20
"""Size of the blocks a bundle's files are kept in, in the store."""


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    version: int
    name: str
    base_model_sha256: str
    manifest: str
    signature: str
    directory: Path
    state: str
    canary_share: float

    @property
    def offer(self) -> UpdateOffer:
        return UpdateOffer(manifest=self.manifest, signature=self.signature)

    @property
    def files(self) -> dict[str, tuple[Path, int]]:
        """File name -> (path, declared size), from the signed manifest."""
        manifest = BundleManifest.model_validate_json(self.manifest)
        return {f.name: (self.directory / f.name, f.size) for f in manifest.files}


@dataclass(frozen=True, slots=True)
class Offers:
    """The bundles on offer at one moment (rollouts in canary or active), newest first, each
    with its canary cohort: what every device should be offered, worked out without a query
    per device."""

    bundles: tuple[tuple[AdapterRecord, frozenset[str]], ...]

    def for_device(
        self, device_id: str, base_model_sha256: str | None = None
    ) -> AdapterRecord | None:
        """The newest bundle for this device: active, or in canary with the device in its
        cohort; built for `base_model_sha256` when that is given."""
        for record, canary in self.bundles:
            if base_model_sha256 is not None and record.base_model_sha256 != base_model_sha256:
                continue
            if record.state == "active" or device_id in canary:
                return record
        return None


@dataclass(frozen=True, slots=True)
class RolloutHealth:
    version: int
    state: str
    canary_size: int
    canary_applied: int
    canary_failed: int
    applied: int
    failed: int
    feedback_positive: int
    feedback_negative: int


def canary_cohort(version: int, device_ids: Sequence[str], share: float) -> list[str]:
    """The devices offered bundle `version` first: `share` of them (at least one), ranked by a
    hash of version and device id, so each bundle picks a different, stable cohort."""
    size = max(1, math.ceil(share * len(device_ids))) if device_ids else 0
    rank = {d: hashlib.sha256(f"{version}:{d}".encode()).hexdigest() for d in device_ids}
    return sorted(device_ids, key=rank.__getitem__)[:size]


def _record(adapter: t.Adapter, rollout: t.Rollout) -> AdapterRecord:
    return AdapterRecord(
        version=adapter.version,
        name=adapter.name,
        base_model_sha256=adapter.base_model_sha256,
        manifest=adapter.manifest,
        signature=adapter.signature,
        directory=Path(adapter.directory),
        state=rollout.state,
        canary_share=rollout.canary_share,
    )


async def _offers(store: Transactions) -> Offers:
    async with store._tx() as s:
        rows = await s.execute(
            select(t.Adapter, t.Rollout)
            .join(t.Rollout, t.Rollout.version == t.Adapter.version)
            .where(t.Rollout.state.in_(OFFERED_STATES))
            .order_by(t.Adapter.version.desc())
        )
        return Offers(tuple((_record(a, r), frozenset(r.canary)) for a, r in rows))


class RolloutStore(Transactions):
    """Adapters, rollouts and per-device deployment state."""

    async def next_adapter_version(self) -> int:
        async with self._tx() as s:
            return int(await s.scalar(select(func.max(t.Adapter.version))) or 0) + 1

    async def add_adapter(
        self,
        offer: UpdateOffer,
        *,
        directory: Path,
        canary_share: float = 0.1,
        state: str = "canary",
    ) -> int:
        manifest = BundleManifest.model_validate_json(offer.manifest)
        published = now()
        async with self._tx() as s:
            s.add(
                t.Adapter(
                    version=manifest.version, name=manifest.name,
                    base_model_sha256=manifest.base_model_sha256, manifest=offer.manifest,
                    signature=offer.signature, directory=str(directory),
                    created_at=manifest.created_at, metrics=dict(manifest.metrics),
                )
            )  # fmt: skip
            await s.flush()
            # The files go in with the record: a replica on any host can serve the bundle.
            for f in manifest.files:
                with (directory / f.name).open("rb") as fh:
                    seq = 0
                    while block := await asyncio.to_thread(fh.read, BLOCK_BYTES):
                        await s.execute(
                            insert(t.BundleBlock).values(
                                version=manifest.version, file=f.name, seq=seq, data=block
                            )
                        )
                        seq += 1
            ids = (await s.scalars(select(t.Device.id).where(t.Device.revoked_at.is_(None)))).all()
            canary = canary_cohort(manifest.version, ids, canary_share)
            s.add(
                t.Rollout(
                    version=manifest.version, state=state, canary_share=canary_share,
                    canary=canary, reason=None, created_at=published, updated_at=published,
                )
            )  # fmt: skip
        return manifest.version

    async def bundle_blocks(self, version: int, file: str) -> AsyncIterator[bytes]:
        """A published bundle's file from the store, block by block (nothing if the bundle
        was published before files were kept in the store)."""
        seq = 0
        while True:
            async with self._tx() as s:
                block = await s.scalar(
                    select(t.BundleBlock.data).where(
                        t.BundleBlock.version == version,
                        t.BundleBlock.file == file,
                        t.BundleBlock.seq == seq,
                    )
                )
            if block is None:
                return
            yield block
            seq += 1

    async def get_adapter(self, version: int) -> AdapterRecord | None:
        async with self._tx() as s:
            row = (
                await s.execute(
                    select(t.Adapter, t.Rollout)
                    .join(t.Rollout, t.Rollout.version == t.Adapter.version)
                    .where(t.Adapter.version == version)
                )
            ).first()
            return _record(*row) if row else None

    async def list_rollouts(self) -> list[dict[str, Any]]:
        async with self._tx() as s:
            rows = (await s.scalars(select(t.Rollout).order_by(t.Rollout.version.desc()))).all()
            return [
                {
                    "version": r.version,
                    "state": r.state,
                    "canary_share": r.canary_share,
                    "reason": r.reason,
                    "updated_at": r.updated_at.isoformat(),
                }
                for r in rows
            ]

    async def set_rollout_state(self, version: int, state: str, reason: str | None = None) -> bool:
        """Move a rollout to `state`; False if there is no such rollout or nothing changed."""
        async with self._tx() as s:
            result: Any = await s.execute(
                update(t.Rollout)
                .where(t.Rollout.version == version, t.Rollout.state != state)
                .values(state=state, reason=reason, updated_at=now())
            )
            return bool(result.rowcount)

    async def offers(self) -> Offers:
        """The bundles on offer now: one query, whatever the number of devices asking."""
        return await _offers(self)

    async def offer_for(
        self, device_id: str, base_model_sha256: str | None = None
    ) -> AdapterRecord | None:
        """The newest bundle this device should run now (its cohort and base model permitting)."""
        return (await _offers(self)).for_device(device_id, base_model_sha256)

    async def rollout_health(self, version: int) -> RolloutHealth | None:
        async with self._tx() as s:
            rollout = await s.get(t.Rollout, version)
            if rollout is None:
                return None
            canary = set(rollout.canary)
            rows = (
                await s.execute(
                    select(t.Deployment.device_id, t.Deployment.status).where(
                        t.Deployment.version == version
                    )
                )
            ).all()
            ratings = dict(
                (
                    await s.execute(
                        select(t.Feedback.rating, func.count())
                        .where(t.Feedback.adapter_version == version)
                        .group_by(t.Feedback.rating)
                    )
                ).all()
            )
        failed_states = ("rejected", "rolled_back")
        return RolloutHealth(
            version=version,
            state=rollout.state,
            canary_size=len(canary),
            canary_applied=sum(1 for d, st in rows if d in canary and st == "applied"),
            canary_failed=sum(1 for d, st in rows if d in canary and st in failed_states),
            applied=sum(1 for _, st in rows if st == "applied"),
            failed=sum(1 for _, st in rows if st in failed_states),
            feedback_positive=int(ratings.get("positive", 0)),
            feedback_negative=int(ratings.get("negative", 0)),
        )
