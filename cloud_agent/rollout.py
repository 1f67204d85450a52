"""Rollout policy, operator rollback, and telling every replica that offers changed.

- `RolloutPolicy.review(version)` after each update status or feedback on a version: a
  canary rollout halts when canary devices reject or roll back (more than
  `max_canary_failures`), and goes ``active`` (offered to everyone) once enough canary devices
  applied it; any rollout halts when negative feedback on answers from its adapter passes
  `max_negative_share` (after `min_feedback` ratings).
- `rollback(version)`: the operator's undo. The bundle before it (or the base model alone,
  when there was none) is published again under a new, higher version, active at once, so
  devices that only ever move forward accept it.
- `rollouts(store)`: what the operator sees of each rollout: its state, its devices by
  status, and where the devices running its adapter answered their requests in the last day.
- `PublicationFeed`: replicas learn of publications and state changes through the `Cluster`'s
  channel ``edgeloop_rollouts`` (PostgreSQL ``LISTEN/NOTIFY``), and in any case by polling the
  store every `poll_s` (a notification lost with a connection, a change the CLI made).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cloud_agent.bundles import build_bundle
from cloud_agent.cluster import Cluster
from cloud_agent.errors import CloudAgentError
from cloud_agent.store import Store
from protocol import BundleManifest
from shared.keys import SigningKey

__all__ = ["CHANNEL", "PublicationFeed", "RolloutPolicy", "rollback", "rollouts"]

log = logging.getLogger("edgeloop.cloud.rollout")
CHANNEL = "edgeloop_rollouts"


@dataclass(frozen=True)
class RolloutPolicy:
    max_canary_failures: int = 0
    min_canary_applied_share: float = 0.5
    min_feedback: int = 10
    max_negative_share: float = 0.3

    async def review(self, store: Store, version: int) -> str | None:
        """Apply the policy to one rollout; returns the new state if it changed."""
        health = await store.rollout_health(version)
        if health is None or health.state not in ("canary", "active"):
            return None
        rated = health.feedback_positive + health.feedback_negative
        if (
            rated >= self.min_feedback
            and health.feedback_negative / rated > self.max_negative_share
        ):
            reason = f"negative feedback {health.feedback_negative}/{rated}"
            if await store.set_rollout_state(version, "halted", reason):
                return "halted"
        if health.state != "canary":
            return None
        if health.canary_failed > self.max_canary_failures:
            reason = f"{health.canary_failed} canary device(s) rejected or rolled back"
            if await store.set_rollout_state(version, "halted", reason):
                return "halted"
        needed = max(1, round(self.min_canary_applied_share * health.canary_size))
        if health.canary_applied >= needed and health.canary_failed <= self.max_canary_failures:
            reason = f"{health.canary_applied}/{health.canary_size} canary devices applied"
            if await store.set_rollout_state(version, "active", reason):
                return "active"
        return None


async def rollback(
    store: Store, version: int, *, signing_key: SigningKey, bundles_dir: Path
) -> int:
    """Halt `version` and publish what came before it again, as a new active version."""
    current = await store.get_adapter(version)
    if current is None:
        raise CloudAgentError(f"no adapter version {version}")
    previous = None
    for candidate in range(version - 1, 0, -1):
        record = await store.get_adapter(candidate)
        if record is not None and record.state not in ("halted", "rolled_back"):
            previous = record
            break
    manifest = BundleManifest.model_validate_json(current.manifest)
    new_version = await store.next_adapter_version()
    with tempfile.TemporaryDirectory() as tmp:
        if previous is not None:
            previous_files = BundleManifest.model_validate_json(previous.manifest).files
            files = {f.name: (previous.directory / f.name, f.kind) for f in previous_files}
        else:  # back to the base model: a bundle with no adapter and empty coverage
            empty = Path(tmp) / "coverage.json"
            empty.write_text(json.dumps({"examples": []}))
            files = {"coverage.json": (empty, "coverage")}
        offer = build_bundle(
            bundles_dir,
            name=f"rollback-of-{version}",
            version=new_version,
            base_model_sha256=manifest.base_model_sha256,
            files=files,
            key=signing_key,
            metrics={"rollback_of": float(version)},
        )
    await store.set_rollout_state(version, "rolled_back", f"operator rollback to {new_version}")
    await store.add_adapter(offer, directory=bundles_dir / str(new_version), state="active")
    return new_version


async def rollouts(store: Store, *, routing_hours: float = 24.0) -> list[dict[str, Any]]:
    """Every rollout, newest first, with its devices by deployment status (`devices`) and the
    routing reports of the last `routing_hours` from devices answering with its adapter
    (`routing`: the counts by route and the share answered on the device; None before any):
    whether the adapter moves traffic onto the devices, next to how its rollout goes."""
    devices = {d["version"]: d["devices"] for d in await store.deployment_summary()}
    routing = await store.routing_summary(datetime.now(UTC) - timedelta(hours=routing_hours))
    out = await store.list_rollouts()
    for rollout in out:
        rollout["devices"] = devices.get(rollout["version"], {})
        counts = routing.by_adapter_version.get(rollout["version"])
        rollout["routing"] = counts.as_dict() if counts is not None else None
    return out


class PublicationFeed:
    """Calls `on_change()` whenever rollouts may have changed, on this replica or another."""

    def __init__(
        self,
        store: Store,
        on_change: Callable[[], Awaitable[None]],
        *,
        cluster: Cluster,
        poll_s: float = 10.0,
    ) -> None:
        self.store = store
        self.on_change = on_change
        self.cluster = cluster
        self.poll_s = poll_s
        self._poller: asyncio.Task[None] | None = None
        self._seen: list[dict[str, Any]] | None = None
        cluster.subscribe(CHANNEL, self._notified)

    async def start(self) -> None:
        """Start polling (the cluster, started by its owner, carries the notices)."""
        self._seen = await self.store.list_rollouts()
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    async def announce(self) -> None:
        """Tell every replica (this one included) that rollouts changed."""
        await self.cluster.notify(CHANNEL, "changed")

    async def _notified(self, _payload: str) -> None:
        await self._changed()

    async def _changed(self) -> None:
        try:
            seen = await self.store.list_rollouts()
            await self.on_change()
        except Exception:  # noqa: BLE001 - a failed push is retried by the next poll
            log.exception("could not push rollout changes")
            return
        # Only once pushed: a push that failed leaves the change for the next poll to find.
        self._seen = seen

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                now = await self.store.list_rollouts()
            except Exception:  # noqa: BLE001 - the store may be briefly unavailable
                continue
            if now != self._seen:
                await self._changed()
