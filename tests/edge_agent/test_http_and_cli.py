"""The local OpenAI-compatible endpoint (official client) and the `edgeloop edge` commands."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cloud_agent.backends import ScriptedBackend
from edge_agent import SMALL_TALK, SMALL_TALK_REPLIES
from edge_agent.agent import EdgeAgent
from edge_agent.cli import _agent, _intents
from edge_agent.config import EdgeConfig
from edge_agent.http import build_openai_app
from edge_agent.link import CloudLink
from edge_agent.local_model import DeviceProfile, LocalModel, RuntimeSettings
from edge_agent.outbox import Outbox
from edge_agent.router import Target
from shared.config import load_config
from shared.errors import ConfigError, InputFileError
from shared.net import is_loopback
from tests.cloud_fixtures import Cloud, recall
from tests.edge_fixtures import serving, serving_asgi, small_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def endpoint() -> AsyncIterator[str]:
    agent = EdgeAgent(small_model())
    agent.intent("greet", ["hello", "hi there"], handler=lambda text: "Hello! How can I help?")
    async with serving(agent) as url:
        yield url


async def test_the_official_client_gets_answers_and_the_route(endpoint: str) -> None:
    client = openai.AsyncOpenAI(base_url=endpoint, api_key="unused", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="edgeloop-edge", messages=[{"role": "user", "content": "hello"}]
    )
    assert raw.headers["x-edgeloop-route"] == "local"
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello! How can I help?"
    assert completion.model_extra is not None
    assert completion.model_extra["edgeloop"]["reasons"] == ["intent.greet"]
    models = await client.models.list()
    assert [m.id for m in models.data] == ["edgeloop-edge"]
    await client.close()


async def test_streaming_chunks_add_up_and_end_with_the_route(endpoint: str) -> None:
    client = openai.AsyncOpenAI(base_url=endpoint, api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model="edgeloop-edge",
        messages=[{"role": "user", "content": "Which socks keep feet dry?"}],
        stream=True,
    )
    pieces, last, ids = [], None, set()
    async for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        ids.add(chunk.id)
        last = chunk
    assert "".join(pieces).strip()
    assert last is not None and last.model_extra is not None
    assert last.model_extra["edgeloop"]["route"] == "local_fallback"  # no cloud configured
    # One id for every chunk: the request's, which feedback rates it by.
    assert ids == {f"chatcmpl-{last.model_extra['edgeloop']['request_id']}"}
    # Asked for, the usage comes last, in a chunk of its own, as OpenAI sends it.
    counted = await client.chat.completions.create(
        model="edgeloop-edge",
        messages=[{"role": "user", "content": "Which socks keep feet dry?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in counted]
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 10 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    await client.close()


async def test_with_an_api_key_the_endpoint_answers_only_requests_that_carry_it() -> None:
    agent = EdgeAgent(small_model())
    agent.intent("greet", ["hello", "hi there"], "Hello! How can I help?")
    key = "sk-kiosk-" + "7" * 24
    async with serving_asgi(build_openai_app(agent, api_key=key)) as root:
        keyed = openai.AsyncOpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0)
        answer = await keyed.chat.completions.create(
            model="edgeloop-edge", messages=[{"role": "user", "content": "hello"}]
        )
        assert answer.choices[0].message.content == "Hello! How can I help?"
        wrong = openai.AsyncOpenAI(base_url=f"{root}/v1", api_key=key[:-1], max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        await keyed.close()
        await wrong.close()
        async with httpx.AsyncClient(base_url=f"{root}/v1") as http:
            for method, path in (("GET", "/models"), ("POST", "/chat/completions"),
                                 ("POST", "/feedback")):  # fmt: skip
                response = await http.request(method, path, json={})
                assert response.status_code == 401, path
                assert response.json()["error"]["code"] == "invalid_api_key"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20")
    env = {"EDGELOOP_EDGE__API_KEY": "short"}  # a key one could guess is refused
    with pytest.raises(ConfigError, match="'api_key' \\(from EDGELOOP_EDGE__API_KEY\\)"):
        load_config(EdgeConfig, None, env=env, prefix="EDGELOOP_EDGE__")
    ok = load_config(
        EdgeConfig, None, env={"EDGELOOP_EDGE__API_KEY": key}, prefix="EDGELOOP_EDGE__"
    )
    assert ok.api_key == key


async def test_a_bad_request_gets_an_openai_style_error(endpoint: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{endpoint}/chat/completions", json={"messages": []})
    assert (
        response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    )


async def test_max_tokens_caps_the_answer_and_a_bad_value_is_a_400(endpoint: str) -> None:
    client = openai.AsyncOpenAI(base_url=endpoint, api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "Which socks keep feet dry on a long hike?"}]
    short = await client.chat.completions.create(
        model="edgeloop-edge",
        messages=ask,
        max_tokens=2,  # type: ignore[arg-type]
    )
    assert short.usage is not None and short.usage.completion_tokens == 2
    assert short.choices[0].finish_reason == "length", "cut at the limit, as OpenAI says it"
    cut = await client.chat.completions.create(
        model="edgeloop-edge", messages=ask, max_tokens=2, stream=True
    )
    assert [c.choices[0].finish_reason async for c in cut][-1] == "length"
    greeting = await client.chat.completions.create(
        model="edgeloop-edge", messages=[{"role": "user", "content": "hello"}], max_tokens=2
    )
    assert greeting.choices[0].finish_reason == "stop", "a fixed reply is whole"
    assert short.usage.prompt_tokens > 10, "the device's prompt, chat template included"
    for bad in (0, -5, "many", 10**9):
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"{endpoint}/chat/completions", json={"messages": ask, "max_tokens": bad}
            )
        assert response.status_code == 400 and "max_tokens" in response.json()["error"]["message"]
    await client.close()


async def test_stop_strings_end_the_answer_and_options_the_device_cannot_honour_are_a_400(
    endpoint: str,
) -> None:
    client = openai.AsyncOpenAI(base_url=endpoint, api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "Which socks keep feet dry on a long hike?"}]
    # Asked twice: llama.cpp keeps the last prompt and evaluates a repeated one from its last
    # token, and a one-token batch rounds differently from the whole prompt's, which on some
    # CPUs tips a near tie to another first word. From the second time on, each answer to
    # this prompt comes from the same cache state, so they compare exactly.
    for _ in range(2):
        whole = await client.chat.completions.create(
            model="edgeloop-edge",
            messages=ask,
            max_tokens=24,  # type: ignore[arg-type]
        )
    text = whole.choices[0].message.content
    assert text is not None and len(text.split()) > 3
    stop = text.split()[2]
    for form in (stop, ["zzz", stop]):  # one string, or a list, as OpenAI takes it
        cut = await client.chat.completions.create(
            model="edgeloop-edge",
            messages=ask,
            max_tokens=24,  # type: ignore[arg-type]
            stop=form,
        )
        assert cut.choices[0].message.content == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    streamed = await client.chat.completions.create(
        model="edgeloop-edge", messages=ask, max_tokens=24, stop=[stop], stream=True
    )
    chunks = [chunk async for chunk in streamed]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    plain = await client.chat.completions.create(
        model="edgeloop-edge", messages=ask, max_tokens=24, response_format={"type": "text"}
    )
    assert plain.choices[0].message.content == text
    await client.close()
    refused = (
        ({"stop": 5}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"n": 2}, "n must be 1"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    )
    async with httpx.AsyncClient() as http:
        for extra, says in refused:
            response = await http.post(
                f"{endpoint}/chat/completions", json={"messages": ask, **extra}
            )
            assert response.status_code == 400, extra
            assert says in response.json()["error"]["message"], extra


def counting(model: LocalModel) -> list[object]:
    """What `model` decodes, piece by piece, as it decodes it (whoever asked)."""
    decoded: list[object] = []
    steps = model._steps

    def spy(*args: Any, **kw: Any) -> Iterator[object]:
        for item in steps(*args, **kw):
            decoded.append(item)
            yield item

    model._steps = spy  # type: ignore[assignment,method-assign]
    return decoded


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_client_that_goes_away_frees_the_model_at_once() -> None:
    model = LocalModel(
        profile=DeviceProfile(cores=2, memory_mb=4096),
        settings=RuntimeSettings(threads=2, n_ctx=1024, max_tokens=8),
        stop_repetition=False,
    )
    decoded = counting(model)
    story = [{"role": "user", "content": "Write a long story about a hiking trip in the hills."}]
    async with serving(EdgeAgent(model)) as url, httpx.AsyncClient(timeout=60) as client:
        for stream in (False, True):
            decoded.clear()
            body = {"messages": story, "max_tokens": 400, "stream": stream}
            # The client gives up a few tokens into a long answer (an app's timeout, a
            # closed screen), before any response or in the middle of the stream.
            asking = asyncio.create_task(client.post(f"{url}/chat/completions", json=body))
            await until(lambda: len(decoded) >= 3)
            asking.cancel()
            await asyncio.gather(asking, return_exceptions=True)
            # The model is free again: no one waits behind an answer no one will read.
            await until(lambda: model._lock.acquire(blocking=False))
            model._lock.release()
            assert len(decoded) < 100, f"decoded {len(decoded)} tokens for no one"
        answered = await client.post(
            f"{url}/chat/completions", json={"messages": story, "max_tokens": 4}
        )
        assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] == 4


@pytest.mark.cloud(backend=ScriptedBackend(hang=True))
async def test_a_client_that_goes_away_cancels_the_cloud_request(
    cloud: Cloud, tmp_path: Path
) -> None:
    token = await cloud.service.store.create_enrollment_token()
    link = CloudLink(cloud.url, tmp_path / "dev", enrollment_token=token)
    model = small_model()
    decoded = counting(model)
    agent = EdgeAgent(model, link=link, deadline_ms=60_000)
    await agent.start()
    assert await link.wait_up(10)
    question = "Compare three-season and four-season tents and explain when each makes sense"
    async with serving(agent) as url, httpx.AsyncClient(timeout=60) as client:
        for n, stream in enumerate((False, True), start=1):
            body = {"messages": [{"role": "user", "content": question}], "stream": stream}
            asking = asyncio.create_task(client.post(f"{url}/chat/completions", json=body))
            await until(lambda n=n: cloud.backend.call_count == n)  # the request is in the cloud
            asking.cancel()
            await asyncio.gather(asking, return_exceptions=True)
            # Cancelled in the cloud long before its 60 s deadline, and not answered locally.
            await until(lambda n=n: cloud.backend.cancelled == n, timeout=20)
    assert decoded == []
    async with asyncio.timeout(10):  # the log is written just after
        while len(rows := await cloud.service.store.list_interactions()) < 2:
            await asyncio.sleep(0.05)
    assert [row.status for row in rows] == ["cancelled", "cancelled"]
    await agent.stop()


async def test_a_question_longer_than_the_context_is_a_400_not_a_crash(endpoint: str) -> None:
    client = openai.AsyncOpenAI(base_url=endpoint, api_key="unused", max_retries=0)
    long = [{"role": "user", "content": "Which tent? " + "tent " * 1500}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="edgeloop-edge",
                messages=long,
                stream=stream,  # type: ignore[arg-type]
            )
        assert info.value.code == "context_length_exceeded"
        assert "do not fit the context window of 1024" in info.value.message
    # The device still answers what fits.
    fine = await client.chat.completions.create(
        model="edgeloop-edge", messages=[{"role": "user", "content": "hello"}]
    )
    assert fine.choices[0].message.content
    await client.close()


@pytest.mark.cloud(backend=ScriptedBackend(recall))
async def test_the_endpoint_answers_with_the_conversation_so_far(
    cloud: Cloud, tmp_path: Path
) -> None:
    token = await cloud.service.store.create_enrollment_token()
    link = CloudLink(cloud.url, tmp_path / "dev", enrollment_token=token)
    settings = RuntimeSettings(threads=2, n_ctx=1024, max_tokens=8)
    model = LocalModel(profile=DeviceProfile(cores=2, memory_mb=4096), settings=settings)
    agent = EdgeAgent(model, link=link)
    await agent.start()
    assert await link.wait_up(10)
    hard = "Compare three-season and four-season tents and explain when each makes sense"
    call = "Call me at (212) 555-0187"
    app = httpx.ASGITransport(app=build_openai_app(agent))
    async with httpx.AsyncClient(transport=app, base_url="http://device/v1") as http:

        async def post(messages: list[dict[str, object]]) -> httpx.Response:
            return await http.post("/chat/completions", json={"messages": messages})

        response = await post(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": call}]},
                {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": hard},
            ]
        )
        assert response.status_code == 200 and response.headers["x-edgeloop-route"] == "cloud"
        answer = response.json()["choices"][0]["message"]["content"]
        assert answer == f"user={call} | assistant=Noted."
        [call] = cloud.backend.calls
        assert "555" not in str(call.messages) and "Be brief." not in str(call.messages)
        for messages, problem in (
            ([{"role": "tool", "content": "42"}, {"role": "user", "content": hard}], "'tool'"),
            ([{"role": "user", "content": hard}, {"role": "assistant", "content": "A"}], "last"),
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "text"),
            ([{"role": "user", "content": "hi"}] * 65, "63 earlier turns"),
        ):
            refused = await post(messages)
            assert refused.status_code == 400 and problem in refused.json()["error"]["message"]
    await agent.stop()
    model.close()


def edge_cli(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`edgeloop edge ARGS` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "edge", *args],
        input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


async def enrolled_from_the_shell(cloud: Cloud, tmp_path: Path) -> list[str]:
    """A device enrolled with `edgeloop edge enroll`; the options naming its cloud and state."""
    token = await cloud.service.store.create_enrollment_token()
    state = ["--cloud", cloud.url, "--state-dir", str(tmp_path / "dev")]
    enrolled = await asyncio.to_thread(edge_cli, ["enroll", *state, "--token", token])
    assert enrolled.returncode == 0, enrolled.stderr
    return state


@pytest.mark.cloud(backend=ScriptedBackend("Four-season tents take wind and snow."))
async def test_an_answer_is_rated_through_the_endpoint_and_the_rating_reaches_the_cloud(
    cloud: Cloud, tmp_path: Path
) -> None:
    token = await cloud.service.store.create_enrollment_token()
    outbox = Outbox(tmp_path / "dev" / "outbox.db")
    link = CloudLink(
        cloud.url, tmp_path / "dev", enrollment_token=token, outbox=outbox, backoff_initial_s=0.05
    )
    agent = EdgeAgent(small_model(), link=link)
    await agent.start()
    try:
        assert await link.wait_up(10)
        async with serving(agent) as url, httpx.AsyncClient(base_url=url) as client:
            question = "Compare three-season and four-season tents and explain when each fits"
            answer = await client.post(
                "/chat/completions", json={"messages": [{"role": "user", "content": question}]}
            )
            route = answer.json()["edgeloop"]
            assert route["from_cloud"], route
            rated = await client.post(
                "/feedback",
                json={"request_id": route["request_id"], "rating": "negative",
                      "correction": "Three-season for summer, four-season for winter."},
            )  # fmt: skip
            assert rated.status_code == 202 and rated.json() == {"queued": True}
            # The completion's id names the same request; a rating by it goes as well.
            assert answer.json()["id"] == f"chatcmpl-{route['request_id']}"
            again = await client.post(
                "/feedback", json={"request_id": answer.json()["id"], "rating": "positive"}
            )
            assert again.status_code == 202
            for bad, says in (
                ({"rating": "positive"}, "missing 'request_id'"),
                ({"request_id": route["request_id"], "rating": "meh"}, "rating must be"),
                ({"request_id": "no spaces allowed", "rating": "positive"}, "request_id"),
                ({"request_id": route["request_id"], "rating": "negative", "correction": 5},
                 "must be text"),
                ({"request_id": route["request_id"], "rating": "negative",
                  "correction": "x" * 70_000}, "correction"),
                ([route["request_id"]], "JSON object"),
            ):  # fmt: skip
                refused = await client.post("/feedback", json=bad)
                assert refused.status_code == 400, bad
                assert says in refused.json()["error"]["message"], refused.json()
        await link.wait_outbox_empty(10)
        summary = await cloud.service.store.feedback_summary()
        assert (summary.positive, summary.negative, summary.corrections) == (1, 1, 1)
    finally:
        await agent.stop()


async def test_feedback_needs_a_cloud_link(endpoint: str) -> None:
    async with httpx.AsyncClient(base_url=endpoint) as client:
        refused = await client.post("/feedback", json={"request_id": "req_1", "rating": "positive"})
    assert refused.status_code == 409 and "no cloud link" in refused.json()["error"]["message"]


async def test_enroll_then_chat_from_the_terminal(cloud: Cloud, tmp_path: Path) -> None:
    token = await cloud.service.store.create_enrollment_token()
    state = ["--cloud", cloud.url, "--state-dir", str(tmp_path / "dev")]
    before = json.loads((await asyncio.to_thread(edge_cli, ["status", *state])).stdout)
    assert (before["enrolled"], before["device_id"], before["adapter"]) == (False, None, None)
    assert not (tmp_path / "dev" / "outbox.db").exists(), "looking creates nothing"
    enrolled = await asyncio.to_thread(edge_cli, ["enroll", *state, "--token", token])
    assert enrolled.returncode == 0, enrolled.stderr
    assert "enrolled as dev_" in enrolled.stdout
    since = datetime.now(UTC)
    chat = await asyncio.to_thread(
        edge_cli,
        ["chat", *state],
        "Explain how to layer for ski touring versus resort skiing.\nThanks a lot!\n",
    )
    assert chat.returncode == 0, chat.stderr
    assert "[cloud; cloud: intent.unknown" in chat.stdout
    assert "[device; local: intent.thanks" in chat.stdout  # small talk, without an intents file
    assert SMALL_TALK_REPLIES["thanks"] in chat.stdout
    # The chat reported its routes before it ended; the cloud counts them.
    routing = await cloud.service.store.routing_summary(since)
    assert (routing.devices, routing.routes.cloud, routing.routes.total) == (1, 1, 2)
    status = await asyncio.to_thread(edge_cli, ["status", *state])
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    [device] = await cloud.service.store.list_devices()
    assert (shown["enrolled"], shown["device_id"]) == (True, device.id)
    assert shown["cloud_url"] == cloud.url
    assert shown["server_key"] == cloud.service.signing_key.verify_key().b64()
    assert shown["outbox"] == {"waiting": {}, "oldest_waiting_s": None, "dropped": {}}
    # Where it enrolled is kept with its identity: that is its cloud when none is named.
    alone = await asyncio.to_thread(edge_cli, ["status", "--state-dir", str(tmp_path / "dev")])
    assert json.loads(alone.stdout)["cloud_url"] == cloud.url
    elsewhere = await asyncio.to_thread(
        edge_cli, ["status", *state[2:], "--cloud", "ws://127.0.0.1:1/v1"]
    )
    assert json.loads(elsewhere.stdout)["cloud_url"] == "ws://127.0.0.1:1/v1"
    (tmp_path / "dev" / "identity.json").write_text("{")  # damaged: said so, not read as new
    damaged = await asyncio.to_thread(edge_cli, ["status", *state])
    assert damaged.returncode != 0 and "identity.json is damaged" in damaged.stderr


@pytest.mark.cloud(backend=ScriptedBackend("Four-season tents take wind and snow."))
async def test_edge_serve_answers_is_rated_and_reports_its_routes_when_it_stops(
    cloud: Cloud, tmp_path: Path
) -> None:
    state = await enrolled_from_the_shell(cloud, tmp_path)
    since = datetime.now(UTC)
    serving = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.cli", "edge", "serve", *state, "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        assert serving.stdout is not None
        line = (await asyncio.wait_for(serving.stdout.readline(), 120)).decode()
        assert line.startswith("edgeloop edge endpoint: http://127.0.0.1:"), line
        async with httpx.AsyncClient(base_url=line.split()[-1], timeout=60) as client:
            question = "Compare three-season and four-season tents and explain when each fits"
            answer = await client.post(
                "/chat/completions", json={"messages": [{"role": "user", "content": question}]}
            )
            assert answer.json()["edgeloop"]["from_cloud"], answer.json()
            rated = await client.post(
                "/feedback", json={"request_id": answer.json()["id"], "rating": "negative"}
            )
            assert rated.status_code == 202
    finally:
        serving.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(serving.communicate(), 60)
    assert serving.returncode == 0, err.decode()
    # Before it ended, the endpoint sent the rating and its routing report.
    assert (await cloud.service.store.feedback_summary()).negative == 1
    routing = await cloud.service.store.routing_summary(since)
    assert (routing.routes.cloud, routing.routes.total) == (1, 1)


async def test_enroll_says_why_it_failed(cloud: Cloud, tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path / "dev")]
    token = ["--token", "elt_" + "0" * 32]  # well formed, never issued
    cases = [
        (["--cloud", cloud.url, *token], "the cloud refused the token"),
        (
            ["--cloud", "ws://127.0.0.1:9/v1", *token],
            "cannot reach the cloud at ws://127.0.0.1:9/v1",
        ),
        (["--cloud", cloud.url.replace("ws://", "http://"), *token], "expected ws:// or wss://"),
        (["--cloud", cloud.url, "--token", "short"], "enrollment token"),
    ]
    for args, reason in cases:
        done = await asyncio.to_thread(edge_cli, ["enroll", *state, *args])
        assert done.returncode == 1 and reason in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


async def test_chat_rates_the_last_answer(cloud: Cloud, tmp_path: Path) -> None:
    await enrolled_from_the_shell(cloud, tmp_path)
    lines = ["/good", "Which tent for a windy ridge?", "/good", "/bad Ask for the Ridge 2."]
    script = "\n".join([*lines, "/shout", "/help", ""])
    # No --cloud: the device connects to the cloud it enrolled with.
    chat = await asyncio.to_thread(edge_cli, ["chat", "--state-dir", str(tmp_path / "dev")], script)
    assert chat.returncode == 0, chat.stderr
    assert "no cloud" not in chat.stderr
    out = chat.stdout
    assert "nothing to rate yet" in out  # /good before any answer
    assert "positive feedback queued" in out
    assert "negative feedback with a correction queued" in out
    assert "unknown command /shout" in out and "/bad [correction]" in out
    assert "kept in the outbox" not in out  # acknowledged before the chat ended
    summary = await cloud.service.store.feedback_summary()
    assert (summary.positive, summary.negative, summary.corrections) == (1, 1, 1)


def test_chat_without_a_cloud_says_everything_stays_on_the_device(tmp_path: Path) -> None:
    chat = edge_cli(["chat", "--state-dir", str(tmp_path / "dev")], "/help\n")
    assert chat.returncode == 0, chat.stderr
    assert "no cloud: none configured (--cloud) and none enrolled with" in chat.stderr
    # Enrolled by an edgeloop that did not keep the cloud's URL with the identity.
    (tmp_path / "dev" / "identity.json").write_text('{"device_id": "dev_1", "server_key": "k"}')
    chat = edge_cli(["chat", "--state-dir", str(tmp_path / "dev")], "/help\n")
    assert "does not say where it enrolled: name it with --cloud" in chat.stderr


async def test_chat_answers_with_the_conversation_until_a_new_one_starts(
    cloud: Cloud, tmp_path: Path
) -> None:
    state = await enrolled_from_the_shell(cloud, tmp_path)
    hard = "compare three-season and four-season tents and explain when each makes sense"
    lines = [f"First, {hard}", f"Then, {hard}", "/new", f"Again, {hard}", ""]
    chat = await asyncio.to_thread(edge_cli, ["chat", *state], "\n".join(lines))
    assert chat.returncode == 0, chat.stderr
    assert "[new conversation]" in chat.stdout and chat.stdout.count("[cloud;") == 3
    rows = sorted(await cloud.service.store.list_interactions(), key=lambda r: r.id)
    assert [len([m for m in r.messages if m["role"] != "system"]) for r in rows] == [1, 3, 1]


async def test_an_intents_file_gives_the_device_its_replies_and_privacy(tmp_path: Path) -> None:
    intents = tmp_path / "intents.json"
    intents.write_text(json.dumps({
        "hours": {"examples": ["when do you open", "opening hours"], "reply": "We open at 9."},
        "account": {"examples": ["show my saved addresses"], "privacy": "local_only"},
        "cart_show": ["show my cart", "what's in my basket"],
    }))  # fmt: skip
    agent = _agent(EdgeConfig(state_dir=tmp_path / "dev"), _intents(intents))
    hours = await agent.ask("When do you open?")
    assert (hours.text, hours.decision.intent) == ("We open at 9.", "hours")
    account = await agent.ask("show my saved addresses", max_tokens=4)
    assert account.decision.target is Target.LOCAL_ONLY
    cart = await agent.ask("show my cart", max_tokens=4)
    assert cart.decision.intent == "cart_show" and cart.tokens > 0  # no reply: the model's


async def test_without_an_intents_file_the_device_replies_to_small_talk(tmp_path: Path) -> None:
    agent = _agent(EdgeConfig(state_dir=tmp_path / "dev"), _intents(None))
    assert set(SMALL_TALK_REPLIES) == set(SMALL_TALK)
    for text, intent in (
        ("hello", "greet"),
        ("thanks a lot", "thanks"),
        ("who are you", "about_assistant"),
    ):
        reply = await agent.ask(text)
        assert (reply.decision.intent, reply.text) == (intent, SMALL_TALK_REPLIES[intent])


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ([["hello"]], "expected an object of intent names"),
        ({"greet": "hello"}, "intent 'greet': expected a list of examples or an object"),
        ({"greet": {"examples": ["hi"], "answer": "Hi!"}}, "intent 'greet': expected"),
        ({"greet": []}, "intent 'greet': examples must be a non-empty list of texts"),
        ({"greet": {"reply": "Hi!"}}, "intent 'greet': examples must be"),
        ({"greet": {"examples": ["hi", 3]}}, "intent 'greet': examples must be"),
        ({"greet": {"examples": ["hi"], "reply": ""}}, "intent 'greet': reply must be a text"),
        ({"greet": {"examples": ["hi"], "privacy": "secret"}}, "privacy is 'normal' or"),
    ],
)
def test_a_bad_intents_file_is_refused_naming_the_intent(
    tmp_path: Path, table: object, says: str
) -> None:
    intents = tmp_path / "intents.json"
    intents.write_text(json.dumps(table))
    with pytest.raises(InputFileError, match=says):
        _intents(intents)
