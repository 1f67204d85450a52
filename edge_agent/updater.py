"""Receiving update offers from the cloud: verify, download (resumable), apply, report.

`Updater.handle(offer)` runs for each `update_offer` the link receives: `verify_offer` against
the key pinned at enrollment, then every missing byte range is fetched over the protocol's
`fetch` into the staging directory (an interrupted download continues from what is on disk
when the cloud offers the bundle again; a fetch the cloud could not serve just then is tried
again on the same connection, backing off), then `UpdateManager.apply`. The outcome goes to the
cloud as an `update_status` through the outbox, so it arrives even after a disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

from edge_agent.apply import ApplyResult, UpdateManager
from edge_agent.link import CloudLink, CloudUnavailable
from edge_agent.updates import BundleDownload, UpdateRejected, verify_offer
from protocol import BundleManifest, Chunk, UpdateOffer, UpdateStatus
from shared.ids import new_idempotency_key
from shared.keys import VerifyKey

__all__ = ["Updater"]

log = logging.getLogger("edgeloop.edge.updates")
TRANSIENT = frozenset(
    {"cloud.internal_error", "cloud.overloaded", "cloud.rate_limited", "cloud.deadline"}
)
"""Reasons a fetch failed that a later try on the same connection may not meet."""


class Updater:
    def __init__(
        self,
        manager: UpdateManager,
        link: CloudLink,
        *,
        base_model_sha256: str,
        staging: Path | None = None,
        chunk_bytes: int = 256 * 1024,
        retry_initial_s: float = 5.0,
        retry_max_s: float = 300.0,
    ) -> None:
        self.manager = manager
        self.link = link
        self.base_model_sha256 = base_model_sha256
        self.staging = staging or manager.root / "staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.chunk_bytes = chunk_bytes
        self.retry_initial_s = retry_initial_s
        """After a fetch the cloud could not serve just then, the first wait before trying
        again (doubling up to `retry_max_s`, while the link stays up)."""
        self.retry_max_s = retry_max_s
        self.results: list[ApplyResult] = []
        self.applied = asyncio.Event()
        link.adapter_version = manager.current_version
        link.on_offer = self.handle

    async def handle(self, offer: UpdateOffer) -> ApplyResult | None:
        server_key = self.link.identity.server_key
        if server_key is None:
            return None
        try:
            manifest = verify_offer(
                offer,
                pinned_key=VerifyKey.from_b64(server_key),
                base_model_sha256=self.base_model_sha256,
                current_version=self.manager.current_version,
            )
        except UpdateRejected as exc:
            log.warning("update offer refused: %s", exc)
            version = _claimed_version(offer)
            if version is not None:
                self._report(ApplyResult("rejected", version, exc.reason))
            return None
        download = BundleDownload(manifest, self.staging)
        try:
            await self._download(manifest, download)
        except CloudUnavailable as exc:
            # Kept on disk: the next offer (at the latest on reconnect) resumes from here.
            log.info("download of version %s paused: %s", manifest.version, exc)
            return None
        except UpdateRejected as exc:
            result = ApplyResult("rejected", manifest.version, exc.reason)
        else:
            result = await self.manager.apply(manifest, download)
        if result.status == "applied":
            self.link.adapter_version = result.version
        self._report(result)
        return result

    async def _download(self, manifest: BundleManifest, download: BundleDownload) -> None:
        for name in download.missing():
            entry = next(f for f in manifest.files if f.name == name)
            while (offset := download.offset(name)) < entry.size:
                header, data = await self._fetch(
                    manifest.version, name, offset, min(self.chunk_bytes, entry.size - offset)
                )
                if header.size != entry.size:
                    raise UpdateRejected("size_mismatch", f"{name}: cloud says {header.size}")
                if not data:
                    raise UpdateRejected("bad_range", f"{name}: empty chunk at {offset}")
                await asyncio.to_thread(download.write, name, header.offset, data)

    async def _fetch(
        self, version: int, name: str, offset: int, length: int
    ) -> tuple[Chunk, bytes]:
        """One range; one the cloud could not serve just then (a replica still copying the
        bundle, a busy store) is asked again in a while, on this connection."""
        pause = self.retry_initial_s
        while True:
            try:
                return await self.link.fetch(version, name, offset, length)
            except CloudUnavailable as exc:
                if exc.reason not in TRANSIENT:
                    raise
                log.info("download of version %s: %s; again in %.0f s", version, exc, pause)
                await asyncio.sleep(random.uniform(pause / 2, pause))
                pause = min(self.retry_max_s, pause * 2)

    def _report(self, result: ApplyResult) -> None:
        self.results.append(result)
        if result.status == "applied":
            self.applied.set()
        status = UpdateStatus(
            idempotency_key=new_idempotency_key(),
            version=result.version,
            status=result.status,
            reason=result.reason[:200] if result.reason else None,
            self_check=result.self_check,
        )
        if self.link.outbox is not None:
            self.link.queue_reliable(status)


def _claimed_version(offer: UpdateOffer) -> int | None:
    try:
        return BundleManifest.model_validate_json(offer.manifest).version
    except ValueError:
        return None
