"""The cloud agent over a real socket: enrollment, auth, escalation, faults, acks, shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from sqlalchemy import select, update
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from cloud_agent.backends import ChatTurn, ScriptedBackend
from cloud_agent.config import PHONE_REGIONS, CloudConfig
from cloud_agent.distill.pipeline import DistillConfig
from cloud_agent.distill.train import DistillSettingsError
from cloud_agent.errors import BackendUnavailable, StoreUnavailable
from cloud_agent.service import CloudService
from cloud_agent.store import NewInteraction, tables
from examples.handshake import Device
from protocol import (
    SUBPROTOCOL,
    AckReceived,
    Cancel,
    ChatMessage,
    DeltaReceived,
    DeviceCredentials,
    Escalate,
    Event,
    Feedback,
    GoodbyeReceived,
    PeerError,
    Report,
    RequestFailed,
    ResultReceived,
    RouteCounts,
    SessionClosed,
    Welcomed,
)
from shared import SigningKey, configure_logging
from shared.pii import detect
from tests.cloud_fixtures import Cloud, make_config

pytestmark = [pytest.mark.slow, pytest.mark.every_event_loop]


def ask(
    text: str, request_id: str = "req_1", *, stream: bool = True, deadline_ms: int = 5000
) -> Escalate:
    return Escalate(
        request_id=request_id,
        messages=[ChatMessage(role="user", content=text)],
        deadline_ms=deadline_ms,
        max_tokens=64,
        stream=stream,
    )


async def interactions(cloud: Cloud, count: int = 1) -> list:  # type: ignore[type-arg]
    """The stored interactions, once `count` are there (they are written after the reply)."""
    async with asyncio.timeout(5):
        while len(rows := await cloud.service.store.list_interactions()) < count:
            await asyncio.sleep(0.01)
    return rows


async def events_to_the_end(device: Device) -> list[Event]:
    """Every event of `device`'s session until it closes."""
    events: list[Event] = []
    async with asyncio.timeout(10):
        while not events or not isinstance(events[-1], SessionClosed):
            try:
                data = await device.ws.recv()
            except ConnectionClosed as exc:
                device.session.receive_close(exc.rcvd.code if exc.rcvd else 1006)
            else:
                if isinstance(data, str):
                    device.session.receive_text(data)
            events += device.session.events_received()
    return events


def admin_client(service: CloudService) -> httpx.AsyncClient:
    """An HTTP client for `service`'s admin API, with its token."""
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{service.admin_port}",
        headers={"Authorization": f"Bearer {service.admin_token}"},
    )


async def final(device: Device) -> ResultReceived | RequestFailed:
    event = await device.next_event(ResultReceived, RequestFailed)
    assert isinstance(event, ResultReceived | RequestFailed), event
    return event


async def test_device_enrolls_reconnects_and_gets_a_streamed_answer(cloud: Cloud) -> None:
    device, creds = await cloud.enroll()
    await device.close()
    device = await Device.connect(cloud.url, creds)
    assert isinstance(await device.next_event(Welcomed), Welcomed)
    await device.send(ask("How should I layer for a winter hike in the Alps, and why?"))
    pieces = []
    while True:
        event = await device.next_event(DeltaReceived, ResultReceived, RequestFailed)
        if isinstance(event, DeltaReceived):
            pieces.append(event.delta.text)
        else:
            break
    assert isinstance(event, ResultReceived)
    assert "".join(pieces) == event.result.text == "Layer up: base, mid, shell."
    assert event.result.model == "scripted"
    [row] = await interactions(cloud)
    assert row.status == "ok" and row.backend == "scripted" and row.device_id == creds.device_id
    await device.close()


