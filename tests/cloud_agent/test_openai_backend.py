"""OpenAICompatibleBackend against scripted HTTP transports (httpx.MockTransport)."""

from __future__ import annotations

import json

import httpx
import pytest

from cloud_agent.backends import ChatRequest, ChatTurn, Completion
from cloud_agent.backends.openai import OpenAICompatibleBackend
from cloud_agent.errors import BackendResponseError, BackendTimeout, BackendUnavailable

REQUEST = ChatRequest(messages=(ChatTurn("user", "Hello"),), max_tokens=8)


def backend(handler: httpx.MockTransport, **kw: object) -> OpenAICompatibleBackend:
    return OpenAICompatibleBackend(
        "http://llm.test",
        "tiny",
        api_key="sk-test",
        transport=handler,
        **kw,  # type: ignore[arg-type]
    )


def completion_body(text: str = "Hi there") -> dict[str, object]:
    return {
        "model": "tiny-1",
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2},
    }


async def test_complete_sends_the_chat_and_reads_the_completion() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion_body())

    llm = backend(httpx.MockTransport(handle))
    result = await llm.complete(REQUEST)
    assert result == Completion("Hi there", "stop", 5, 2, "tiny-1")
    body = json.loads(seen[0].content)
    assert seen[0].url.path == "/v1/chat/completions"
    assert seen[0].headers["authorization"] == "Bearer sk-test"
    assert body["messages"] == [{"role": "user", "content": "Hello"}] and body["stream"] is False
    await llm.aclose()


async def test_stream_yields_pieces_then_one_completion_with_usage() -> None:
    chunks = [
        {"model": "tiny-1", "choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]},
        {
            "model": "tiny-1",
            "choices": [{"delta": {"content": " there"}, "finish_reason": "length"}],
        },
        {"model": "tiny-1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    ]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def handle(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    llm = backend(httpx.MockTransport(handle))
    items = [item async for item in llm.stream(REQUEST)]
    assert items[:2] == ["Hi", " there"]
    assert items[2] == Completion("Hi there", "length", 5, 2, "tiny-1")
    await llm.aclose()


async def test_server_errors_are_retried_then_succeed() -> None:
    calls = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503) if calls < 3 else httpx.Response(200, json=completion_body())

    llm = backend(httpx.MockTransport(handle), attempts=3)
    assert (await llm.complete(REQUEST)).text == "Hi there"
    assert calls == 3


async def test_connection_errors_become_backend_unavailable_after_the_retries() -> None:
    calls = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=request)

    llm = backend(httpx.MockTransport(handle), attempts=2)
    with pytest.raises(BackendUnavailable):
        await llm.complete(REQUEST)
    assert calls == 2


async def test_timeouts_map_to_backend_timeout() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(BackendTimeout) as info:
        await backend(httpx.MockTransport(handle), attempts=1).complete(REQUEST)
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"choices": []}),
        httpx.Response(401, json={"error": "bad key"}),
    ],
)
async def test_garbage_and_client_errors_are_not_retried(response: httpx.Response) -> None:
    calls = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return response

    with pytest.raises(BackendResponseError):
        await backend(httpx.MockTransport(handle), attempts=3).complete(REQUEST)
    assert calls == 1


async def test_a_stream_that_breaks_after_text_is_not_retried() -> None:
    calls = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        body = 'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: {broken\n\n'
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    llm = backend(httpx.MockTransport(handle), attempts=3)
    got: list[object] = []
    with pytest.raises(BackendResponseError):
        async for item in llm.stream(REQUEST):
            got.append(item)
    assert got == ["Hi"] and calls == 1
