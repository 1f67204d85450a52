"""Faults: slow consumers, a locked database, garbage from the backend, several replicas, TLS."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import ssl
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from cloud_agent.backends import ScriptedBackend
from cloud_agent.bundles import rotate_signing_key
from cloud_agent.errors import BackendResponseError
from cloud_agent.service import CloudService
from cloud_agent.store import tables
from examples.handshake import Device
from protocol import (
    AckReceived,
    ChatMessage,
    DeltaReceived,
    DeviceCredentials,
    EnrollmentCompleted,
    EnrollmentCredentials,
    Escalate,
    Feedback,
    RequestFailed,
    ResultReceived,
    Welcomed,
)
from shared import ConfigError, SigningKey, b64url_decode
from tests.cloud_agent.test_store import publish
from tests.cloud_fixtures import Cloud, make_config, replicas_of_one_cluster, self_signed

pytestmark = [pytest.mark.slow, pytest.mark.every_event_loop]


def ask(text: str, request_id: str, *, stream: bool = True) -> Escalate:
    return Escalate(
        request_id=request_id,
        messages=[ChatMessage(role="user", content=text)],
        deadline_ms=20_000,
        max_tokens=64,
        stream=stream,
    )


# More than loopback socket buffers hold for a reader that stopped: 8 x 1.2 MB.
LONG_ANSWER = " ".join(["x" * 6000] * 200)


@pytest.mark.cloud(backend=ScriptedBackend(LONG_ANSWER), capacity=4)
async def test_a_client_that_stops_reading_neither_grows_memory_nor_stalls_others(
    cloud: Cloud,
) -> None:
    slow, _ = await cloud.enroll()
    slow.ws.transport.pause_reading()  # it never reads again
    for i in range(4):
        await slow.send(ask("Tell me everything about tents, at great length please.", f"req_{i}"))
    fast, _ = await cloud.enroll()
    for i in range(3):
        await fast.send(
            ask("Is the Alps trail open in winter months at all?", f"fast_{i}", stream=False)
        )
        event = await fast.next_event(ResultReceived, RequestFailed)
        assert isinstance(event, ResultReceived), event
    [server_side] = [
        c
        for c in cloud.service.server._connections
        if c.device_id and c.ws is not None and c.session.in_flight_count > 0
    ]
    buffered = server_side.ws.transport.get_write_buffer_size()
    assert buffered < 1 << 20, f"{buffered} bytes buffered for a client that does not read"
    await fast.close()
    slow.ws.transport.abort()
    await slow.ws.wait_closed()


@pytest.mark.cloud(limits={"heartbeat_s": 1})
async def test_a_peer_that_stops_answering_pings_is_dropped_and_its_session_ended(
    cloud: Cloud,
) -> None:
    gone, credentials = await cloud.enroll()
    alive, _ = await cloud.enroll()
    gone.ws.transport.pause_reading()  # a device that lost its network: no pongs come back
    async with asyncio.timeout(15):
        while cloud.service.server.session_count > 1:
            await asyncio.sleep(0.1)
        while True:  # the end is written through the batched recorder
            async with cloud.service.store.engine.connect() as conn:
                rows = (
                    await conn.execute(
                        select(tables.Session.device_id, tables.Session.close_code).where(
                            tables.Session.ended_at.is_not(None)
                        )
                    )
                ).all()
            if rows:
                break
            await asyncio.sleep(0.1)
    # 1006: the peer never sent a close frame back.
    assert [tuple(r) for r in rows] == [(credentials.device_id, 1006)]
    # The other device answers its pings and is still served.
    await alive.send(ask("Is the Alps trail open in winter months at all?", "req_1"))
    assert isinstance(await alive.next_event(ResultReceived, RequestFailed), ResultReceived)
    await alive.close()
    gone.ws.transport.abort()
    await gone.ws.wait_closed()


async def test_feedback_is_not_acknowledged_while_the_database_is_locked_and_is_stored_once_after(
    tmp_path: Path, kb_path: Path
) -> None:
    config = make_config(tmp_path, kb_path, store_lock_timeout_s=0.2)
    service = await CloudService.create(config, backend=ScriptedBackend())
    await service.start()
    try:
        token = await service.store.create_enrollment_token()
        url = f"ws://127.0.0.1:{service.port}/v1"
        device = await Device.connect(url, EnrollmentCredentials(token, SigningKey.generate()))
        assert isinstance(await device.next_event(Welcomed), Welcomed)
        feedback = Feedback(idempotency_key="idk_locked", request_id="req_1", rating="positive")

        blocker = sqlite3.connect(config.data_dir / "cloud.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        await device.send(feedback)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await device.next_event(AckReceived)
        blocker.execute("ROLLBACK")
        blocker.close()

        await device.send(feedback)  # the device's outbox resends what was never acked
        ack = await device.next_event(AckReceived)
        assert isinstance(ack, AckReceived) and ack.ack.duplicate is False
        await device.send(feedback)
        ack = await device.next_event(AckReceived)
        assert isinstance(ack, AckReceived) and ack.ack.duplicate is True
        summary = await service.store.feedback_summary()
        assert summary.positive == 1
        await device.close()
    finally:
        await service.stop()


@pytest.mark.cloud(backend=ScriptedBackend("x" * 100_000))
async def test_an_answer_longer_than_a_frame_may_carry_is_cut_and_marked(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    await device.send(ask("Write me the longest answer you can about ropes.", "req_1"))
    pieces = []
    while True:
        event = await device.next_event(DeltaReceived, ResultReceived, RequestFailed)
        if not isinstance(event, DeltaReceived):
            break
        pieces.append(event.delta.text)
    assert isinstance(event, ResultReceived), event
    assert event.result.finish_reason == "length" and len(event.result.text) == 65536
    assert len("".join(pieces)) == 100_000, "the stream itself carried everything, in pieces"
    await device.close()


@pytest.mark.cloud(backend=ScriptedBackend(fail_with=BackendResponseError("not a completion")))
async def test_garbage_from_the_backend_is_a_typed_error_to_the_device(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    await device.send(ask("Which stove works best above 4000 metres and why?", "req_1"))
    event = await device.next_event(ResultReceived, RequestFailed)
    assert isinstance(event, RequestFailed) and event.error.name == "backend_error"
    await device.close()


async def test_two_replicas_on_one_postgresql_serve_the_same_devices(
    tmp_path: Path, kb_path: Path, postgres_db: str
) -> None:
    async with replicas_of_one_cluster(tmp_path, kb_path, postgres_db) as replicas:
        token = await replicas[0].store.create_enrollment_token()
        key = SigningKey.generate()
        first = await Device.connect(
            f"ws://127.0.0.1:{replicas[0].port}/v1", EnrollmentCredentials(token, key)
        )
        done = await first.next_event(EnrollmentCompleted)
        assert isinstance(done, EnrollmentCompleted)
        assert isinstance(await first.next_event(Welcomed), Welcomed)
        feedback = Feedback(idempotency_key="idk_replicas", request_id="r", rating="negative")
        await first.send(feedback)
        assert isinstance(await first.next_event(AckReceived), AckReceived)
        await first.close()

        second = await Device.connect(
            f"ws://127.0.0.1:{replicas[1].port}/v1", DeviceCredentials(done.device_id, key)
        )
        assert isinstance(await second.next_event(Welcomed), Welcomed)
        await second.send(feedback)
        ack = await second.next_event(AckReceived)
        assert isinstance(ack, AckReceived) and ack.ack.duplicate is True
        await second.send(ask("Anything about layering for wet climates in general?", "req_2"))
        result = await second.next_event(ResultReceived)
        assert isinstance(result, ResultReceived) and result.result.text == "replica 1"
        await second.close()


async def test_the_service_speaks_wss_and_https_with_a_certificate(
    tmp_path: Path, kb_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    config = make_config(tmp_path, kb_path, tls_cert=cert, tls_key=key)
    service = await CloudService.create(config, backend=ScriptedBackend())
    await service.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert))
        token = await service.store.create_enrollment_token()
        assert service.url == f"wss://127.0.0.1:{service.port}/v1"
        device = await Device.connect(
            service.url, EnrollmentCredentials(token, SigningKey.generate()), ssl=client_ctx
        )
        assert isinstance(await device.next_event(Welcomed), Welcomed)
        await device.close()
        # The admin API on the same certificate: its bearer token is not sent in clear.
        assert service.admin_url == f"https://127.0.0.1:{service.admin_port}"
        bearer = {"Authorization": f"Bearer {service.admin_token}"}
        async with httpx.AsyncClient(verify=client_ctx, headers=bearer) as admin:
            devices = await admin.get(f"{service.admin_url}/v1/devices")
            assert devices.status_code == 200 and len(devices.json()) == 1
            with pytest.raises(httpx.HTTPError):
                await admin.get(f"http://127.0.0.1:{service.admin_port}/v1/devices")
    finally:
        await service.stop()


async def test_a_certificate_that_cannot_be_loaded_is_a_config_error(
    tmp_path: Path, kb_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    _, other_key = self_signed(tmp_path / "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        ({"tls_cert": tmp_path / "missing.pem", "tls_key": key}, "tls_cert", "no such file"),
        ({"tls_cert": cert, "tls_key": tmp_path / "missing.pem"}, "tls_key", "no such file"),
        ({"tls_cert": junk, "tls_key": key}, "tls_cert", "cannot load"),
        ({"tls_cert": cert, "tls_key": other_key}, "tls_cert", "its own private key"),
    ]
    for tls, name, says in cases:
        config = make_config(tmp_path, kb_path, **tls)
        with pytest.raises(ConfigError, match=says) as info:
            await CloudService.create(config, backend=ScriptedBackend())
        assert info.value.key == name


async def test_a_replica_or_a_run_with_another_signing_key_is_refused(
    tmp_path: Path, kb_path: Path
) -> None:
    first = make_config(tmp_path / "a", kb_path)
    service = await CloudService.create(first, backend=ScriptedBackend())
    pinned = service.signing_key.verify_key().b64()
    await service.stop()
    # A second replica on the same database with a data directory (and key) of its own.
    other = make_config(tmp_path / "b", kb_path, database_url=first.resolved_database_url())
    with pytest.raises(ConfigError, match="not the key this cloud's devices pinned") as info:
        await CloudService.create(other, backend=ScriptedBackend())
    assert info.value.key == "data_dir" and pinned in str(info.value)
    # The first replica's key lost: a new one is not made to replace it in silence.
    (first.data_dir / "server.key").unlink()
    with pytest.raises(ConfigError, match="copy it from the first replica"):
        await CloudService.create(first, backend=ScriptedBackend())
    assert not (first.data_dir / "server.key").exists(), "no stray key to copy by mistake"
    # Given the cluster's key, each serves (and the store was closed each time it was not).
    for config in (first, other):
        service.signing_key.save(config.data_dir / "server.key")
        again = await CloudService.create(config, backend=ScriptedBackend())
        await again.start()
        await again.stop()


async def test_a_replica_whose_key_was_rotated_out_signs_nothing_until_given_the_new_one(
    tmp_path: Path, kb_path: Path
) -> None:
    service = await CloudService.create(
        make_config(tmp_path / "a", kb_path), backend=ScriptedBackend()
    )
    await service.start()
    try:
        await publish(service.store, tmp_path, 1)
        # Rotated from another host's copy of the key: this replica's file is the old key.
        elsewhere = tmp_path / "ops"
        service.signing_key.save(elsewhere / "server.key")
        new = await rotate_signing_key(elsewhere, service.store)
        async with httpx.AsyncClient(
            base_url=service.admin_url, headers={"Authorization": f"Bearer {service.admin_token}"}
        ) as admin:
            refused = await admin.post("/v1/rollouts/1/rollback")
            assert refused.status_code == 409 and "rotated out" in refused.json()["message"]
            assert await service.store.get_adapter(2) is None, "nothing signed with the old key"
            # The operator copies the new server.key here: the next bundle is signed with it.
            new.save(service.config.data_dir / "server.key")
            undone = await admin.post("/v1/rollouts/1/rollback")
            assert undone.status_code == 200 and undone.json()["version"] == 2
        adapter = await service.store.get_adapter(2)
        assert adapter is not None
        offer = adapter.offer
        new.verify_key().verify(b64url_decode(offer.signature), offer.manifest.encode())
        # And devices enrolling here from now on pin the key it signs with.
        token = await service.store.create_enrollment_token()
        device = await Device.connect(
            f"ws://127.0.0.1:{service.port}/v1", EnrollmentCredentials(token, SigningKey.generate())
        )
        enrolled = await device.next_event(EnrollmentCompleted)
        assert isinstance(enrolled, EnrollmentCompleted)
        assert enrolled.server_key == new.verify_key().b64()
        welcomed = await device.next_event(Welcomed)
        assert isinstance(welcomed, Welcomed)
        assert [k.public_key for k in welcomed.welcome.signing_keys] == [enrolled.server_key]
        await device.close()
    finally:
        await service.stop()


@pytest.mark.parametrize("key", ["port", "admin_port"])
async def test_a_port_in_use_is_a_config_error_and_nothing_is_left_running(
    tmp_path: Path, key: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(tmp_path, None, **{key: port})
        service = await CloudService.create(config, backend=ScriptedBackend("hi"))
        before = asyncio.all_tasks()
        with pytest.raises(ConfigError, match="address already in use") as info:
            await service.start()
        assert info.value.key == key
    assert asyncio.all_tasks() <= before, "a part that started is still running"
    # The store was closed: the same data directory serves once the port is free.
    again = await CloudService.create(config, backend=ScriptedBackend("hi"))
    await again.start()
    await again.stop()
