"""EdgeAgent end to end: the real local model, the real cloud on loopback, a spy on every frame."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from cloud_agent.backends import ChatRequest, ScriptedBackend
from edge_agent.agent import EdgeAgent, Turn
from edge_agent.blocking import BlockingEdgeAgent
from edge_agent.link import CloudLink, LinkState
from edge_agent.local_model import DeviceProfile, LocalModel, RuntimeSettings
from edge_agent.outbox import Outbox
from edge_agent.privacy import Redactor
from edge_agent.router import Coverage, IntentIndex, Router, Target
from examples.kiosk.intents import KIOSK_INTENTS
from protocol import Report, RouteCounts
from tests.cloud_fixtures import Cloud, recall

pytestmark = pytest.mark.slow


def echo_placeholders(request: ChatRequest) -> str:
    question = request.messages[-1].content
    held = [w.strip(",.?") for w in question.split() if w.startswith("<") and ">" in w]
    return f"Noted {' and '.join(held)} for you." if held else "Here is a considered answer."


@pytest.fixture(scope="module")
def model() -> LocalModel:
    settings = RuntimeSettings(threads=2, n_ctx=1024, max_tokens=8)
    return LocalModel(profile=DeviceProfile(cores=2, memory_mb=4096), settings=settings)


async def make_agent(cloud: Cloud, model: LocalModel, tmp_path: Path) -> EdgeAgent:
    token = await cloud.service.store.create_enrollment_token()
    outbox = Outbox(tmp_path / "dev" / "outbox.db")
    link = CloudLink(
        cloud.url, tmp_path / "dev", enrollment_token=token, outbox=outbox, backoff_initial_s=0.05
    )
    agent = EdgeAgent(model, link=link, local_max_tokens=8)
    for name, examples in KIOSK_INTENTS.items():
        agent.intent(
            name,
            examples,
            handler=(lambda text: "Your cart has 2 items.") if name == "cart_show" else None,
        )
    await agent.start()
    assert await link.wait_up(10)
    return agent


@pytest.mark.cloud(backend=ScriptedBackend(echo_placeholders))
async def test_each_route_answers_and_says_where_it_came_from(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await make_agent(cloud, model, tmp_path)
    tool = await agent.ask("Show my cart")
    assert tool.text == "Your cart has 2 items." and not tool.from_cloud
    assert tool.decision.reasons == ("intent.cart_show",)
    cloud_reply = await agent.ask(
        "Compare three-season and four-season tents and explain when each makes sense"
    )
    assert cloud_reply.from_cloud and cloud_reply.text == "Here is a considered answer."
    assert cloud_reply.prompt_tokens > 0 and cloud_reply.tokens == 5  # the backend's counts
    local = await agent.ask("Update my phone number to (212) 555-0187")
    assert (
        not local.from_cloud
        and local.decision.target is Target.LOCAL
        and local.confidence is not None
        and local.prompt_tokens > 10
    )
    await agent.stop()


@pytest.mark.cloud(backend=ScriptedBackend(echo_placeholders))
async def test_a_request_can_cap_its_answer_and_a_blank_one_is_refused(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await make_agent(cloud, model, tmp_path)
    question = "Compare three-season and four-season tents and explain when each makes sense"
    await agent.ask(question, max_tokens=5)
    await agent.ask(question)
    assert [c.max_tokens for c in cloud.backend.calls] == [5, agent.cloud_max_tokens]
    local = await agent.ask("Update my phone number to (212) 555-0187", max_tokens=3)
    assert not local.from_cloud and 0 < local.tokens <= 3
    for bad in ({"text": "  "}, {"text": "hi", "max_tokens": 0}):
        with pytest.raises(ValueError):
            await agent.ask(**bad)  # type: ignore[arg-type]
    await agent.stop()


@pytest.mark.cloud(backend=ScriptedBackend(echo_placeholders))
async def test_the_agent_redacts_with_the_routers_redactor(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    # A UK kiosk: its router reads national-format numbers as British. The agent, given only
    # the router, must redact with the same redactor, or the number leaves the device raw.
    token = await cloud.service.store.create_enrollment_token()
    link = CloudLink(cloud.url, tmp_path / "dev", enrollment_token=token)
    router = Router(IntentIndex(), redactor=Redactor(phone_regions=("GB",)))
    agent = EdgeAgent(model, link=link, router=router)
    assert agent.redactor is router.redactor
    await agent.start()
    assert await link.wait_up(10)
    reply = await agent.ask(
        "Call me on 020 7946 0958 and compare three-season and four-season tents in detail"
    )
    assert reply.from_cloud
    sent = " ".join(t.content for call in cloud.backend.calls for t in call.messages)
    assert "7946" not in sent and "<PHONE_1>" in sent
    with pytest.raises(ValueError, match="one redactor"):
        EdgeAgent(model, router=router, redactor=Redactor())
    await agent.stop()


@pytest.mark.cloud(backend=ScriptedBackend(echo_placeholders))
async def test_placeholders_go_out_and_values_come_back_in_the_stream(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await make_agent(cloud, model, tmp_path)
    text = (
        "My card 4111 1111 1111 1111 was declined at checkout, explain why and compare my options"
    )
    stream = agent.stream(text)
    shown = "".join([piece async for piece in stream])
    assert stream.reply is not None and stream.reply.from_cloud
    assert shown == stream.reply.text == "Noted 4111 1111 1111 1111 for you."
    async with asyncio.timeout(5):  # interactions are written just after the reply
        while not (rows := await cloud.service.store.list_interactions()):
            await asyncio.sleep(0.01)
    [row] = rows
    assert "4111" not in json.dumps(row.messages) and "<CARD_1>" in json.dumps(row.messages)
    assert row.placeholders == ["<CARD_1>"]
    await agent.stop()


@pytest.mark.cloud(backend=ScriptedBackend(echo_placeholders))
async def test_stop_strings_end_the_answer_wherever_it_is_given(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await make_agent(cloud, model, tmp_path)
    # In the cloud: the stop string is in the answer as the user sees it (the card number put
    # back), split over the stream's deltas; the cloud saw only "<CARD_1> for".
    text = (
        "My card 4111 1111 1111 1111 was declined at checkout, explain why and compare my options"
    )
    stream = agent.stream(text, stop=["zzz", "1111 for"])
    shown = "".join([piece async for piece in stream])
    reply = stream.reply
    assert reply is not None and reply.from_cloud
    assert shown == reply.text == "Noted 4111 1111 1111 " and reply.finish_reason == "stop"
    assert reply.tokens == 4, "the cloud's answer was read to its end: its usage is whole"
    async with asyncio.timeout(5):
        while not (rows := await cloud.service.store.list_interactions()):
            await asyncio.sleep(0.01)
    assert rows[0].answer == "Noted <CARD_1> for you."
    # On the device: decoding stops at the stop string, the answer greedy up to it.
    question = "Update my phone number to (212) 555-0187"
    whole = await agent.ask(question, max_tokens=24)
    assert not whole.from_cloud and len(whole.text.split()) > 3
    stop = whole.text.split()[2]
    cut = await agent.ask(question, max_tokens=24, stop=stop)
    assert cut.text == whole.text[: whole.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.tokens < whole.tokens, "the device stopped decoding there"
    # An intent handler's reply is the app's own text: not cut.
    assert (await agent.ask("Show my cart", stop=["2"])).text == "Your cart has 2 items."
    for bad in (["a", "b", "c", "d", "e"], [""], ["x" * 257]):
        with pytest.raises(ValueError, match="stop"):
            agent.stream(question, stop=bad)
    await agent.stop()


@pytest.mark.cloud(backend=ScriptedBackend(hang=True))
async def test_when_the_cloud_is_too_slow_the_device_answers_and_says_why(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await make_agent(cloud, model, tmp_path)
    agent.deadline_ms = 300
    reply = await agent.ask("Plan a two-week trek across Patagonia and compare gear options")
    assert not reply.from_cloud and reply.fallback_reason in ("cloud.deadline", "cloud.overloaded")
    assert reply.text.strip()
    await agent.stop()
    down = await agent.ask("Plan a two-week trek across Patagonia and compare gear options")
    assert down.decision.target is Target.LOCAL_FALLBACK and down.text.strip()


@pytest.mark.cloud(backend=ScriptedBackend(echo_placeholders))
async def test_no_raw_personal_value_from_the_workload_leaves_the_device(
    cloud: Cloud, model: LocalModel, tmp_path: Path, workload_path: Path
) -> None:
    agent = await make_agent(cloud, model, tmp_path)
    assert agent.link is not None
    sent: list[str] = []
    ws = agent.link._ws
    assert ws is not None
    original = ws.send

    async def spy(message, text=None):  # type: ignore[no-untyped-def]
        sent.append(message if isinstance(message, str) else message.decode("utf-8", "replace"))
        return await original(message)

    ws.send = spy  # type: ignore[method-assign]
    rows = [json.loads(line) for line in workload_path.read_text().splitlines() if line.strip()]
    for row in rows:
        if row["class"] in ("private", "cloud_complex", "learnable_fact"):
            await agent.ask(row["text"])
        if row["class"] == "private":
            # An app may send a request to the cloud itself: what can be redacted goes
            # redacted, and what no placeholder stands for (national ids) stays.
            await agent.ask(row["text"], override=Target.CLOUD)
    for row in rows:
        if row["class"] == "private":
            await agent.feedback(
                "req_x", "negative", correction=f"Use {row['pii'][0]['value']} instead"
            )
            # The same data earlier in a conversation, the device's answer repeating it, and
            # a question that goes to the cloud with those turns.
            history = [Turn("user", row["text"]), Turn("assistant", f"{row['pii'][0]['value']}?")]
            await agent.ask(
                "Compare three-season and four-season tents and explain when each makes sense",
                history=history,
            )
    values = {p["value"] for r in rows if r["class"] == "private" for p in r["pii"]}
    assert len(sent) > 100, "the spy saw the traffic"
    conversations = [f for f in sent if '"type":"escalate"' in f and '"role":"assistant"' in f]
    assert len(conversations) > 40, "conversations carrying the data went to the cloud"
    leaks = [v for v in values for frame in sent if v in frame]
    assert leaks == []
    # Every answer came whole: no cancel went out, not even after a result.
    assert not [f for f in sent if '"type":"cancel"' in f]
    await agent.stop()


async def test_an_intent_given_a_string_replies_with_it_on_the_device(model: LocalModel) -> None:
    agent = EdgeAgent(model, local_max_tokens=8)
    agent.intent("greet", ["hello", "hi"], "Hello! How can I help?")
    reply = await agent.ask("hello")
    assert (reply.text, reply.decision.intent, reply.from_cloud) == (
        "Hello! How can I help?", "greet", False
    )  # fmt: skip
    assert reply.tokens == 0  # the model was not asked


def test_the_blocking_facade_serves_apps_without_an_event_loop(model: LocalModel) -> None:
    agent = EdgeAgent(model, local_max_tokens=8)
    agent.intent("greet", ["hello", "hi"], handler=lambda text: "Hello! How can I help?")
    blocking = BlockingEdgeAgent(agent)
    try:
        assert blocking.ask("hello").text == "Hello! How can I help?"
        chat = blocking.conversation()
        chat.ask("hello")
        followed = chat.ask("What is the warmest sleeping bag?")
        assert [t.text for t in chat.turns] == [
            "hello", "Hello! How can I help?", "What is the warmest sleeping bag?", followed.text
        ]  # fmt: skip
        chat.clear()
        assert chat.turns == []
        assert (
            blocking.ask("What is the warmest sleeping bag?").decision.target
            is Target.LOCAL_FALLBACK
        )
        # Streamed, for a UI that shows the answer as it comes: the same answer, piece by
        # piece, and a conversation remembers it once it is all read.
        whole = blocking.ask("Which socks keep feet dry?", max_tokens=8)
        stream = blocking.stream("Which socks keep feet dry?", max_tokens=8)
        assert stream.decision.target is Target.LOCAL_FALLBACK and stream.reply is None
        pieces = list(stream)
        assert len(pieces) > 1 and "".join(pieces) == whole.text
        assert stream.reply is not None and stream.reply.text == whole.text
        assert stream.reply.request_id == stream.request_id
        streamed = chat.stream("hello")
        assert list(streamed) == ["Hello! How can I help?"]
        assert [t.text for t in chat.turns] == ["hello", "Hello! How can I help?"]
        # Given up after a piece: no reply, nothing remembered; the model answers on.
        with chat.stream("Which socks keep feet dry?", max_tokens=8) as abandoned:
            next(abandoned)
        assert abandoned.reply is None and len(chat.turns) == 2
        assert blocking.ask("Which socks keep feet dry?", max_tokens=8).text == whole.text
        left_open = blocking.stream("Which socks keep feet dry?", max_tokens=8)
        next(left_open)
    finally:
        blocking.close()
    # Closing the agent gave up the stream left open, while its loop still ran.
    assert left_open.reply is None and left_open._stream._pieces.ag_frame is None  # type: ignore[attr-defined]


@pytest.mark.cloud(
    backend=ScriptedBackend(echo_placeholders), limits={"max_requests_per_minute": 1}
)
async def test_back_pressure_hot_devices_and_reports(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await make_agent(cloud, model, tmp_path)
    hard = "Compare three-season and four-season tents and explain when each makes sense"
    assert (await agent.ask(hard)).from_cloud
    refused = await agent.ask(hard)  # the cloud's rate limit answers `rate_limited`
    assert refused.fallback_reason == "cloud.rate_limited" and not refused.from_cloud
    held = await agent.ask(hard)  # back-pressure: stays local without asking the cloud
    assert held.decision.reasons == ("cloud.backpressure",)
    agent.router.coverage = Coverage((("how long do I have to return a jacket", 0.9),))
    assert (
        await agent.ask("How long do I have to return a jacket?")
    ).decision.target is Target.LOCAL
    agent.set_device_state(thermal="critical")
    hot = agent.router.decide("How long do I have to return a jacket?", device_busy=agent._busy)
    assert hot.target is not Target.LOCAL or "coverage.match" not in hot.reasons
    report = agent.report()
    assert report.routes.cloud == 1 and report.routes.local_fallback >= 2
    assert report.reasons.get("cloud.backpressure") == 1
    await agent.send_report()
    async with asyncio.timeout(5):
        while agent.link is not None and agent.link.outbox is not None and len(agent.link.outbox):
            await asyncio.sleep(0.01)
    await agent.stop()


def test_an_intent_can_be_kept_on_the_device_by_its_privacy_class(model: LocalModel) -> None:
    agent = EdgeAgent(model, local_max_tokens=4)
    agent.intent("account", ["show my saved addresses"], privacy="local_only")
    decision = agent.router.decide("show my saved addresses")
    assert decision.target is Target.LOCAL_ONLY


@pytest.mark.cloud(backend=ScriptedBackend(recall))
async def test_a_conversation_goes_to_the_cloud_with_its_turns_redacted_alike(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await make_agent(cloud, model, tmp_path)
    conversation = agent.conversation(max_turns=2)
    hard = "Compare three-season and four-season tents and explain when each makes sense"
    first = await conversation.ask(f"My email is ann@example.com. {hard}")
    assert first.from_cloud and first.text == "no history"
    second = await conversation.ask(f"And for winter? {hard}")
    # The earlier turns went along, the email as the same placeholder in each, and the answer
    # came back with the value restored.
    [_, call] = cloud.backend.calls
    sent = [(t.role, t.content) for t in call.messages if t.role != "system"]
    assert sent[0] == ("user", f"My email is <EMAIL_1>. {hard}")
    assert sent[1] == ("assistant", "no history") and sent[2][0] == "user"
    assert "ann@example.com" not in str(call.messages)
    assert second.text == f"user=My email is ann@example.com. {hard} | assistant=no history"
    assert [t.role for t in conversation.turns] == ["user", "assistant"] * 2
    # Only the last `max_turns` exchanges go along.
    await conversation.ask(f"One more thing. {hard}")
    await conversation.ask(f"And the last. {hard}")
    assert len([t for t in cloud.backend.calls[-1].messages if t.role != "system"]) == 5
    conversation.clear()
    assert (await conversation.ask(hard)).text == "no history"
    await agent.stop()


@pytest.mark.cloud(backend=ScriptedBackend(recall))
async def test_a_national_id_earlier_in_the_conversation_keeps_it_on_the_device(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await make_agent(cloud, model, tmp_path)
    history = [
        Turn("user", "My SSN is 123-45-6789, keep it on file"),
        Turn("assistant", "Done."),
    ]
    hard = "Compare three-season and four-season tents and explain when each makes sense"
    reply = await agent.ask(hard, history=history)
    assert reply.decision.target is Target.LOCAL_ONLY and not reply.from_cloud
    assert "privacy.context" in reply.decision.reasons
    forced = await agent.ask(hard, history=history, override=Target.CLOUD)
    assert "app.override.refused" in forced.decision.reasons and not forced.from_cloud
    assert cloud.backend.calls == []
    for bad in (
        {"history": [Turn("user", "hi")] * 64},
        {"history": [("user", "hi")]},
        {"history": [Turn("system", "be terse")]},  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError):
            await agent.ask(hard, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="65536"):
        await agent.ask("x" * 65537)
    await agent.stop()


@pytest.mark.cloud(backend=ScriptedBackend(recall), limits={"max_message_bytes": 4096})
async def test_a_request_too_large_for_the_cloud_is_answered_on_the_device(
    cloud: Cloud, model: LocalModel, tmp_path: Path
) -> None:
    agent = await make_agent(cloud, model, tmp_path)
    assert agent.link is not None
    hard = "Compare three-season and four-season tents and explain when each makes sense"
    history = [Turn("user", "Tents. " * 700), Turn("assistant", "Noted.")]
    reply = await agent.ask(hard, history=history)
    # Not sent (the server would have closed the connection over it): answered here, and
    # the link stays up for the next request.
    assert reply.fallback_reason == "request.too_large" and reply.text.strip()
    assert agent.link.state is LinkState.UP
    assert (await agent.ask(hard)).from_cloud
    await agent.stop()


async def test_routing_reports_go_out_on_their_own_split_where_the_adapter_changed(
    model: LocalModel, tmp_path: Path
) -> None:
    from tests.edge_agent.test_apply import fetch, make_bundle

    outbox = Outbox(tmp_path / "device" / "outbox.db")
    # No cloud: reports wait in the outbox, as they do on a device that is offline.
    link = CloudLink("ws://127.0.0.1:9/v1", tmp_path / "device", enrollment_token="elt_none",
                     outbox=outbox, backoff_initial_s=5)  # fmt: skip
    agent = EdgeAgent(model, link=link, local_max_tokens=4, report_every_s=0.05)
    agent.intent("greet", ["hello", "hi"], handler=lambda text: "Hello!")
    updates = agent.enable_updates(tmp_path / "device")
    await agent.start()
    try:
        await agent.ask("hello")
        await agent.ask("hi")
        async with asyncio.timeout(5):  # the first report, on its own
            while not len(outbox):
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # periods with nothing counted are not reported
        assert len(outbox) == 1
        await agent.ask("hello")
        result = await updates.apply(*fetch(tmp_path, model, make_bundle(tmp_path, model, 1), None))
        assert result.status == "applied"
        await agent.ask("hello")  # a new period: this adapter's
        await agent.ask("Compare three-season and four-season tents in detail")
    finally:
        await agent.stop()  # sends what the last period counted
        model.activate(None)
    reports = [Report.model_validate(e.payload) for e in outbox.pending() if e.kind == "report"]
    assert all(r.routes.model_dump() != RouteCounts().model_dump() for r in reports)
    by_version: dict[int | None, Counter[str]] = {}
    for r in reports:
        by_version.setdefault(r.adapter_version, Counter()).update(r.routes.model_dump())
    assert {v: c.total() for v, c in by_version.items()} == {None: 3, 1: 2}
    assert by_version[None]["local"] == 3 and by_version[1]["cloud"] == 0
    assert sum(r.reasons.get("intent.greet", 0) for r in reports) == 4
    ends = [r.period_end for r in reports]
    assert ends == sorted(ends) and all(r.period_start <= r.period_end for r in reports)


def test_the_report_interval_must_be_positive(model: LocalModel) -> None:
    with pytest.raises(ValueError, match="report_every_s"):
        EdgeAgent(model, report_every_s=0)
    assert EdgeAgent(model, report_every_s=None).report_every_s is None
