"""`BundleDistribution`: reviews after device reports, shared when reports arrive together;
bundles served on a host other than the one that built them."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import update

from cloud_agent.bundles import build_bundle
from cloud_agent.distribution import BundleDistribution
from cloud_agent.metrics import Metrics
from cloud_agent.rollout import RolloutPolicy
from cloud_agent.store import Store, tables
from cloud_agent.store.rollouts import BLOCK_BYTES
from cloud_agent.store.store import sqlite_url
from protocol import ChunkReceived, Fetch, FetchReceived, Limits, RequestFailed
from shared import SigningKey
from tests.cloud_agent.test_store import publish, ten_enrolled
from tests.protocol.harness import open_pair


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(sqlite_url(tmp_path / "cloud.db"))
    yield opened
    await opened.close()


@dataclass(frozen=True)
class CountingPolicy(RolloutPolicy):
    """The shipped policy, counting how often it reviews."""

    calls: list[int] | None = None

    async def review(self, store: Store, version: int) -> str | None:
        assert self.calls is not None
        self.calls.append(version)
        return await super().review(store, version)


async def test_reports_arriving_together_share_a_review_and_a_change_is_announced_once(
    store: Store, tmp_path: Path
) -> None:
    ids = await ten_enrolled(store)
    await publish(store, tmp_path, 1, canary_share=1.0)  # every device is in the canary
    calls: list[int] = []
    announced: list[bool] = []
    updates = BundleDistribution(
        store, Metrics(), max_chunk=4096, rollout_policy=CountingPolicy(calls=calls)
    )

    async def announce() -> None:
        announced.append(True)

    updates.on_rollout_change = announce
    for i, device in enumerate(ids):
        await store.add_update_status(device, f"k{i}", 1, "applied", None, {})
    await asyncio.gather(*(updates.review(1) for _ in ids))
    assert [r["state"] for r in await store.list_rollouts()] == ["active"]
    assert announced == [True]
    assert 1 <= len(calls) < len(ids)


async def test_a_bundle_built_on_another_host_is_copied_from_the_store_and_served(
    store: Store, tmp_path: Path
) -> None:
    src = tmp_path / "adapter.gguf"
    src.write_bytes(os.urandom(2 * BLOCK_BYTES + 12345))  # three blocks
    offer = build_bundle(
        tmp_path / "built", name="facts", version=1, base_model_sha256="ab" * 32,
        files={"adapter.gguf": (src, "adapter")}, key=SigningKey.generate(),
    )  # fmt: skip
    await store.add_adapter(offer, directory=tmp_path / "built" / "1")
    shutil.rmtree(tmp_path / "built")  # that host's disk is not this one's

    reads: list[int] = []
    blocks = store.bundle_blocks

    def counted(version: int, file: str):  # type: ignore[no-untyped-def]
        reads.append(version)
        return blocks(version, file)

    store.bundle_blocks = counted  # type: ignore[method-assign]
    here = tmp_path / "replica" / "bundles"
    updates = BundleDistribution(store, Metrics(), max_chunk=2048, bundles_dir=here)
    pair = open_pair(
        limits=Limits(
            max_message_bytes=4096, max_in_flight=4, max_requests_per_minute=60,
            heartbeat_s=20,
        )
    )  # fmt: skip
    ranges = [(0, 2000), (BLOCK_BYTES - 1000, 2000), (2 * BLOCK_BYTES, 2000)]
    for n, (offset, length) in enumerate(ranges):
        pair.client.send(
            Fetch(request_id=f"f{n}", version=1, file="adapter.gguf", offset=offset,
                  length=length)
        )  # fmt: skip
    pair.pump()
    # Devices asking together: one copy for them all.
    await asyncio.gather(
        *(updates.fetch(pair.server, e.request) for e in pair.of("server", FetchReceived))
    )
    pair.pump()
    chunks = {c.header.request_id: c for c in pair.of("client", ChunkReceived)}
    original = src.read_bytes()
    for n, (offset, length) in enumerate(ranges):
        assert chunks[f"f{n}"].data == original[offset : offset + length]
    assert reads == [1], "copied once"
    assert (here / "1" / "adapter.gguf").read_bytes() == original
    assert [p.name for p in here.iterdir()] == ["1"], "no staging left behind"


async def test_a_bundle_with_no_intact_copy_is_a_typed_error_not_a_broken_session(
    store: Store, tmp_path: Path
) -> None:
    await publish(store, tmp_path, 1)
    shutil.rmtree(tmp_path / "bundles")
    async with store.engine.begin() as conn:
        await conn.execute(update(tables.BundleBlock).values(data=b"tampered"))
    for bundles_dir in (tmp_path / "replica", None):
        updates = BundleDistribution(store, Metrics(), max_chunk=2048, bundles_dir=bundles_dir)
        pair = open_pair()
        pair.client.send(
            Fetch(request_id="f1", version=1, file="adapter.gguf", offset=0, length=10)
        )
        pair.pump()
        (asked,) = pair.of("server", FetchReceived)
        await updates.fetch(pair.server, asked.request)
        pair.pump()
        (failed,) = pair.of("client", RequestFailed)
        assert failed.error.name == "internal_error" and pair.client.is_open
    # Not even an empty directory for the bundle: one there would be taken for its files'
    # place (and could not have them moved in whole).
    assert list((tmp_path / "replica").iterdir()) == [], "nothing half-written"


async def test_a_fetch_whose_session_ends_while_it_is_served_sends_nothing(
    store: Store, tmp_path: Path
) -> None:
    await publish(store, tmp_path, 1)
    updates = BundleDistribution(store, Metrics(), max_chunk=2048)
    pair = open_pair()
    pair.client.send(Fetch(request_id="f1", version=1, file="adapter.gguf", offset=0, length=10))
    pair.pump()
    (asked,) = pair.of("server", FetchReceived)
    serving = asyncio.create_task(updates.fetch(pair.server, asked.request))
    await asyncio.sleep(0)  # looking the bundle up in the store
    pair.server.receive_close(1006, "connection lost")
    await serving  # no error for a session that is gone
    assert not pair.server.has_data_to_send
