"""`OpenAICompatibleBackend` over real sockets: against a real OpenAI-compatible server (the edge
agent's local endpoint, answering with the packaged model), against servers that refuse, hang or
break off, and behind the cloud service configured with several servers, one of them down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud_agent.backends import ChatRequest, ChatTurn, Completion
from cloud_agent.backends.openai import OpenAICompatibleBackend, api_root
from cloud_agent.errors import BackendTimeout, BackendUnavailable
from cloud_agent.service import CloudService
from edge_agent.agent import EdgeAgent
from examples.handshake import Device
from protocol import (
    DeltaReceived,
    EnrollmentCredentials,
    Escalate,
    ResultReceived,
    Welcomed,
)
from protocol.parts import ChatMessage
from shared import SigningKey
from tests.cloud_fixtures import make_config
from tests.edge_fixtures import free_port, serving, small_model

pytestmark = pytest.mark.slow

QUESTION = ChatRequest(messages=(ChatTurn("user", "Name one colour of the sky."),), max_tokens=8)


@pytest.fixture
async def edge_endpoint() -> AsyncIterator[str]:
    """A real OpenAI-compatible server: an edge agent without a cloud, answering with the
    packaged model; its URL as OpenAI's clients take it (`.../v1`)."""
    async with serving(EdgeAgent(small_model())) as url:
        yield url


def test_the_api_root_is_the_same_with_or_without_the_version() -> None:
    assert api_root("http://h:8000") == "http://h:8000/v1"
    assert api_root("http://h:8000/v1/") == "http://h:8000/v1"
    assert api_root("https://h/openai/v1") == "https://h/openai/v1"


@pytest.mark.parametrize("form", ["with /v1", "without"])
async def test_the_backend_gets_answers_from_a_real_server(edge_endpoint: str, form: str) -> None:
    url = edge_endpoint if form == "with /v1" else edge_endpoint.removesuffix("/v1")
    llm = OpenAICompatibleBackend(url, "edgeloop-edge")
    try:
        whole = await llm.complete(QUESTION)
        assert whole.text.strip() and whole.model == "edgeloop-edge"
        assert whole.prompt_tokens > 0 and 0 < whole.completion_tokens <= 8
        pieces = [item async for item in llm.stream(QUESTION)]
    finally:
        await llm.aclose()
    *text, last = pieces
    assert isinstance(last, Completion) and all(isinstance(p, str) for p in text)
    assert "".join(str(p) for p in text) == last.text == whole.text, "greedy: the same answer"
    assert last.completion_tokens == whole.completion_tokens and last.prompt_tokens > 0


@contextlib.asynccontextmanager
async def raw_server(reply: bytes | None) -> AsyncIterator[str]:
    """A TCP server that reads a request and writes `reply` then closes the connection, or
    (`None`) never answers; its URL."""

    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        if reply is not None:
            writer.write(reply)
            await writer.drain()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def test_a_refused_connection_is_backend_unavailable_after_the_retries() -> None:
    llm = OpenAICompatibleBackend(f"http://127.0.0.1:{free_port()}/v1", "m", attempts=2)
    with pytest.raises(BackendUnavailable, match="unreachable"):
        await llm.complete(QUESTION)
    await llm.aclose()


async def test_a_server_that_never_answers_is_a_backend_timeout() -> None:
    async with raw_server(None) as url:
        llm = OpenAICompatibleBackend(url, "m", timeout_s=0.3, attempts=1)
        with pytest.raises(BackendTimeout):
            await llm.complete(QUESTION)
        await llm.aclose()


async def test_a_stream_broken_off_after_text_ends_in_an_error_that_is_not_retried() -> None:
    chunk = b'data: {"model": "m", "choices": [{"delta": {"content": "Blue"}}]}\n\n'
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    # One whole chunk of the body, then the connection closes without the last chunk.
    async with raw_server(head + b"%x\r\n" % len(chunk) + chunk + b"\r\n") as url:
        llm = OpenAICompatibleBackend(url, "m", attempts=3)
        pieces: list[object] = []
        with pytest.raises(BackendUnavailable) as caught:
            async for item in llm.stream(QUESTION):
                pieces.append(item)
        await llm.aclose()
    assert pieces == ["Blue"], "the text before the break went out, once"
    assert not caught.value.retryable, "retrying would send 'Blue' twice"


async def test_the_service_answers_through_several_servers_one_of_them_down(
    tmp_path: Path, edge_endpoint: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = make_config(
        tmp_path,
        None,
        backend={"kind": "openai", "base_url": f"{dead},{edge_endpoint}", "model": "edgeloop-edge"},
    )
    service = await CloudService.create(config)
    await service.start()
    try:
        token = await service.store.create_enrollment_token()
        device = await Device.connect(
            f"ws://127.0.0.1:{service.port}/v1", EnrollmentCredentials(token, SigningKey.generate())
        )
        assert isinstance(await device.next_event(Welcomed), Welcomed)
        for n in range(2):
            await device.send(
                Escalate(
                    request_id=f"req_{n}",
                    messages=[ChatMessage(role="user", content="Name one colour of the sky.")],
                    deadline_ms=30_000,
                    max_tokens=8,
                    stream=True,
                )
            )
            pieces = []
            while isinstance(event := await device.next_event(DeltaReceived, ResultReceived),
                             DeltaReceived):  # fmt: skip
                pieces.append(event.delta.text)
            assert isinstance(event, ResultReceived), event
            assert event.result.text.strip() and "".join(pieces) == event.result.text
            assert event.result.model == "edgeloop-edge"
        await device.close()
        await service.server.recorder.flush()
        live = edge_endpoint.removeprefix("http://").removesuffix("/v1")
        assert {r.backend for r in await service.store.list_interactions()} == {
            f"openai:edgeloop-edge@{live}"
        }, "answered by the live server, the dead one passed over"
        members = {m["name"]: m for m in service.backend_health()}
        assert set(members) == {
            f"openai:edgeloop-edge@{live}",
            f"openai:edgeloop-edge@{dead[7:-3]}",
        }
    finally:
        await service.stop()
