"""Replicas tell each other what must take effect everywhere at once: a revocation ends the
device's session on whichever replica holds it, and a device keeps one session across the
cluster. Real services on the real PostgreSQL server, their revocation polling set to an hour,
so only a notification can explain what a test sees."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from cloud_agent.cluster import Cluster
from cloud_agent.service import CloudService
from cloud_agent.store import Store
from cloud_agent.store.store import sqlite_url
from examples.handshake import Device
from protocol import (
    AckReceived,
    DeviceCredentials,
    EnrollmentCompleted,
    EnrollmentCredentials,
    Feedback,
    PeerError,
    ResultReceived,
    SessionClosed,
    Welcomed,
)
from shared import SigningKey
from tests.cloud_agent.test_server import admin_client, ask, ask_and_correct, events_to_the_end
from tests.cloud_fixtures import Cloud, replicas_of_one_cluster

pytestmark = pytest.mark.slow

HOUR = 3600.0


@pytest.fixture
async def replicas(
    tmp_path: Path, kb_path: Path, postgres_db: str
) -> AsyncIterator[list[CloudService]]:
    """Two replicas of one cluster, polling hourly."""
    async with replicas_of_one_cluster(
        tmp_path, kb_path, postgres_db, revocation_poll_s=HOUR, rollout={"poll_s": HOUR}
    ) as started:
        yield started


async def enroll(service: CloudService) -> tuple[Device, DeviceCredentials]:
    key = SigningKey.generate()
    token = await service.store.create_enrollment_token()
    device = await Device.connect(url(service), EnrollmentCredentials(token, key))
    done = await device.next_event(EnrollmentCompleted)
    assert isinstance(done, EnrollmentCompleted), done
    assert isinstance(await device.next_event(Welcomed), Welcomed)
    return device, DeviceCredentials(done.device_id, key)


async def connect(service: CloudService, creds: DeviceCredentials) -> Device:
    device = await Device.connect(url(service), creds)
    assert isinstance(await device.next_event(Welcomed), Welcomed)
    return device


def url(service: CloudService) -> str:
    return f"ws://127.0.0.1:{service.port}/v1"


async def assert_revoked(device: Device) -> None:
    refused, closed = await events_to_the_end(device)
    assert isinstance(refused, PeerError) and refused.error.name == "device_revoked"
    assert isinstance(closed, SessionClosed) and closed.code == 1008


async def test_a_revocation_on_one_replica_ends_the_session_on_another_at_once(
    replicas: list[CloudService],
) -> None:
    a, b = replicas
    device, creds = await enroll(b)
    assert await a.revoke(creds.device_id)
    await assert_revoked(device)
    # The operator sees that B hears the others, and what it heard.
    async with admin_client(b) as admin:
        ready = (await admin.get("/readyz")).json()
        metrics = (await admin.get("/metrics")).text
    assert ready["replicas"] == "listening"
    assert "edgeloop_cluster_listening 1.0" in metrics
    assert 'edgeloop_cluster_notices_total{channel="edgeloop_revocations"} 1.0' in metrics


async def test_a_revocation_made_with_the_store_alone_reaches_every_replica(
    replicas: list[CloudService], postgres_db: str
) -> None:
    # As `edgeloop cloud revoke` or `forget` does, from another host.
    devices = [await enroll(service) for service in replicas]
    store = await Store.open(postgres_db)
    try:
        for _, creds in devices:
            assert await store.revoke_device(creds.device_id)
    finally:
        await store.close()
    for device, _ in devices:
        await assert_revoked(device)


async def test_a_device_keeps_one_session_across_replicas(
    replicas: list[CloudService],
) -> None:
    a, b = replicas
    first, creds = await enroll(a)
    moved = await connect(b, creds)  # its network moved it to the other replica
    closed = (await events_to_the_end(first))[-1]
    assert isinstance(closed, SessionClosed) and closed.code == 4003
    async with asyncio.timeout(5):
        while a.server.session_count:
            await asyncio.sleep(0.01)
    await moved.send(ask("Anything about layering for wet climates in general?"))
    result = await moved.next_event(ResultReceived)
    assert isinstance(result, ResultReceived) and result.result.text == "replica 1"
    # And back: the newest session stays, wherever it is.
    back = await connect(a, creds)
    closed = (await events_to_the_end(moved))[-1]
    assert isinstance(closed, SessionClosed) and closed.code == 4003
    assert a.server.session_count == 1 and back.session.is_open
    await back.close()


async def test_a_device_forgotten_with_the_store_alone_is_unlearned_by_every_replica(
    tmp_path: Path, kb_path: Path, postgres_db: str
) -> None:
    # Replicas that read each other's feedback often, so both learn the correction.
    async with replicas_of_one_cluster(
        tmp_path, kb_path, postgres_db, knowledge_poll_s=0.1
    ) as started:
        device, creds = await enroll(started[0])
        await ask_and_correct(device)
        await device.close()
        skills = lambda: [s.agent.skill for s in started]  # noqa: E731 - swapped on rebuilds
        await until(lambda: all(skill and skill.kb.learned == 1 for skill in skills()))
        store = await Store.open(postgres_db)  # as `edgeloop cloud forget` does
        try:
            assert await store.forget_device(creds.device_id) is not None
        finally:
            await store.close()
        await until(lambda: all(skill and skill.kb.learned == 0 for skill in skills()))


async def test_a_knowledge_reload_on_one_replica_reloads_every_replica(
    tmp_path: Path, kb_path: Path, postgres_db: str
) -> None:
    kb = tmp_path / "kb.md"  # the file every replica reads (one volume, or one deployment)
    kb.write_text(kb_path.read_text())
    # Neither watches its file in time: only the notice can explain a reload on B.
    async with replicas_of_one_cluster(
        tmp_path, kb, postgres_db, knowledge_poll_s=HOUR
    ) as replicas:
        a, b = replicas
        kb.write_text(kb.read_text() + "\n- [gift-wrap] Gift wrapping costs $4 per item.\n")
        async with admin_client(a) as admin:
            reloaded = (await admin.post("/v1/knowledge/reload")).json()
        assert reloaded["added"] == ["gift-wrap"]
        await until(lambda: b.agent.skill is not None and "gift-wrap" in b.agent.skill.kb.facts)
        await asyncio.sleep(0.2)  # A hears its own notice too, and does not reload twice
        for replica in replicas:
            reloads = replica.metrics.registry.get_sample_value(
                "edgeloop_knowledge_reloads_total", {"outcome": "ok"}
            )
            assert reloads == 1


async def test_after_a_database_failover_replicas_serve_store_and_hear_each_other(
    replicas: list[CloudService], postgres_db: str
) -> None:
    a, b = replicas
    for replica in replicas:
        replica.cluster.reconnect_s = (0.05, 0.2)
    device, creds = await enroll(a)
    store = await Store.open(postgres_db)
    try:
        # Every connection to the database dropped at once, as a failover does.
        async with store.engine.connect() as conn:
            dropped = await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            assert len(dropped.all()) >= 2, "both replicas' listening connections at least"
        await device.send(ask("Anything about layering for wet climates in general?"))
        assert isinstance(await device.next_event(ResultReceived), ResultReceived)
        await device.send(Feedback(idempotency_key="idk_failover", request_id="req_1",
                                   rating="positive"))  # fmt: skip
        assert isinstance(await device.next_event(AckReceived), AckReceived)
        await a.server.recorder.flush()
        [stored] = await store.list_interactions()
        assert (stored.request_id, stored.rating) == ("req_1", "positive")
        await until(lambda: a.cluster.listening and b.cluster.listening)
        assert await store.revoke_device(creds.device_id)
        await assert_revoked(device)
    finally:
        await store.close()


async def test_a_stale_or_malformed_session_notice_ends_no_session(cloud: Cloud) -> None:
    device, creds = await cloud.enroll()
    server = cloud.service.server
    [conn] = server._sessions.values()
    for notice in (
        # A session that opened elsewhere before this one: this one is the newer.
        json.dumps({"replica": "elsewhere", "sessions": [[creds.device_id, conn.opened_at - 1]]}),
        # This replica's own notice, heard back.
        json.dumps(
            {"replica": cloud.service.cluster.replica_id, "sessions": [[creds.device_id, 9e99]]}
        ),
        "not json",
        json.dumps({"replica": "elsewhere", "sessions": [[creds.device_id]]}),
    ):
        await server._opened_elsewhere(notice)
    assert conn.session.is_open
    async with admin_client(cloud.service) as admin:
        assert (await admin.get("/readyz")).json()["replicas"] is None, "one replica: SQLite"
    await server._opened_elsewhere(
        json.dumps({"replica": "elsewhere", "sessions": [[creds.device_id, conn.opened_at + 1]]})
    )
    closed = (await events_to_the_end(device))[-1]
    assert isinstance(closed, SessionClosed) and closed.code == 4003


async def heard(cluster: Cluster) -> list[str]:
    got: list[str] = []

    async def handler(payload: str) -> None:
        got.append(payload)

    cluster.subscribe("edgeloop_test", handler)
    return got


async def until(condition: object, seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_without_postgresql_a_notice_reaches_this_process_only(tmp_path: Path) -> None:
    cluster = Cluster(sqlite_url(tmp_path / "cloud.db"))
    got = await heard(cluster)
    await cluster.start()
    await cluster.notify("edgeloop_test", "hello")
    assert got == ["hello"] and not cluster.shared
    await cluster.stop()


async def test_a_replica_that_lost_its_listening_connection_listens_again(
    postgres_db: str,
) -> None:
    sender, receiver = Cluster(postgres_db), Cluster(postgres_db)
    receiver.reconnect_s = (0.05, 0.2)
    got = await heard(receiver)

    async def failing(payload: str) -> None:
        raise RuntimeError("a handler's bug")

    receiver.subscribe("edgeloop_test", failing)
    await sender.start()
    await receiver.start()
    try:
        await sender.notify("edgeloop_test", "one")
        await until(lambda: got == ["one"])
        # The database drops the listening connection (a restart, a failover).
        pid = receiver._connection.get_server_pid()
        await sender._connection.execute("SELECT pg_terminate_backend($1)", pid)
        await until(lambda: receiver.listening and receiver._connection.get_server_pid() != pid)
        await sender.notify("edgeloop_test", "two")
        await until(lambda: got == ["one", "two"])
    finally:
        await sender.stop()
        await receiver.stop()
    assert not receiver.listening


async def test_a_database_that_stops_answering_does_not_hold_up_a_notice(
    postgres_db: str,
) -> None:
    cluster = Cluster(postgres_db)
    cluster.notify_timeout_s, cluster.reconnect_s = 0.2, (0.05, 0.2)
    got = await heard(cluster)
    await cluster.start()
    pid = cluster._connection.get_server_pid()
    try:
        # The database process serving the listening connection stops (a hung server, a
        # network partition): stopping it needs the right to signal it.
        os.kill(pid, signal.SIGSTOP)
    except PermissionError:
        await cluster.stop()
        pytest.skip("cannot stop a PostgreSQL backend: the tests do not run as root here")
    try:
        async with asyncio.timeout(5):
            await cluster.notify("edgeloop_test", "hello")
        assert got == ["hello"], "told this replica at least"
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        # Once the database answers again, notices go through it again.
        await until(lambda: cluster.listening)
        await cluster.notify("edgeloop_test", "again")
        await until(lambda: got == ["hello", "again"])
    finally:
        await cluster.stop()


async def test_a_revocation_is_announced_once(postgres_db: str) -> None:
    store = await Store.open(postgres_db)
    cluster = Cluster(postgres_db)
    got: list[str] = []

    async def revoked(device_id: str) -> None:
        got.append(device_id)

    cluster.subscribe("edgeloop_revocations", revoked)
    await cluster.start()
    try:
        device = await store.enroll_device(
            await store.create_enrollment_token(), "dev_rolled_back", "k" * 43, None
        )
        assert await store.revoke_device(device.id)
        assert not await store.revoke_device(device.id), "already revoked: nothing to tell"
        await until(lambda: got == [device.id])
        await asyncio.sleep(0.2)
        assert got == [device.id]
    finally:
        await cluster.stop()
        await store.close()
