"""The rollout end to end over real sockets: offer, resumable fetch, apply, status, canary
promotion, halting, operator rollback, and a device that was offline getting it later."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete

from cloud_agent.bundles import build_bundle
from cloud_agent.service import CloudService
from cloud_agent.store import tables
from edge_agent.agent import EdgeAgent
from edge_agent.link import CloudLink
from edge_agent.local_model import DeviceProfile, LocalModel, RuntimeSettings
from edge_agent.outbox import Outbox
from protocol import BaseModelRef
from tests.cloud_fixtures import Cloud
from tests.edge_agent.lora import write_random_lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model() -> Iterator[LocalModel]:
    settings = RuntimeSettings(threads=2, n_ctx=1024, max_tokens=12)
    local = LocalModel(profile=DeviceProfile(cores=2, memory_mb=4096), settings=settings)
    yield local
    local.close()


async def publish(service: CloudService, model: LocalModel, tmp_path: Path, **kw: object) -> int:
    version = await service.store.next_adapter_version()
    src = tmp_path / f"src{version}"
    src.mkdir()
    coverage = src / "coverage.json"
    coverage.write_text(json.dumps({"examples": [["How long can I return a jacket?", 0.9]]}))
    offer = build_bundle(
        service.bundles_dir, name="facts", version=version, base_model_sha256=model.sha256,
        files={"adapter.gguf": (write_random_lora(src / "a.gguf", seed=version), "adapter"),
               "coverage.json": (coverage, "coverage")},
        key=service.signing_key,
    )  # fmt: skip
    await service.store.add_adapter(offer, directory=service.bundles_dir / str(version), **kw)  # type: ignore[arg-type]
    await service.published()
    return version


async def device(cloud: Cloud, model: LocalModel, state: Path) -> EdgeAgent:
    token = await cloud.service.store.create_enrollment_token()
    link = CloudLink(
        cloud.url, state, enrollment_token=token, backoff_initial_s=0.05,
        base_model=BaseModelRef(id=model.model_id, sha256=model.sha256),
        outbox=Outbox(state / "outbox.db"),
    )  # fmt: skip
    agent = EdgeAgent(model, link=link)
    agent.enable_updates(state)
    await agent.start()
    assert await link.wait_up(10)
    return agent


async def until(predicate: object, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


async def test_a_published_bundle_reaches_the_device_which_applies_and_reports_it(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await device(cloud, model, tmp_path / "dev")
    assert agent.updater is not None
    try:
        version = await publish(cloud.service, model, tmp_path, canary_share=0.1)
        await asyncio.wait_for(agent.updater.applied.wait(), 30)
        assert agent.updates is not None and agent.updates.current_version == version
        assert model.active_adapter is not None
        assert agent.router.coverage.match("How long can I return a jacket?") > 0.8

        async def promoted() -> bool:
            rollouts = await cloud.service.store.list_rollouts()
            return rollouts[0]["state"] == "active"

        # The only device was the canary; its `applied` promotes the rollout to everyone.
        await until(promoted)
        health = await cloud.service.store.rollout_health(version)
        assert health is not None and health.applied == 1

        # The operator rolls back: the base model comes back under a newer version.
        undo = await cloud.service.rollback(version)
        assert undo > version

        async def back_to_base() -> bool:
            return agent.updates is not None and agent.updates.current_version == undo

        await until(back_to_base)
        assert model.active_adapter is None
        rollouts = {r["version"]: r["state"] for r in await cloud.service.store.list_rollouts()}
        assert rollouts == {version: "rolled_back", undo: "active"}
    finally:
        await agent.stop()
        model.activate(None)


async def test_a_fetch_the_cloud_cannot_serve_just_then_is_tried_again_on_the_same_connection(
    cloud: Cloud, model: LocalModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = await device(cloud, model, tmp_path / "dev")
    assert agent.updater is not None
    agent.updater.retry_initial_s = 0.05
    registry = cloud.service.metrics.registry
    connections = registry.get_sample_value("edgeloop_connections_total")
    try:
        version = await publish(cloud.service, model, tmp_path, state="halted")
        # Its files neither on this host's disk nor in the store, for now.
        built, away = cloud.service.bundles_dir / str(version), tmp_path / "away"
        built.rename(away)
        async with cloud.service.store.engine.begin() as conn:
            await conn.execute(delete(tables.BundleBlock))
        await cloud.service.store.set_rollout_state(version, "active", "test")
        await cloud.service.published()

        async def refused() -> bool:
            return any("cannot be served here" in r.getMessage() for r in caplog.records)

        await until(refused)
        away.rename(built)  # back: the next try is served
        await asyncio.wait_for(agent.updater.applied.wait(), 30)
        assert agent.updates is not None and agent.updates.current_version == version
        assert registry.get_sample_value("edgeloop_connections_total") == connections
    finally:
        await agent.stop()
        model.activate(None)


async def test_an_interrupted_download_resumes_and_an_offline_device_catches_up(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    version = await publish(cloud.service, model, tmp_path, state="active")
    record = await cloud.service.store.get_adapter(version)
    assert record is not None
    # A previous attempt got the first 1000 bytes of the adapter before the link dropped.
    staging = tmp_path / "dev" / "updates" / "staging" / f"facts-{version}"
    staging.mkdir(parents=True)
    adapter_path, adapter_size = record.files["adapter.gguf"]
    (staging / "adapter.gguf").write_bytes(adapter_path.read_bytes()[:1000])
    served = cloud.service.metrics.bundle_bytes._value.get()
    agent = await device(cloud, model, tmp_path / "dev")  # connects after the publication
    assert agent.updater is not None
    try:
        await asyncio.wait_for(agent.updater.applied.wait(), 30)
        assert agent.updates is not None and agent.updates.current_version == version
        coverage_size = record.files["coverage.json"][1]
        fetched = cloud.service.metrics.bundle_bytes._value.get() - served
        assert fetched == adapter_size - 1000 + coverage_size
    finally:
        await agent.stop()
        model.activate(None)


async def test_canary_rejections_halt_the_rollout(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await device(cloud, model, tmp_path / "dev")
    assert agent.updater is not None
    try:
        version = await cloud.service.store.next_adapter_version()
        src = tmp_path / "bad"
        src.mkdir()
        (src / "adapter.gguf").write_bytes(b"GGUF but not really an adapter")
        offer = build_bundle(
            cloud.service.bundles_dir, name="facts", version=version,
            base_model_sha256=model.sha256, key=cloud.service.signing_key,
            files={"adapter.gguf": (src / "adapter.gguf", "adapter")},
        )  # fmt: skip
        await cloud.service.store.add_adapter(
            offer, directory=cloud.service.bundles_dir / str(version), canary_share=0.5
        )
        await cloud.service.published()

        async def halted() -> bool:
            return (await cloud.service.store.list_rollouts())[0]["state"] == "halted"

        await until(halted)
        assert agent.updater.results[-1].status == "rejected"
        assert model.active_adapter is None
        # A halted rollout is offered to nobody, including devices that connect later.
        assert await cloud.service.store.offer_for("anyone", model.sha256) is None
    finally:
        await agent.stop()
