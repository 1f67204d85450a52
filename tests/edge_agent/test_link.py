"""The device's link against the real cloud agent on loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud_agent.backends import ScriptedBackend
from cloud_agent.bundles import build_bundle, rotate_signing_key
from cloud_agent.config import CloudConfig
from cloud_agent.service import CloudService
from cloud_agent.store import Store
from edge_agent.config import EdgeConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.link import CloudLink, CloudUnavailable, DeviceIdentity, LinkState, read_identity
from edge_agent.outbox import Outbox
from edge_agent.updates import UpdateRejected, verify_offer
from protocol import ChatMessage, Escalate, Feedback, InvalidMessage, Result
from shared import ConfigError, VerifyKey
from tests.cloud_fixtures import Cloud, make_config
from tests.edge_fixtures import free_port

pytestmark = pytest.mark.slow


def ask(text: str, rid: str, *, stream: bool = True, deadline_ms: int = 5000) -> Escalate:
    return Escalate(
        request_id=rid, messages=[ChatMessage(role="user", content=text)],
        deadline_ms=deadline_ms, max_tokens=32, stream=stream,
    )  # fmt: skip


async def enrolled_link(cloud: Cloud, state: Path, **kw: object) -> CloudLink:
    token = await cloud.service.store.create_enrollment_token()
    link = CloudLink(cloud.url, state, enrollment_token=token, backoff_initial_s=0.05, **kw)  # type: ignore[arg-type]
    link.start()
    assert await link.wait_up(10)
    return link


async def test_the_link_enrolls_once_and_authenticates_after_a_restart(
    cloud: Cloud, tmp_path: Path
) -> None:
    link = await enrolled_link(cloud, tmp_path / "dev")
    device_id = link.identity.device_id
    assert device_id is not None and link.identity.server_key
    assert read_identity(tmp_path / "dev").cloud_url == cloud.url  # where it enrolled
    await link.stop()
    again = CloudLink(cloud.url, tmp_path / "dev")  # no token any more
    again.start()
    assert await again.wait_up(10) and again.identity.device_id == device_id
    assert [d.id for d in await cloud.service.store.list_devices()] == [device_id]
    await again.stop()


async def test_escalations_stream_pieces_then_the_result(cloud: Cloud, tmp_path: Path) -> None:
    link = await enrolled_link(cloud, tmp_path / "dev")
    items = [i async for i in link.escalate(ask("Any tips for a wet autumn hike in Wales?", "r1"))]
    assert isinstance(items[-1], Result)
    assert "".join(i for i in items if isinstance(i, str)) == items[-1].text
    await link.stop()


def test_a_link_with_a_url_or_token_it_could_never_use_is_refused_at_once(
    tmp_path: Path,
) -> None:
    with pytest.raises(EdgeAgentError, match="expected ws:// or wss://"):
        CloudLink("http://127.0.0.1:8765/v1", tmp_path / "dev", enrollment_token="elt_" + "x" * 20)
    with pytest.raises(InvalidMessage, match="enrollment token"):
        CloudLink("ws://127.0.0.1:8765/v1", tmp_path / "dev", enrollment_token="elt_bad")
    with pytest.raises(ValidationError, match="expected ws:// or wss://"):
        EdgeConfig(cloud_url="https://cloud.example.com/v1")


async def test_a_link_that_can_never_connect_says_why_at_start(tmp_path: Path) -> None:
    link = CloudLink("ws://127.0.0.1:9/v1", tmp_path / "dev")
    with pytest.raises(EdgeAgentError, match="not enrolled"):
        link.start()  # neither enrolled nor given a token
    (tmp_path / "dev" / "identity.json").write_text('{"device_id": "dev_1"')
    with pytest.raises(EdgeAgentError, match="identity.json is damaged"):
        CloudLink("ws://127.0.0.1:9/v1", tmp_path / "dev", enrollment_token="elt_" + "x" * 20)
    (tmp_path / "dev" / "identity.json").write_text(
        '{"device_id": "dev_1", "server_key": "k", "cloud_url": "http://cloud.example/v1"}'
    )
    with pytest.raises(EdgeAgentError, match="identity.json is damaged.*ws://"):
        read_identity(tmp_path / "dev")
    # Written before identities kept the cloud's URL: still read, with none.
    (tmp_path / "dev" / "identity.json").write_text('{"device_id": "dev_1", "server_key": "k"}')
    assert read_identity(tmp_path / "dev") == DeviceIdentity("dev_1", "k", None)


async def test_a_link_that_is_down_says_so_at_once(tmp_path: Path) -> None:
    link = CloudLink("ws://127.0.0.1:9/v1", tmp_path / "dev", enrollment_token="elt_x" * 3)
    with pytest.raises(CloudUnavailable) as info:
        async for _ in link.escalate(ask("hello?", "r1")):
            pass
    assert info.value.reason == "link.down" and link.state is LinkState.DOWN
    link.start()
    assert not await link.wait_up(0.5)
    await link.stop()
    assert link.last_failure is not None and "ConnectionRefusedError" in link.last_failure


@pytest.mark.cloud(backend=ScriptedBackend(hang=True))
async def test_a_missed_deadline_cancels_at_the_cloud_and_says_so(
    cloud: Cloud, tmp_path: Path
) -> None:
    link = await enrolled_link(cloud, tmp_path / "dev")
    with pytest.raises(CloudUnavailable) as info:
        async for _ in link.escalate(
            ask("Plan a month in Patagonia with gear.", "r1", deadline_ms=300)
        ):
            pass
    assert info.value.reason in ("cloud.deadline", "cloud.overloaded")
    async with asyncio.timeout(5):
        while cloud.backend.cancelled == 0 and cloud.service.scheduler.load().online_in_flight:
            await asyncio.sleep(0.01)
    await link.stop()


@pytest.mark.cloud(backend=ScriptedBackend(hang=True))
async def test_a_device_revoked_while_connected_is_cut_off_and_stops_reconnecting(
    cloud: Cloud, tmp_path: Path
) -> None:
    link = await enrolled_link(cloud, tmp_path / "dev")
    waiting = asyncio.create_task(
        anext(link.escalate(ask("Plan a month in Patagonia with gear.", "r1", deadline_ms=60_000)))
    )
    async with asyncio.timeout(5):
        while not cloud.backend.calls:
            await asyncio.sleep(0.01)
    assert link.identity.device_id is not None
    assert await cloud.service.revoke(link.identity.device_id)
    with pytest.raises(CloudUnavailable) as info:
        async with asyncio.timeout(5):
            await waiting
    assert info.value.reason == "cloud.device_revoked"
    async with asyncio.timeout(5):  # stopped for good: it does not wait out its timeout
        assert not await link.wait_up(60)
    assert link.refused == "device_revoked" and link.state is LinkState.DOWN
    await link.stop()


async def test_a_second_connection_under_the_same_identity_takes_over(
    cloud: Cloud, tmp_path: Path
) -> None:
    first = await enrolled_link(cloud, tmp_path / "dev")
    second = CloudLink(cloud.url, tmp_path / "dev")  # the identity file, copied or shared
    second.start()
    assert await second.wait_up(10)
    async with asyncio.timeout(5):
        while first.refused is None:
            await asyncio.sleep(0.01)
    assert first.refused == "session_replaced" and first.state is LinkState.DOWN
    async with asyncio.timeout(5):  # it does not take the session back
        assert not await first.wait_up(60)
    assert cloud.service.server.session_count == 1
    items = [i async for i in second.escalate(ask("Which stove for winter camping?", "r1"))]
    assert isinstance(items[-1], Result)
    await first.stop()
    await second.stop()


@pytest.mark.cloud(limits={"max_requests_per_minute": 1})
async def test_refusals_become_typed_reasons(cloud: Cloud, tmp_path: Path) -> None:
    link = await enrolled_link(cloud, tmp_path / "dev")
    [_ async for _ in link.escalate(ask("A first question about boots for winter?", "r1"))]
    with pytest.raises(CloudUnavailable) as info:
        [_ async for _ in link.escalate(ask("A second question about boots for winter?", "r2"))]
    assert info.value.reason == "cloud.rate_limited"
    await link.stop()


async def cloud_and_link(
    config: CloudConfig, state: Path, *, retry_after_s: int, outbox: Outbox | None = None
) -> tuple[CloudService, CloudLink]:
    """A cloud on `config`'s port (its goodbye saying `retry_after_s`), and a link enrolled
    with it that reconnects quickly (backoff at most 0.2 s)."""
    service = await CloudService.create(config, backend=ScriptedBackend())
    service.server.retry_after_s = retry_after_s
    await service.start()
    token = await service.store.create_enrollment_token()
    link = CloudLink(f"ws://127.0.0.1:{config.port}/v1", state, enrollment_token=token,
                     outbox=outbox, backoff_initial_s=0.05, backoff_max_s=0.2)  # fmt: skip
    link.start()
    assert await link.wait_up(10)
    return service, link


async def test_feedback_queued_offline_reaches_the_cloud_once_after_reconnect(
    tmp_path: Path, kb_path: Path
) -> None:
    config = make_config(tmp_path / "cloud", kb_path, port=free_port())
    outbox = Outbox(tmp_path / "dev" / "outbox.db")
    # Its goodbye does not hold the device back.
    first, link = await cloud_and_link(config, tmp_path / "dev", retry_after_s=0, outbox=outbox)
    await first.stop()
    async with asyncio.timeout(5):
        while link.state is LinkState.UP:
            await asyncio.sleep(0.01)

    link.queue_reliable(Feedback(idempotency_key="idk_off", request_id="r9", rating="negative"))
    assert len(outbox) == 1

    second = await CloudService.create(config, backend=ScriptedBackend())
    await second.start()
    try:
        assert await link.wait_up(10)
        async with asyncio.timeout(5):
            while len(outbox):
                await asyncio.sleep(0.01)
        summary = await second.store.feedback_summary()
        assert summary.negative == 1
    finally:
        await link.stop()
        await second.stop()


async def test_after_a_goodbye_the_link_comes_back_no_sooner_than_the_cloud_said(
    tmp_path: Path, kb_path: Path
) -> None:
    config = make_config(tmp_path / "cloud", kb_path, port=free_port())
    first, link = await cloud_and_link(config, tmp_path / "dev", retry_after_s=2)
    loop = asyncio.get_running_loop()
    left = loop.time()
    await first.stop()  # goodbye{shutdown, retry_after_s: 2}
    second = await CloudService.create(config, backend=ScriptedBackend())
    await second.start()
    try:
        assert await link.wait_up(10)
        # Its own backoff (at most 0.2 s here) would have had it back as soon as the
        # second cloud listened.
        assert loop.time() - left >= 2.0
    finally:
        await link.stop()
        await second.stop()


@pytest.mark.cloud(limits={"max_message_bytes": 4096})
async def test_a_queued_message_the_cloud_cannot_take_does_not_hold_up_the_rest(
    cloud: Cloud, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path / "dev" / "outbox.db")
    link = await enrolled_link(cloud, tmp_path / "dev", outbox=outbox)
    too_big = Feedback(
        idempotency_key="idk_big", request_id="r1", rating="negative", correction="x" * 5000
    )
    link.queue_reliable(too_big)
    link.queue_reliable(Feedback(idempotency_key="idk_ok", request_id="r2", rating="positive"))
    assert await link.wait_outbox_empty(5), "the second one was held up behind the first"
    summary = await cloud.service.store.feedback_summary()
    assert (summary.positive, summary.negative) == (1, 0)
    assert link.state is LinkState.UP, "nothing too large went out to close the connection"
    await link.stop()


async def test_a_device_follows_the_clouds_key_rotation_and_trusts_only_the_new_key(
    cloud: Cloud, tmp_path: Path
) -> None:
    link = await enrolled_link(cloud, tmp_path / "dev")
    old = cloud.service.signing_key
    assert link.identity.server_key == old.verify_key().b64()
    await link.stop()
    config = cloud.service.config
    await cloud.service.stop()
    store = await Store.open(config.resolved_database_url())  # as `cloud rotate-key` does
    try:
        new = await rotate_signing_key(config.data_dir, store)
    finally:
        await store.close()
    service = await CloudService.create(config, backend=ScriptedBackend("Layer up."))
    await service.start()
    try:
        assert service.signing_key.verify_key() == new.verify_key()
        url = f"ws://127.0.0.1:{service.port}/v1"
        again = CloudLink(url, tmp_path / "dev")
        again.start()
        assert await again.wait_up(10)
        pinned = new.verify_key().b64()
        assert again.identity.server_key == pinned
        assert read_identity(tmp_path / "dev").server_key == pinned, "kept across restarts"
        # What the updater checks offers against: the new key's bundles pass, the old one's not.
        src = tmp_path / "adapter.bin"
        src.write_bytes(b"lora" * 100)
        offers = {
            name: build_bundle(
                tmp_path / name,
                name="facts",
                version=1,
                base_model_sha256="0" * 64,
                files={"adapter.gguf": (src, "adapter")},
                key=key,
            )  # fmt: skip
            for name, key in (("new", new), ("old", old))
        }
        check = VerifyKey.from_b64(again.identity.server_key)
        verify_offer(offers["new"], pinned_key=check, base_model_sha256="0" * 64,
                     current_version=None)  # fmt: skip
        with pytest.raises(UpdateRejected, match="bad_signature"):
            verify_offer(offers["old"], pinned_key=check, base_model_sha256="0" * 64,
                         current_version=None)  # fmt: skip
        await again.stop()
        # A device enrolled from now on pins the new key at once.
        token = await service.store.create_enrollment_token()
        fresh = CloudLink(url, tmp_path / "fresh", enrollment_token=token)
        fresh.start()
        assert await fresh.wait_up(10) and fresh.identity.server_key == pinned
        await fresh.stop()
    finally:
        await service.stop()
    # The rotated-out key serves no more: a replica still holding it is refused.
    stale = make_config(tmp_path / "stale", None, database_url=config.resolved_database_url())
    old.save(stale.data_dir / "server.key")
    with pytest.raises(ConfigError, match="rotated out"):
        await CloudService.create(stale, backend=ScriptedBackend())
