"""`BundleDistribution`: the server's side of adapter updates. It offers each device the
bundle its rollout cohort should run, serves the bundle's files in ranges, and reviews a
rollout when devices report on it.

It works on one session at a time and never writes to a socket: it queues frames on the
session, and the server sends them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from cloud_agent.batching import Batcher
from cloud_agent.errors import StoreError
from cloud_agent.metrics import Metrics
from cloud_agent.rollout import RolloutPolicy
from cloud_agent.store import AdapterRecord, Offers, Store
from protocol import (
    BundleManifest,
    Chunk,
    Error,
    ErrorCode,
    Fetch,
    ServerSession,
    make_error,
)

__all__ = ["BundleDistribution", "Receiver"]

log = logging.getLogger("edgeloop.cloud.updates")

OfferKey = tuple[str, str | None]
"""A device id and the sha256 of the base model it runs (None: not stated)."""


class Receiver(Protocol):
    """What distribution needs to know of one authenticated connection."""

    session: ServerSession
    device_id: str | None
    adapter_version: int | None
    base_model_sha256: str | None
    offered: int | None
    """The version last offered on this connection (each is offered once)."""


class BundleDistribution:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        max_chunk: int,
        rollout_policy: RolloutPolicy | None = None,
        bundles_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.bundles_dir = bundles_dir
        """Where a bundle built on another host is copied from the store on first use (None:
        bundles are served from the directory they were published in only)."""
        self._copies: dict[int, asyncio.Task[dict[str, tuple[Path, int]]]] = {}
        self.metrics = metrics
        self.max_chunk = max_chunk
        """Most bytes of file data per `chunk` frame."""
        self.rollout_policy = rollout_policy or RolloutPolicy()
        self.on_rollout_change: Callable[[], Awaitable[None]] | None = None
        """Called when a review changed a rollout's state: the server pushes offers to its
        connections; the service replaces it to tell every replica, which then pushes."""
        self._files: dict[int, dict[str, tuple[Path, int]]] = {}
        # Devices connecting together share one read of the offers, and devices reporting
        # together one review.
        sizes = metrics.store_batch
        self._offers = Batcher[OfferKey, AdapterRecord](
            self._fetch_offers, observe=sizes.labels("offers").observe
        )
        self._reviews = Batcher[int, None](
            self._review_versions, observe=sizes.labels("reviews").observe
        )

    async def drain(self) -> None:
        """Wait for the offer reads and reviews already asked for (before the store closes)."""
        await self._offers.drain()
        await self._reviews.drain()

    async def _fetch_offers(self, keys: list[OfferKey]) -> dict[OfferKey, AdapterRecord]:
        offers = await self.store.offers()
        return {key: record for key in keys if (record := offers.for_device(*key)) is not None}

    async def offer(self, conn: Receiver, offers: Offers | None = None) -> None:
        """Offer the device the newest bundle it should run, unless it runs it or was offered
        it on this connection. `offers` is a read of the offers already made for many."""
        if conn.device_id is None or not conn.session.is_open:
            return
        try:
            record = (
                offers.for_device(conn.device_id, conn.base_model_sha256)
                if offers is not None
                else await self._offers.submit((conn.device_id, conn.base_model_sha256))
            )
        except StoreError:
            return  # offered again on the next change or connection
        if record is None or record.version == conn.offered:
            return
        if conn.adapter_version is not None and record.version <= conn.adapter_version:
            return
        conn.offered = record.version
        self.metrics.update_offers.inc()
        conn.session.send(record.offer)

    async def review(self, version: int) -> None:
        """Let the rollout policy look at `version` after a device reported on it (its report
        stored), and call `on_rollout_change` if the rollout changed state. Reports arriving
        together share one review per version: after a publication, thousands of devices
        report within seconds, and each review counts the rollout's deployments and feedback."""
        await self._reviews.submit(version)

    async def _review_versions(self, versions: list[int]) -> dict[int, None]:
        changed = False
        for version in versions:
            try:
                state = await self.rollout_policy.review(self.store, version)
            except StoreError:
                continue  # reviewed again on the next report
            if state is not None:
                log.info("rollout of version %s is now %s", version, state)
                changed = True
        if changed and self.on_rollout_change is not None:
            try:
                await self.on_rollout_change()
            except StoreError as exc:  # offered on the next connection or publication poll
                log.warning("offers not pushed after the rollout change (%s)", exc)
        return {}

    async def fetch(self, session: ServerSession, request: Fetch) -> None:
        """Serve one range of a published bundle's file as a `chunk` and a binary frame, or
        a typed error. A session that ended meanwhile is sent nothing."""
        reply = await self._serve(request)
        if not session.is_open:
            return
        if isinstance(reply, Error):
            session.send(reply)
        else:
            header, data = reply
            session.send_chunk(header, data)
            self.metrics.bundle_bytes.inc(len(data))

    async def _serve(self, request: Fetch) -> Error | tuple[Chunk, bytes]:
        rid = request.request_id
        files = self._files.get(request.version)
        if files is None:
            try:
                record = await self.store.get_adapter(request.version)
            except StoreError:
                return make_error(ErrorCode.INTERNAL_ERROR, "store unavailable", request_id=rid)
            if record is None:
                return make_error(
                    ErrorCode.UNKNOWN_BUNDLE, f"no bundle version {request.version}",
                    request_id=rid,
                )  # fmt: skip
            try:
                files = await self._local_files(record)
            except (StoreError, OSError) as exc:
                log.warning("bundle %s cannot be served here: %s", request.version, exc)
                return _unavailable(rid)
            # A published bundle's files never change: look them up once, not per chunk.
            self._files[request.version] = files
        entry = files.get(request.file)
        if entry is None:
            return make_error(ErrorCode.UNKNOWN_FILE, f"no file {request.file}", request_id=rid)
        path, size = entry
        if request.offset > size:
            return make_error(
                ErrorCode.INVALID_RANGE, f"offset {request.offset} past {size}", request_id=rid
            )
        length = min(request.length, size - request.offset, self.max_chunk)
        try:
            data = await asyncio.to_thread(_read_range, path, request.offset, length)
        except OSError as exc:
            # Removed from under a running server: found again (or copied) on the next fetch.
            self._files.pop(request.version, None)
            log.warning("bundle %s: cannot read %s: %s", request.version, path, exc)
            return _unavailable(rid)
        header = Chunk(request_id=rid, file=request.file, offset=request.offset,
                       length=len(data), size=size)  # fmt: skip
        return header, data

    async def _local_files(self, record: AdapterRecord) -> dict[str, tuple[Path, int]]:
        """Paths to serve `record`'s files from: where it was published when they are there,
        else a copy from the store in `bundles_dir`, made once however many ask together."""
        files = record.files
        if self.bundles_dir is None or await asyncio.to_thread(_all_there, files):
            return files
        copy = self._copies.get(record.version)
        if copy is None:
            copy = self._copies[record.version] = asyncio.create_task(self._copy(record))
            copy.add_done_callback(lambda _: self._copies.pop(record.version, None))
        # A fetch given up does not stop the copy others wait for.
        return await asyncio.shield(copy)

    async def _copy(self, record: AdapterRecord) -> dict[str, tuple[Path, int]]:
        """Copy `record`'s files from the store into `bundles_dir`: each is written and
        checked in a staging directory first, so the bundle's own directory only ever holds
        intact files."""
        assert self.bundles_dir is not None
        directory = self.bundles_dir / str(record.version)
        manifest = BundleManifest.model_validate_json(record.manifest)
        copied = {f.name: (directory / f.name, f.size) for f in manifest.files}
        if await asyncio.to_thread(_all_there, copied):
            return copied
        await asyncio.to_thread(self.bundles_dir.mkdir, parents=True, exist_ok=True)
        staging = Path(
            await asyncio.to_thread(
                tempfile.mkdtemp, prefix=f".{record.version}-", dir=self.bundles_dir
            )
        )
        try:
            for f in manifest.files:
                digest, size = hashlib.sha256(), 0
                out = await asyncio.to_thread((staging / f.name).open, "wb")
                try:
                    async for block in self.store.bundle_blocks(record.version, f.name):
                        await asyncio.to_thread(out.write, block)
                        digest.update(block)
                        size += len(block)
                finally:
                    await asyncio.to_thread(out.close)
                if size != f.size or digest.hexdigest() != f.sha256:
                    raise StoreError(f"the store holds no intact copy of {f.name}")
            await asyncio.to_thread(
                _move_into, staging, directory, [f.name for f in manifest.files]
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
        log.info("bundle %s copied from the store to %s", record.version, directory)
        return copied


def _unavailable(request_id: str) -> Error:
    """A fetch this server cannot serve now (retryable from the device's side)."""
    message = "the bundle's files are not available here; try again later"
    return make_error(ErrorCode.INTERNAL_ERROR, message, request_id=request_id)


def _move_into(staging: Path, directory: Path, names: list[str]) -> None:
    directory.mkdir(exist_ok=True)
    for name in names:
        os.replace(staging / name, directory / name)


def _all_there(files: dict[str, tuple[Path, int]]) -> bool:
    return all(path.is_file() and path.stat().st_size == size for path, size in files.values())


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)