async def test_store_facts_are_answered_from_the_retrieved_fact(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    await device.send(ask("Is shipping free?", stream=False))
    event = await final(device)
    assert isinstance(event, ResultReceived)
    assert "$75" in event.result.text and event.result.sources == ["free-shipping"]
    assert cloud.backend.calls == [], "a grounded answer costs no backend call"
    [row] = await interactions(cloud)
    assert row.fact_ids == ["free-shipping"]
    await device.close()


@pytest.mark.cloud(quote_facts=False, knowledge_top_k=1)
async def test_with_quote_facts_off_the_backend_answers_store_questions(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    await device.send(ask("Is shipping free?", stream=False))
    event = await final(device)
    assert isinstance(event, ResultReceived)
    assert event.result.text == "Layer up: base, mid, shell." and event.result.model == "scripted"
    [call] = cloud.backend.calls
    system = call.messages[0].content
    # One fact in the prompt (three related ones by default).
    assert "$75" in system and system.count("\n- ") == 1
    assert event.result.sources == ["free-shipping"]
    await device.close()


async def test_open_questions_go_to_the_backend_with_the_facts_in_the_prompt(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    await device.send(ask("Is renting a tent for 4 weekends a year cheaper than buying one?"))
    assert isinstance(await final(device), ResultReceived)
    [call] = cloud.backend.calls
    assert call.messages[0].role == "system" and "$18 per day" in call.messages[0].content
    await device.close()


@pytest.mark.cloud(limits={"max_tokens": 5})
async def test_a_request_for_more_tokens_than_the_cloud_allows_is_answered_up_to_its_cap(
    cloud: Cloud,
) -> None:
    device, _ = await cloud.enroll()
    for n, stream in enumerate((True, False)):
        greedy = ask("Explain layering for winter hikes", f"req_{n}", stream=stream)
        await device.send(greedy.model_copy(update={"max_tokens": 30_000}))
        assert isinstance(await final(device), ResultReceived)
    modest = ask("Explain layering for winter hikes", "req_2")
    await device.send(modest.model_copy(update={"max_tokens": 3}))
    assert isinstance(await final(device), ResultReceived)
    assert [call.max_tokens for call in cloud.backend.calls] == [5, 5, 3]
    await device.close()


async def test_an_unknown_device_and_a_revoked_device_are_refused(cloud: Cloud) -> None:
    stranger = await Device.connect(
        cloud.url, DeviceCredentials("dev_nobody", SigningKey.generate())
    )
    event = await stranger.next_event(Welcomed)
    assert isinstance(event, PeerError) and event.error.name == "unknown_device"

    device, creds = await cloud.enroll()
    await device.close()
    assert await cloud.service.store.revoke_device(creds.device_id)
    again = await Device.connect(cloud.url, creds)
    event = await again.next_event(Welcomed)
    assert isinstance(event, PeerError) and event.error.name == "device_revoked"
    closed = await again.next_event(SessionClosed)
    assert isinstance(closed, SessionClosed) and closed.code == 1008


@pytest.mark.cloud(backend=ScriptedBackend(hang=True))
async def test_revoking_a_connected_device_ends_its_session_and_its_requests_at_once(
    cloud: Cloud,
) -> None:
    device, creds = await cloud.enroll()
    bystander, _ = await cloud.enroll()
    await device.send(ask("Plan me a two-week trek across Patagonia with gear lists."))
    async with asyncio.timeout(5):
        while not cloud.backend.calls:
            await asyncio.sleep(0.01)
    async with admin_client(cloud.service) as admin:
        response = await admin.post(f"/v1/devices/{creds.device_id}/revoke")
    assert response.status_code == 200 and response.json()["changed"] is True
    failed, refused, closed = await events_to_the_end(device)
    assert isinstance(failed, RequestFailed) and failed.error.name == "device_revoked"
    assert isinstance(refused, PeerError) and refused.error.name == "device_revoked"
    assert isinstance(closed, SessionClosed) and closed.code == 1008
    assert cloud.backend.cancelled == 1, "the backend call was aborted"
    (row,) = await interactions(cloud)
    assert row.status == "cancelled"
    # Other devices stay connected.
    assert cloud.service.server.session_count == 1 and bystander.session.is_open
    await bystander.close()


@pytest.mark.cloud(revocation_poll_s=0.05)
async def test_a_device_revoked_elsewhere_loses_its_session_within_the_poll(
    cloud: Cloud,
) -> None:
    device, creds = await cloud.enroll()
    # As `edgeloop cloud revoke` or another replica does: the store only.
    assert await cloud.service.store.revoke_device(creds.device_id)
    refused, closed = await events_to_the_end(device)
    assert isinstance(refused, PeerError) and refused.error.name == "device_revoked"
    assert isinstance(closed, SessionClosed) and closed.code == 1008


@pytest.mark.cloud(backend=ScriptedBackend(hang=True))
async def test_forgetting_a_connected_device_ends_its_session_and_leaves_nothing_behind(
    cloud: Cloud,
) -> None:
    device, creds = await cloud.enroll()
    await device.send(ask("Plan me a two-week trek across Patagonia with gear lists."))
    async with asyncio.timeout(5):
        while not cloud.backend.calls:
            await asyncio.sleep(0.01)
    # Its request in flight is cancelled and logged before the erasure, not after it.
    async with admin_client(cloud.service) as admin:
        response = await admin.delete(f"/v1/devices/{creds.device_id}")
        assert response.status_code == 200
        deleted = response.json()["deleted"]
        assert deleted["interactions"] == 1 and deleted["sessions"] == 1
        assert (await admin.delete("/v1/devices/dev_nobody")).status_code == 404
    closed = (await events_to_the_end(device))[-1]
    assert isinstance(closed, SessionClosed) and closed.code == 1008
    await cloud.service.server.recorder.flush()
    async with cloud.service.store.engine.connect() as conn:
        rows = await conn.execute(
            select(tables.Session).where(tables.Session.device_id == creds.device_id)
        )
        assert rows.all() == []
    assert await cloud.service.store.list_interactions() == []


async def test_a_newer_session_of_a_device_replaces_the_older_one(cloud: Cloud) -> None:
    older, creds = await cloud.enroll()
    newer = await Device.connect(cloud.url, creds)
    assert isinstance(await newer.next_event(Welcomed), Welcomed)
    closed = (await events_to_the_end(older))[-1]
    assert isinstance(closed, SessionClosed) and closed.code == 4003
    assert cloud.service.server.session_count == 1
    await newer.send(ask("Which tent suits a windy coastal campsite?"))
    assert isinstance(await final(newer), ResultReceived)
    await newer.close()


async def test_devices_connecting_together_share_store_queries_and_revoked_ones_stay_out(
    cloud: Cloud,
) -> None:
    store = cloud.service.store
    fleet = []
    for _ in range(12):
        device, creds = await cloud.enroll()
        await device.close()
        fleet.append(creds)
    assert await store.revoke_device(fleet[5].device_id)
    queries = {"devices": 0, "offers": 0}
    get_devices, offers = store.get_devices, store.offers

    async def counted_devices(ids: list[str]):  # type: ignore[no-untyped-def]
        queries["devices"] += 1
        return await get_devices(ids)

    async def counted_offers():  # type: ignore[no-untyped-def]
        queries["offers"] += 1
        return await offers()

    store.get_devices, store.offers = counted_devices, counted_offers  # type: ignore[method-assign]
    sessions = await asyncio.gather(*(Device.connect(cloud.url, c) for c in fleet))
    events = await asyncio.gather(*(s.next_event(Welcomed) for s in sessions))
    refused = [i for i, e in enumerate(events) if not isinstance(e, Welcomed)]
    assert refused == [5]
    assert isinstance(events[5], PeerError) and events[5].error.name == "device_revoked"
    # Each query serves whoever asked while the one before it ran: fewer than one each.
    assert 1 <= queries["devices"] < len(fleet)
    assert 1 <= queries["offers"] < len(fleet) - 1
    registry, kind = cloud.service.metrics.registry, {"kind": "devices"}
    assert registry.get_sample_value("edgeloop_store_batch_items_sum", kind) == len(fleet)
    assert registry.get_sample_value("edgeloop_store_batch_items_count", kind) == queries["devices"]
    for i, session in enumerate(sessions):
        if i not in refused:
            await session.close()


async def test_a_device_gone_while_its_key_is_looked_up_leaves_no_error_behind(
    cloud: Cloud, caplog: pytest.LogCaptureFixture
) -> None:
    device, creds = await cloud.enroll()
    await device.close()
    store, asked, go_on = cloud.service.store, asyncio.Event(), asyncio.Event()
    get_devices = store.get_devices

    async def slow_devices(ids: list[str]):  # type: ignore[no-untyped-def]
        asked.set()
        await go_on.wait()
        return await get_devices(ids)

    store.get_devices = slow_devices  # type: ignore[method-assign]
    gone = await Device.connect(cloud.url, creds)  # hello sent; `auth` follows the challenge
    receiving = asyncio.create_task(gone.next_event(Welcomed))
    await asyncio.wait_for(asked.wait(), 5)
    receiving.cancel()
    await gone.ws.close()
    await asyncio.sleep(0.05)  # the server sees the close
    go_on.set()
    store.get_devices = get_devices  # type: ignore[method-assign]
    again = await Device.connect(cloud.url, creds)  # the server is fine, and so is the device
    assert isinstance(await again.next_event(Welcomed), Welcomed)
    await again.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_used_token_is_refused(cloud: Cloud) -> None:
    from protocol import EnrollmentCredentials

    token = await cloud.service.store.create_enrollment_token()
    first = await Device.connect(cloud.url, EnrollmentCredentials(token, SigningKey.generate()))
    assert isinstance(await first.next_event(Welcomed), Welcomed)
    second = await Device.connect(cloud.url, EnrollmentCredentials(token, SigningKey.generate()))
    event = await second.next_event(Welcomed)
    assert isinstance(event, PeerError) and event.error.name == "invalid_enrollment_token"
    await first.close()


async def test_a_connection_without_the_subprotocol_is_refused_at_the_handshake(
    cloud: Cloud,
) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(cloud.url, proxy=None):
            pass
    assert info.value.response.status_code == 400


async def test_frames_before_authentication_close_the_connection(cloud: Cloud) -> None:
    async with connect(cloud.url, subprotocols=[SUBPROTOCOL], proxy=None) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "feedback"}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "error" and reply["name"] == "invalid_message"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1008


def auth_timeouts(cloud: Cloud) -> float | None:
    return cloud.service.metrics.registry.get_sample_value(
        "edgeloop_auth_failures_total", {"reason": "timeout"}
    )


@pytest.mark.cloud(limits={"auth_timeout_s": 0.3})
async def test_a_connection_that_never_authenticates_is_refused_with_auth_timeout(
    cloud: Cloud,
) -> None:
    async with connect(cloud.url, subprotocols=[SUBPROTOCOL], proxy=None) as ws:  # type: ignore[list-item]
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "error" and reply["name"] == "auth_timeout"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 4002
    assert auth_timeouts(cloud) == 1


@pytest.mark.cloud(limits={"auth_timeout_s": 1.0})
async def test_an_authenticated_session_outlives_the_auth_timeout(cloud: Cloud) -> None:
    # A second to enroll (a store write), so a slow machine does not fail the test.
    device, _ = await cloud.enroll()
    await asyncio.sleep(1.5)
    await device.send(ask("Any advice for a first multi-day trek?"))
    assert isinstance(await final(device), ResultReceived)
    assert not auth_timeouts(cloud)
    await device.close()


async def test_an_oversized_frame_closes_with_1009(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    huge = "x" * (cloud.service.config.limits.max_message_bytes + 10)
    await device.ws.send(huge)
    closed = await device.next_event(SessionClosed)
    assert isinstance(closed, SessionClosed) and closed.code == 1009


async def test_malformed_and_unknown_frames_get_typed_errors_and_the_session_survives(
    cloud: Cloud,
) -> None:
    device, _ = await cloud.enroll()
    await device.ws.send("{nope")
    event = await device.next_event(PeerError)
    assert isinstance(event, PeerError) and event.error.name == "malformed_frame"
    await device.ws.send(json.dumps({"type": "teleport"}))
    event = await device.next_event(PeerError)
    assert isinstance(event, PeerError) and event.error.name == "unknown_type"
    await device.send(ask("Any advice for a first multi-day trek?"))
    assert isinstance(await final(device), ResultReceived)
    await device.close()


@pytest.mark.cloud(backend=ScriptedBackend(hang=True))
async def test_cancel_aborts_the_backend_call_and_ends_the_request_once(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    await device.send(ask("Plan me a two-week trek across Patagonia with gear lists."))
    async with asyncio.timeout(5):
        while not cloud.backend.calls:
            await asyncio.sleep(0.01)
    await device.send(Cancel(request_id="req_1"))
    event = await final(device)
    assert isinstance(event, RequestFailed) and event.error.name == "cancelled"
    assert event.cancelled_locally
    assert cloud.backend.cancelled == 1
    await device.close()


@pytest.mark.cloud(backend=ScriptedBackend(hang=True))
async def test_a_hanging_backend_yields_a_typed_error_within_the_deadline(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await device.send(ask("Compare three stoves for winter camping in detail.", deadline_ms=300))
    event = await final(device)
    assert isinstance(event, RequestFailed)
    assert event.error.name in ("deadline_exceeded", "overloaded") and event.error.retryable
    assert loop.time() - started < 5
    await device.close()


@pytest.mark.cloud(capacity=2)  # both hanging requests hold a slot: neither waits for one
async def test_each_request_keeps_its_own_deadline_whatever_came_before(cloud: Cloud) -> None:
    # One timer watches every deadline: a request with a shorter deadline than one already
    # watched must still end on time, and so must one still waiting when the timer has fired.
    device, _ = await cloud.enroll()
    loop = asyncio.get_running_loop()
    await device.send(ask("Which stove suits a winter trip with two people?", "req_1",
                          deadline_ms=60_000))  # fmt: skip
    assert isinstance(await final(device), ResultReceived)
    cloud.backend.hang = True
    started = loop.time()
    for request_id, deadline_ms in (("req_2", 1000), ("req_3", 1600)):
        question = f"Compare three stoves for winter camping in detail ({request_id})."
        await device.send(ask(question, request_id, deadline_ms=deadline_ms))
    for request_id, deadline_s in (("req_2", 1.0), ("req_3", 1.6)):
        event = await final(device)
        assert isinstance(event, RequestFailed) and event.request_id == request_id
        assert event.error.name == "deadline_exceeded" and event.error.retryable
        assert deadline_s - 0.05 < loop.time() - started < 5
    cloud.backend.hang = False
    await device.send(ask("Which stove suits a winter trip with three people?", "req_4"))
    assert isinstance(await final(device), ResultReceived)
    rows = {row.request_id: row for row in await interactions(cloud, 4)}
    assert rows["req_2"].error_name == rows["req_3"].error_name == "deadline_exceeded"
    assert rows["req_1"].status == rows["req_4"].status == "ok"
    await device.close()


@pytest.mark.cloud(backend=ScriptedBackend(fail_with=BackendUnavailable("down")))
async def test_a_failing_backend_yields_backend_error(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    await device.send(ask("Explain the difference between down and synthetic insulation."))
    event = await final(device)
    assert isinstance(event, RequestFailed) and event.error.name == "backend_error"
    [row] = await interactions(cloud)
    assert row.status == "error" and row.error_name == "backend_error"
    await device.close()


@pytest.mark.cloud(backend=ScriptedBackend("slow answer", delay_s=0.5))
async def test_a_request_that_cannot_meet_its_deadline_is_refused_as_overloaded(
    cloud: Cloud,
) -> None:
    device, _ = await cloud.enroll()
    await device.send(ask("First, a long question about tents and stoves.", "req_1"))
    assert isinstance(await final(device), ResultReceived)  # teaches the scheduler 0.5 s/call
    await device.send(ask("Second long question about hiking boots and socks.", "req_2"))
    await device.send(
        ask("Third question about sleeping bags for the Alps?", "req_3", deadline_ms=200)
    )
    event = await final(device)
    assert isinstance(event, RequestFailed) and event.request_id == "req_3"
    assert event.error.name == "overloaded" and event.error.retryable
    assert isinstance(await final(device), ResultReceived)
    await device.close()


async def test_feedback_is_acknowledged_after_commit_and_stored_once(cloud: Cloud) -> None:
    device, creds = await cloud.enroll()
    feedback = Feedback(
        idempotency_key="idk_f1", request_id="req_1", rating="negative", correction="Plan B."
    )
    await device.send(feedback)
    first = await device.next_event(AckReceived)
    await device.send(feedback)
    second = await device.next_event(AckReceived)
    assert isinstance(first, AckReceived) and isinstance(second, AckReceived)
    assert (first.ack.duplicate, second.ack.duplicate) == (False, True)
    summary = await cloud.service.store.feedback_summary()
    assert (summary.negative, summary.corrections) == (1, 1)
    await device.close()


async def test_device_reports_make_the_fleets_routing_in_the_admin_api_and_metrics(
    cloud: Cloud,
) -> None:
    device, creds = await cloud.enroll()
    now = datetime.now(UTC)
    sent = Report(
        idempotency_key="idk_r1", period_start=now - timedelta(minutes=5), period_end=now,
        routes=RouteCounts(local=7, cloud=2, local_only=1), adapter_version=3,
        reasons={"coverage.match": 6, "privacy.national_id": 1},
    )  # fmt: skip
    for duplicate in (False, True):  # a resend after a lost ack counts once
        await device.send(sent)
        ack = await device.next_event(AckReceived)
        assert isinstance(ack, AckReceived) and ack.ack.duplicate is duplicate
    async with admin_client(cloud.service) as admin:
        routing = (await admin.get("/v1/routing")).json()
        assert (routing["reports"], routing["devices"]) == (1, 1)
        assert routing["routes"] == {
            "local": 7,
            "cloud": 2,
            "local_only": 1,
            "local_fallback": 0,
            "total": 10,
            "on_device_share": 0.8,
        }
        assert [v["adapter_version"] for v in routing["by_adapter_version"]] == [3]
        assert routing["reasons"] == {"coverage.match": 6, "privacy.national_id": 1}
        other = (await admin.get("/v1/routing", params={"device": "dev_nobody"})).json()
        assert other["reports"] == 0 and other["routes"]["on_device_share"] is None
        # The window holds periods that ended in it (this one, just now), not only whole ones.
        assert (await admin.get("/v1/routing", params={"hours": "0.01"})).json()["reports"] == 1
        for hours in ("0", "-1", "soon", "10000"):
            bad = await admin.get("/v1/routing", params={"hours": hours})
            assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
        metrics = (await admin.get("/metrics")).text
    counted = {
        sample.labels["route"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "edgeloop_device_requests_total"
    }
    assert counted == {"local": 7, "cloud": 2, "local_only": 1, "local_fallback": 0}
    await device.close()


async def test_feedback_from_many_devices_at_once_shares_commits_and_each_is_acked_once(
    cloud: Cloud,
) -> None:
    store = cloud.service.store
    devices = [(await cloud.enroll())[0] for _ in range(8)]
    commits = 0
    add_batch = store.add_feedback_batch

    async def counted(items):  # type: ignore[no-untyped-def]
        nonlocal commits
        commits += 1
        return await add_batch(items)

    store.add_feedback_batch = counted  # type: ignore[method-assign]

    async def rate(device: Device) -> list[bool]:
        flags = []
        for key in ("idk_1", "idk_2", "idk_1"):  # the last is a resend (its ack was lost)
            await device.send(Feedback(idempotency_key=key, request_id="req_x", rating="negative"))
            ack = await device.next_event(AckReceived)
            assert isinstance(ack, AckReceived) and ack.ack.idempotency_key == key
            flags.append(ack.ack.duplicate)
        return flags

    assert await asyncio.gather(*(rate(d) for d in devices)) == [[False, False, True]] * 8
    assert (await store.feedback_summary()).negative == 16
    assert commits < 24, "devices sending at once share commits"
    for device in devices:
        await device.close()


async def test_messages_a_device_sends_in_a_row_share_commits_up_to_a_cap(cloud: Cloud) -> None:
    store = cloud.service.store
    gate, batches = asyncio.Event(), []
    add_batch = store.add_feedback_batch

    async def held(items):  # type: ignore[no-untyped-def]
        batches.append(len(items))
        await gate.wait()
        return await add_batch(items)

    store.add_feedback_batch = held  # type: ignore[method-assign]
    device, _ = await cloud.enroll()
    for i in range(100):  # an outbox resending without waiting for each ack
        await device.send(Feedback(idempotency_key=f"k{i}", request_id="req_x", rating="negative"))
    [conn] = cloud.service.server._connections
    try:
        async with asyncio.timeout(5):
            while len(conn.acks) < 64:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert len(conn.acks) == 64, "past the cap, the connection's next frames wait unread"
    finally:
        gate.set()
    acks = [await device.next_event(AckReceived) for _ in range(100)]
    assert {a.ack.idempotency_key for a in acks} == {f"k{i}" for i in range(100)}  # type: ignore[union-attr]
    assert (await store.feedback_summary()).negative == 100
    assert max(batches) <= 64 and len(batches) < 10, batches
    await device.close()


EARLY_CALL = "Can I call customer service early in the morning?"
HOTLINE = "The support hotline is open from 7:30 to 21:00, every day of the week."


async def ask_and_correct(device: Device) -> None:
    """Ask EARLY_CALL (answered wrongly at first), then correct it with the hotline fact."""
    await device.send(ask(EARLY_CALL, stream=False))
    first = await final(device)
    assert isinstance(first, ResultReceived) and first.result.text != HOTLINE
    await device.send(
        Feedback(idempotency_key="idk_c1", request_id="req_1", rating="negative",
                 correction=HOTLINE)
    )  # fmt: skip
    assert isinstance(await device.next_event(AckReceived), AckReceived)


async def test_a_fact_correction_is_learned_at_once_and_again_after_a_restart(
    cloud: Cloud, tmp_path: Path, kb_path: Path
) -> None:
    device, _ = await cloud.enroll()
    await ask_and_correct(device)
    await device.send(ask(EARLY_CALL, "req_2", stream=False))
    second = await final(device)
    assert isinstance(second, ResultReceived)
    assert second.result.text == HOTLINE and second.result.sources == ["hotline"]
    await device.close()
    # A new process on the same store learns it back from the stored feedback.
    await cloud.service.stop()
    restarted = await CloudService.create(
        make_config(tmp_path, kb_path), backend=ScriptedBackend("Layer up.")
    )
    try:
        assert restarted.agent.skill is not None and restarted.agent.skill.kb.learned == 0
        await restarted.start()
        assert restarted.agent.skill.kb.learned == 1
        plan = restarted.agent.skill.plan([ChatTurn("user", EARLY_CALL)])
        assert plan.grounded_answer == HOTLINE
    finally:
        await restarted.stop()


async def test_forgetting_a_device_unlearns_what_its_feedback_taught_and_only_that(
    cloud: Cloud,
) -> None:
    forgotten, creds = await cloud.enroll()
    await ask_and_correct(forgotten)
    await forgotten.close()
    kept, _ = await cloud.enroll()
    await kept.send(ask("Is shipping free for me?", stream=False))
    answered = await final(kept)
    assert isinstance(answered, ResultReceived) and answered.result.sources == ["free-shipping"]
    await kept.send(Feedback(idempotency_key="idk_k1", request_id="req_1", rating="positive"))
    assert isinstance(await kept.next_event(AckReceived), AckReceived)
    skill = cloud.service.agent.skill
    assert skill is not None and skill.kb.learned == 2
    assert skill.plan([ChatTurn("user", EARLY_CALL)]).grounded_answer == HOTLINE
    async with admin_client(cloud.service) as admin:
        response = await admin.delete(f"/v1/devices/{creds.device_id}")
        assert response.status_code == 200
    skill = cloud.service.agent.skill
    assert skill is not None and skill.kb.learned == 1, "the other device's question stays"
    assert skill.plan([ChatTurn("user", EARLY_CALL)]).grounded_answer != HOTLINE
    await kept.send(ask(EARLY_CALL, "req_2", stream=False))
    again = await final(kept)
    assert isinstance(again, ResultReceived) and again.result.text != HOTLINE
    await kept.close()


@pytest.mark.cloud(revocation_poll_s=0.05)
async def test_a_device_forgotten_with_the_store_alone_is_unlearned_by_the_poll_once(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    unlearned: list[int] = []
    unlearn = cloud.service.curator.unlearn

    async def counted() -> int:
        unlearned.append(await unlearn())
        return unlearned[-1]

    monkeypatch.setattr(cloud.service.curator, "unlearn", counted)
    device, creds = await cloud.enroll()
    await ask_and_correct(device)
    await device.close()
    assert await cloud.service.store.forget_device(creds.device_id)  # as the CLI does
    async with asyncio.timeout(10):
        while not unlearned:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # ten more polls, each reading the erasure again
    assert unlearned == [0], "unlearned once, and nothing learned is left"


async def test_a_replica_learns_the_feedback_another_replica_took(
    cloud: Cloud, tmp_path: Path, kb_path: Path
) -> None:
    replica = await CloudService.create(
        make_config(tmp_path, kb_path, knowledge_poll_s=0.1), backend=ScriptedBackend("Hm.")
    )
    await replica.start()
    try:
        assert replica.agent.skill is not None
        device, _ = await cloud.enroll()
        await ask_and_correct(device)
        await device.close()
        async with asyncio.timeout(10):
            while replica.agent.skill.kb.learned == 0:
                await asyncio.sleep(0.05)
        plan = replica.agent.skill.plan([ChatTurn("user", EARLY_CALL)])
        assert plan.grounded_answer == HOTLINE
    finally:
        await replica.stop()


async def test_raw_personal_data_is_counted_never_stored_in_logs_or_metrics(
    cloud: Cloud, caplog: pytest.LogCaptureFixture
) -> None:
    # Logging as `edgeloop cloud serve --log-level debug` sets it up, and everything it emits
    # kept (the suite's fixture puts logging back afterwards).
    configure_logging("DEBUG")
    logging.getLogger().addHandler(caplog.handler)
    device, creds = await cloud.enroll()
    await device.send(ask("Charge card 4111 1111 1111 1111 and mail me at jo@example.com"))
    assert isinstance(await final(device), ResultReceived)
    record = await cloud.service.store.get_device(creds.device_id)
    assert record is not None and record.privacy_violations == 1
    async with httpx.AsyncClient() as client:
        metrics = await client.get(
            f"http://127.0.0.1:{cloud.service.admin_port}/metrics",
            headers={"Authorization": f"Bearer {cloud.service.admin_token}"},
        )
    assert 'edgeloop_privacy_violations_total{kind="credit_card"} 1.0' in metrics.text
    # Sample values are timestamps and counts whose digits may run "4111" by chance: the raw data
    # must be absent from every name and label, where text could leak.
    labels = [
        f"{sample.name} {sample.labels}"
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    ]
    assert labels and not [text for text in labels if "4111" in text or "jo@" in text]
    assert "4111 1111" not in metrics.text and "jo@example.com" not in metrics.text
    [row] = await interactions(cloud)
    stored = json.dumps(row.messages)
    assert "4111" not in stored and "jo@example.com" not in stored
    assert "[redacted credit_card]" in stored and "[redacted email]" in stored
    [call] = cloud.backend.calls
    assert "4111" not in call.messages[-1].content, "the backend never sees the raw value"
    await device.close()
    assert caplog.records, "the cloud logged nothing at debug level: the check below is void"
    assert "4111 1111" not in caplog.text and "jo@example.com" not in caplog.text


DELHI = "011 2345 6789"
"""A Delhi landline in India's national format: none of the default regions reads it."""


@pytest.mark.cloud(phone_regions=["US", "in"])
async def test_the_detector_reads_phone_numbers_in_the_configured_regions(cloud: Cloud) -> None:
    assert cloud.service.config.phone_regions == ("US", "IN")
    assert not detect(f"Call {DELHI}", phone_regions=PHONE_REGIONS), "the default misses it"
    device, creds = await cloud.enroll()
    await device.send(ask(f"Call me on {DELHI} about my order"))
    assert isinstance(await final(device), ResultReceived)
    record = await cloud.service.store.get_device(creds.device_id)
    assert record is not None and record.privacy_violations == 1
    [row] = await interactions(cloud)
    assert "2345" not in json.dumps(row.messages) and "[redacted phone]" in json.dumps(row.messages)
    await device.close()
    with pytest.raises(ValidationError, match="for that country use 'GB'"):
        CloudConfig(phone_regions=("UK",))
    with pytest.raises(DistillSettingsError, match="'XX' is not a region code"):
        DistillConfig(phone_regions=("XX",))


async def test_a_request_that_leaked_personal_data_is_not_answered_with_a_fact(
    cloud: Cloud,
) -> None:
    # Redacted, "Please use card [redacted credit_card]..." shares "card" with the gift card
    # fact; a request about the customer's own card goes to the LLM, as with placeholders.
    device, _ = await cloud.enroll()
    for streamed in (True, False):
        await device.send(
            ask("Please use card 4111 1111 1111 1111 for the order", f"req_{streamed}",
                stream=streamed)
        )  # fmt: skip
        event = await final(device)
        assert isinstance(event, ResultReceived)
        assert event.result.text == "Layer up: base, mid, shell."
    assert len(cloud.backend.calls) == 2
    await device.close()


@pytest.mark.cloud(limits={"max_requests_per_minute": 2})
async def test_requests_above_the_rate_limit_are_refused_as_rate_limited(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    names, tokens = [], {"prompt": 0, "completion": 0}
    for i in range(3):
        await device.send(ask("What should I pack for a day hike in the rain?", f"req_{i}"))
        event = await final(device)
        names.append(event.error.name if isinstance(event, RequestFailed) else "ok")
        if isinstance(event, ResultReceived):
            tokens["prompt"] += event.result.usage.prompt_tokens
            tokens["completion"] += event.result.usage.completion_tokens
    assert names == ["ok", "ok", "rate_limited"]
    await interactions(cloud, 2)  # both answers fully handled, their metrics counted
    async with admin_client(cloud.service) as admin:
        metrics = (await admin.get("/metrics")).text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    online = (("priority", "online"),)
    assert samples["edgeloop_requests_total", (("outcome", "ok"), *online)] == 2
    assert samples["edgeloop_requests_total", (("outcome", "rate_limited"), *online)] == 1
    assert samples["edgeloop_request_seconds_count", online] == 2
    assert samples["edgeloop_request_seconds_bucket", (("le", "+Inf"), *online)] == 2
    assert 0 < samples["edgeloop_request_seconds_sum", online] < 10
    for kind, n in tokens.items():
        assert samples["edgeloop_tokens_total", (("kind", kind),)] == n
    await device.close()


@pytest.mark.cloud(backend=ScriptedBackend("finished in time", delay_s=0.3))
async def test_shutdown_lets_in_flight_requests_finish_then_says_goodbye(cloud: Cloud) -> None:
    device, _ = await cloud.enroll()
    await device.send(ask("A question that takes a moment to answer, please?"))
    async with asyncio.timeout(5):
        while not cloud.backend.calls:
            await asyncio.sleep(0.01)
    stopping = asyncio.create_task(cloud.service.server.shutdown(grace_s=5))
    event = await final(device)
    assert isinstance(event, ResultReceived) and event.result.text == "finished in time"
    assert isinstance(await device.next_event(GoodbyeReceived), GoodbyeReceived)
    await stopping


async def test_admin_api_requires_the_token_and_lists_devices(cloud: Cloud) -> None:
    device, creds = await cloud.enroll()
    base = f"http://127.0.0.1:{cloud.service.admin_port}"
    auth = {"Authorization": f"Bearer {cloud.service.admin_token}"}
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/v1/devices")).status_code == 401
        assert (
            await client.get("/v1/devices", headers={"Authorization": "Bearer wrong"})
        ).status_code == 401
        devices = (await client.get("/v1/devices", headers=auth)).json()
        assert [d["id"] for d in devices] == [creds.device_id]
        token = (
            await client.post("/v1/enrollment-tokens", headers=auth, json={"ttl_hours": 1})
        ).json()
        assert token["token"].startswith("elt_")
        for body in (
            {"note": {"aisle": 3}}, {"note": "x" * 257}, {"ttl_hours": True}, {"ttl_s": 60}, [1],
        ):  # fmt: skip
            refused = await client.post("/v1/enrollment-tokens", headers=auth, json=body)
            assert refused.status_code == 400 and refused.json()["error"] == "bad_request"
        typo = await client.post("/v1/enrollment-tokens", headers=auth, json={"ttl_s": 60})
        assert "unknown field(s) ttl_s" in typo.json()["message"], "not a week-long token"
        load = (await client.get("/v1/load", headers=auth)).json()
        assert load["scheduler"]["capacity"] == 1 and load["sessions"] == 1
        log = load["interaction_log"]
        assert log["pending"] + log["written"] == 1 and log["lost"] == 0, "the session's start"
        revoked = await client.post(f"/v1/devices/{creds.device_id}/revoke", headers=auth)
        assert revoked.json()["revoked"] is True
        assert (await client.get("/v1/interactions?before=1", headers=auth)).json() == []
        bad = await client.get("/v1/interactions?before=last", headers=auth)
        assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
        typo = await client.get("/v1/interactions?status=failed", headers=auth)
        assert typo.status_code == 400 and "ok, error, cancelled" in typo.json()["message"]
        assert (await client.get("/v1/interactions?status=error", headers=auth)).json() == []
        assert (await client.get("/v1/feedback/summary", headers=auth)).json()["positive"] == 0
        assert (await client.get("/v1/adapters", headers=auth)).json() == []
        assert (await client.get("/v1/rollouts", headers=auth)).json() == []
    closed = (await events_to_the_end(device))[-1]
    assert isinstance(closed, SessionClosed) and closed.code == 1008, "revoked: session ended"


async def test_the_knowledge_file_is_reloaded_while_serving(tmp_path: Path, kb_path: Path) -> None:
    kb = tmp_path / "kb.md"
    original = kb_path.read_text(encoding="utf-8")
    kb.write_text(original, encoding="utf-8")
    backend = ScriptedBackend("Hm.")
    service = await CloudService.create(make_config(tmp_path, kb), backend=backend)
    await service.start()
    cloud = Cloud(service, backend)
    try:
        device, _ = await cloud.enroll()
        await ask_and_correct(device)  # EARLY_CALL -> the hotline fact, learned
        # The store moves its free-shipping threshold, stops bike fittings, adds gift wrap.
        edited = original.replace("free on orders over $75", "free on orders over $60")
        edited = "\n".join(line for line in edited.splitlines() if "[bike-fit]" not in line)
        edited += "\n- [gift-wrap] Gift wrapping costs $4 per item.\n"
        kb.write_text(edited)
        async with admin_client(service) as client:
            reloaded = (await client.post("/v1/knowledge/reload")).json()
            assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (
                ["gift-wrap"], ["bike-fit"], ["free-shipping"]
            )  # fmt: skip
            assert reloaded["facts"] == 20 and reloaded["learned"] == 1, "hotline unchanged"
            await device.send(ask("Is shipping free?", "req_2", stream=False))
            event = await final(device)
            assert isinstance(event, ResultReceived) and "$60" in event.result.text
            await device.send(ask(EARLY_CALL, "req_3", stream=False))
            event = await final(device)
            assert isinstance(event, ResultReceived) and event.result.text == HOTLINE

            # A broken file is refused and the facts in use stay.
            kb.write_text("# nothing but a heading\n")
            refused = await client.post("/v1/knowledge/reload")
            assert refused.status_code == 422 and refused.json()["error"] == "invalid_knowledge"
            assert (await client.get("/v1/knowledge")).json()["facts"] == 20
            await device.send(ask("Is shipping free?", "req_4", stream=False))
            event = await final(device)
            assert isinstance(event, ResultReceived) and "$60" in event.result.text

            # A correction vouched for the fact's text: once the text changes, it is not
            # carried over to the new one.
            kb.write_text(edited.replace("from 7:30 to 21:00", "from 7:00 to 22:00"))
            reloaded = (await client.post("/v1/knowledge/reload")).json()
            assert reloaded["changed"] == ["hotline"] and reloaded["learned"] == 0
            metrics = (await client.get("/metrics")).text
            assert 'edgeloop_knowledge_reloads_total{outcome="refused"} 1.0' in metrics
            assert 'edgeloop_knowledge_reloads_total{outcome="ok"} 2.0' in metrics
            assert "edgeloop_knowledge_facts 20.0" in metrics
        await device.close()
    finally:
        await service.stop()


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` with a modification time two seconds back (a file finished
    writing, as the knowledge watch wants it)."""
    path.write_text(text, encoding="utf-8")
    stamp = path.stat().st_mtime - 2
    os.utime(path, (stamp, stamp))


async def watching(tmp_path: Path, kb_path: Path, **overrides: object) -> tuple[CloudService, Path]:
    """A started service over a copy of the knowledge file that looks at it every 50 ms."""
    kb = tmp_path / "kb.md"
    replace_file(kb, kb_path.read_text(encoding="utf-8"))
    config = make_config(tmp_path, kb, knowledge_poll_s=0.05, **overrides)
    service = await CloudService.create(config, backend=ScriptedBackend("Hm."))
    await service.start()
    return service, kb


def threshold(service: CloudService) -> str:
    """The free-shipping threshold the service answers with now."""
    skill = service.agent.skill
    assert skill is not None
    return skill.kb.facts["free-shipping"].text.split("free on orders over ")[1].split(";")[0]


async def test_a_changed_knowledge_file_is_reloaded_by_itself_and_a_broken_one_once_refused(
    tmp_path: Path, kb_path: Path
) -> None:
    service, kb = await watching(tmp_path, kb_path)

    def reloads(outcome: str) -> float | None:
        name = "edgeloop_knowledge_reloads_total"
        return service.metrics.registry.get_sample_value(name, {"outcome": outcome})

    try:
        replace_file(kb, kb.read_text().replace("over $75", "over $60"))
        async with asyncio.timeout(10):
            while reloads("ok") != 1:
                await asyncio.sleep(0.02)
        assert threshold(service) == "$60"
        replace_file(kb, "# nothing here any more\n")
        async with asyncio.timeout(10):
            while reloads("refused") != 1:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # several more looks at the same broken file
        assert reloads("refused") == 1 and reloads("ok") == 1
        assert threshold(service) == "$60"  # the facts in use stay
    finally:
        await service.stop()


async def test_with_the_watch_off_only_a_reload_request_reads_the_file(
    tmp_path: Path, kb_path: Path
) -> None:
    service, kb = await watching(tmp_path, kb_path, knowledge_watch=False)
    try:
        replace_file(kb, kb.read_text().replace("over $75", "over $60"))
        await asyncio.sleep(0.3)
        assert threshold(service) == "$75"
        await service.curator.reload()
        assert threshold(service) == "$60"
    finally:
        await service.stop()


async def test_reloading_without_a_knowledge_file_is_refused(tmp_path: Path) -> None:
    service = await CloudService.create(make_config(tmp_path, None), backend=ScriptedBackend("Hm."))
    await service.start()
    try:
        async with admin_client(service) as client:
            refused = await client.post("/v1/knowledge/reload")
            assert refused.status_code == 409 and refused.json()["error"] == "no_knowledge"
            assert (await client.get("/v1/knowledge")).json()["facts"] == 0
    finally:
        await service.stop()


async def test_retention_purges_old_interactions_when_the_service_starts(
    tmp_path: Path, kb_path: Path
) -> None:
    config = make_config(tmp_path, kb_path, retention_days=30)
    service = await CloudService.create(config, backend=ScriptedBackend("Hm."))
    token = await service.store.create_enrollment_token()
    await service.store.enroll_device(token, "dev_r", "R" * 43)
    await service.store.record_interactions(
        [NewInteraction(device_id="dev_r", request_id=f"req_{i}", placeholders=[],
                        messages=[{"role": "user", "content": "q"}], status="ok")
         for i in range(2)]
    )  # fmt: skip
    async with service.store.engine.begin() as conn:
        await conn.execute(
            update(tables.Interaction)
            .where(tables.Interaction.request_id == "req_0")
            .values(created_at=datetime.now(UTC) - timedelta(days=31))
        )
    await service.start()
    try:
        assert [r.request_id for r in await service.store.list_interactions()] == ["req_1"]
        purged = service.metrics.registry.get_sample_value(
            "edgeloop_purged_rows_total", {"table": "interactions"}
        )
        assert purged == 1
    finally:
        await service.stop()


async def test_a_reload_that_cannot_read_the_feedback_keeps_the_facts_in_use(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = cloud.service.agent.skill

    async def unavailable(**_: object) -> list[object]:
        raise StoreUnavailable("database unavailable: test")

    monkeypatch.setattr(cloud.service.store, "list_interactions", unavailable)
    async with admin_client(cloud.service) as client:
        refused = await client.post("/v1/knowledge/reload")
    assert refused.status_code == 503 and refused.json()["error"] == "store_unavailable"
    assert cloud.service.agent.skill is before
