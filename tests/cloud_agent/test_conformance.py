"""The conformance kit passes against our cloud agent and fails against a broken server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve

from cloud_agent.backends import ScriptedBackend
from cloud_agent.bundles import rotate_signing_key
from cloud_agent.conformance import run_conformance
from cloud_agent.service import CloudService
from cloud_agent.store import Store
from protocol import SUBPROTOCOL
from shared.cli import main
from tests.cloud_fixtures import Cloud, make_config

pytestmark = pytest.mark.slow


async def test_the_cloud_agent_passes_every_scenario(cloud: Cloud) -> None:
    token = await cloud.service.store.create_enrollment_token()
    report = await run_conformance(cloud.url, token, timeout=10)
    print(report.table())
    assert report.passed, report.table()
    assert len(report.outcomes) == 11


async def test_a_cloud_whose_key_was_rotated_passes_every_scenario(
    tmp_path: Path, kb_path: Path
) -> None:
    config = make_config(tmp_path, kb_path)
    config.data_dir.mkdir(parents=True)
    store = await Store.open(config.resolved_database_url())
    try:
        await rotate_signing_key(config.data_dir, store)
    finally:
        await store.close()
    service = await CloudService.create(config, backend=ScriptedBackend("Layer up."))
    await service.start()
    try:
        token = await service.store.create_enrollment_token()
        report = await run_conformance(f"ws://127.0.0.1:{service.port}/v1", token, timeout=10)
        assert report.passed, report.table()
    finally:
        await service.stop()


async def test_the_command_prints_the_table_and_exits_nonzero_on_failure(
    cloud: Cloud, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without a token enrollment fails, and everything that needs the device fails with it.
    code = await asyncio.to_thread(main, ["conformance", cloud.url, "--timeout", "5"])
    out = capsys.readouterr().out
    assert code == 1
    assert "enrollment" in out and "FAIL" in out and "bad version" in out
    assert out.strip().splitlines()[-1].endswith("failed")


async def test_a_server_that_sends_invalid_frames_fails_the_kit() -> None:
    async def broken(ws: ServerConnection) -> None:
        async for _ in ws:
            await ws.send(json.dumps({"type": "challenge", "nonce": "short"}))

    async with serve(broken, "127.0.0.1", 0, subprotocols=[SUBPROTOCOL]) as server:  # type: ignore[list-item]
        port = next(iter(server.sockets)).getsockname()[1]
        report = await run_conformance(f"ws://127.0.0.1:{port}/v1", "elt_whatever", timeout=3)
    assert not report.passed
    assert "schema" in report.outcomes[0].detail
