"""A publication on one cloud replica reaches a device connected to another, which serves its
files from the store (they were built on a third host): two real
`edgeloop cloud serve` processes on the real PostgreSQL server, told through LISTEN/NOTIFY
(their polling is set to an hour, so only the notification can explain the offer)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from cloud_agent.bundles import build_bundle
from cloud_agent.store import Store
from examples.handshake import Device
from protocol import (
    ChunkReceived,
    EnrollmentCompleted,
    EnrollmentCredentials,
    Fetch,
    UpdateOffered,
    Welcomed,
)
from shared import SigningKey

pytestmark = pytest.mark.slow
TOKEN = "adm_replica_test_token"


async def start_replica(
    tmp_path: Path, n: int, database_url: str
) -> tuple[subprocess.Popen[str], int, int]:
    data_dir = tmp_path / f"replica{n}"
    config = tmp_path / f"replica{n}.toml"
    config.write_text(
        f'data_dir = "{data_dir}"\ndatabase_url = "{database_url}"\nport = 0\nadmin_port = 0\n'
        f'admin_token = "{TOKEN}"\n[rollout]\npoll_s = 3600\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "cloud", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    lines = [await asyncio.to_thread(proc.stdout.readline) for _ in range(2)]
    if not all(lines):  # it stopped before serving: nothing is left behind
        proc.kill()
        code = await asyncio.to_thread(proc.wait, 30)
        proc.stdout.close()
        raise AssertionError(f"replica {n} did not start (exit status {code})")
    ws_port = int(lines[0].rsplit(":", 1)[1].split("/")[0])
    admin_port = int(lines[1].split()[2].rsplit(":", 1)[1])
    return proc, ws_port, admin_port


@pytest.fixture
async def store(postgres_db: str) -> AsyncIterator[Store]:
    opened = await Store.open(postgres_db)
    yield opened
    await opened.close()


async def test_a_publication_on_one_replica_reaches_a_device_on_the_other(
    tmp_path: Path, postgres_db: str, store: Store
) -> None:
    # One cluster, one signing key: both replicas' data directories hold the same file.
    key = SigningKey.generate()
    for n in range(2):
        (tmp_path / f"replica{n}").mkdir()
        key.save(tmp_path / f"replica{n}" / "server.key")
    procs = []
    try:
        for n in range(2):
            procs.append(await start_replica(tmp_path, n, postgres_db))
        (_, _, admin_a), (_, ws_b, _) = procs[0], procs[1]

        src = tmp_path / "adapter.bin"
        src.write_bytes(os.urandom(5000))
        offer = build_bundle(
            tmp_path / "bundles", name="facts", version=1, base_model_sha256="0" * 64,
            files={"adapter.gguf": (src, "adapter")}, key=key,
        )  # fmt: skip
        await store.add_adapter(offer, directory=tmp_path / "bundles" / "1", state="halted")
        # Built on another host: the replicas find the files in the store, not on their disk.
        shutil.rmtree(tmp_path / "bundles")

        token = await store.create_enrollment_token()
        device = await Device.connect(
            f"ws://127.0.0.1:{ws_b}/v1", EnrollmentCredentials(token, SigningKey.generate())
        )
        assert isinstance(await device.next_event(EnrollmentCompleted), EnrollmentCompleted)
        assert isinstance(await device.next_event(Welcomed), Welcomed)

        # The operator promotes the bundle on replica A; the device is connected to B.
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://127.0.0.1:{admin_a}/v1/rollouts/1/promote",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        assert response.status_code == 200 and response.json()["changed"] is True
        offered = await device.next_event(UpdateOffered)
        assert isinstance(offered, UpdateOffered)
        assert json.loads(offered.offer.manifest)["version"] == 1

        await device.send(
            Fetch(request_id="req_fetch", version=1, file="adapter.gguf", offset=100, length=900)
        )
        chunk = await device.next_event(ChunkReceived)
        assert isinstance(chunk, ChunkReceived)
        assert chunk.data == src.read_bytes()[100:1000] and chunk.header.size == 5000
        await device.close()
    finally:
        for proc, _, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _, _ in procs:
            await asyncio.to_thread(proc.wait, 30)
            assert proc.stdout is not None
            proc.stdout.close()
