"""LocalModel on the packaged SmolLM2 model: profiles, generation, confidence, LoRA hot-swap."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from edge_agent.local_model import (
    AdapterError,
    ContextTooLong,
    DeviceProfile,
    Generation,
    LocalModel,
    LocalModelError,
    RuntimeSettings,
    choose_settings,
)
from tests.edge_agent.lora import write_random_lora
from tests.loops import LOOPING, most_repeated

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Name one thing to pack for a hike."}]


@pytest.fixture(scope="module")
def model() -> LocalModel:
    return LocalModel(profile=DeviceProfile(cores=2, memory_mb=4096))


def test_settings_follow_the_device_profile() -> None:
    kiosk = choose_settings(DeviceProfile(cores=4, memory_mb=8192))
    phone_hot = choose_settings(DeviceProfile(cores=8, memory_mb=2048, thermal="serious"))
    phone_low = choose_settings(DeviceProfile(cores=8, memory_mb=900, battery_pct=10))
    assert (kiosk.threads, kiosk.n_ctx, kiosk.max_tokens) == (4, 2048, 256)
    assert (phone_hot.threads, phone_hot.n_ctx, phone_hot.max_tokens) == (4, 1024, 96)
    assert (phone_low.threads, phone_low.n_ctx) == (4, 512)
    charging = choose_settings(DeviceProfile(cores=8, memory_mb=900, battery_pct=10, charging=True))
    assert charging.threads == 8


async def test_generation_uses_the_chat_template_and_reports_confidence(model: LocalModel) -> None:
    result = await model.generate(ASK, max_tokens=24)
    assert result.text.strip() and "<|im_end|>" not in result.text
    assert 0.0 < result.confidence <= 1.0
    assert result.completion_tokens <= 24 and result.prompt_tokens > 10


async def test_streamed_pieces_add_up_to_the_greedy_answer(model: LocalModel) -> None:
    whole = await model.generate(ASK, max_tokens=24)
    items = [item async for item in model.stream(ASK, max_tokens=24)]
    final = items[-1]
    assert isinstance(final, Generation)
    assert "".join(i for i in items[:-1] if isinstance(i, str)) == final.text == whole.text


async def test_an_answer_going_round_in_circles_is_stopped(model: LocalModel) -> None:
    model.stop_repetition = False
    try:
        full = await model.generate(LOOPING, max_tokens=96)
    finally:
        model.stop_repetition = True
    assert full.finish_reason == "length" and most_repeated(full.text) > 3, "no loop to stop"
    cut = await model.generate(LOOPING, max_tokens=96)
    assert cut.finish_reason == "stop" and cut.completion_tokens < full.completion_tokens
    assert full.text.startswith(cut.text) and most_repeated(cut.text) == 3


async def test_adapters_switch_without_reloading_and_removal_restores_the_base(
    model: LocalModel, tmp_path: Path
) -> None:
    base = await model.generate(ASK, max_tokens=16)
    adapter = model.load_adapter(write_random_lora(tmp_path / "a.gguf"))
    model.activate(adapter)
    tuned = await model.generate(ASK, max_tokens=16)
    assert tuned.text != base.text, "the adapter changes what the model says"
    model.activate(None)
    assert (await model.generate(ASK, max_tokens=16)).text == base.text
    model.activate(adapter)
    assert (await model.generate(ASK, max_tokens=16)).text == tuned.text
    model.unload(adapter)
    assert model.active_adapter is None
    assert (await model.generate(ASK, max_tokens=16)).text == base.text


async def test_a_corrupt_or_mismatched_adapter_leaves_the_previous_one_active(
    model: LocalModel, tmp_path: Path
) -> None:
    good = model.load_adapter(write_random_lora(tmp_path / "good.gguf", seed=1))
    model.activate(good)
    with_good = await model.generate(ASK, max_tokens=16)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes((tmp_path / "good.gguf").read_bytes()[:5000])
    with pytest.raises(AdapterError):
        model.load_adapter(corrupt)
    with pytest.raises(AdapterError):
        model.load_adapter(write_random_lora(tmp_path / "wrong.gguf", out_dim=100))
    with pytest.raises(AdapterError, match="does not exist"):
        model.load_adapter(tmp_path / "absent.gguf")
    assert model.active_adapter is good
    assert (await model.generate(ASK, max_tokens=16)).text == with_good.text
    model.unload(good)


def test_a_missing_model_file_is_a_local_model_error(tmp_path: Path) -> None:
    with pytest.raises(LocalModelError, match="does not exist"):
        LocalModel(tmp_path / "absent.gguf", profile=DeviceProfile(cores=1, memory_mb=512))


async def test_a_conversation_too_long_for_the_context_loses_its_oldest_turns_first() -> None:
    small = LocalModel(
        profile=DeviceProfile(cores=2, memory_mb=4096),
        settings=RuntimeSettings(threads=2, n_ctx=256, max_tokens=8),
    )
    try:
        old = [
            {"role": "user", "content": "Tell me about tents. " * 30},
            {"role": "assistant", "content": "Tents keep you dry."},
        ]
        recent = [
            {"role": "user", "content": "And sleeping bags? " * 20},
            {"role": "assistant", "content": "They keep you warm."},
        ]
        system = [{"role": "system", "content": "You are a shop assistant."}]
        question = [{"role": "user", "content": "Which one first?"}]
        whole = [*system, *old, *recent, *question]
        with pytest.raises(ContextTooLong):
            await small.generate(whole, max_tokens=8)
        items = [item async for item in small.stream(whole, 8, trim_history=True)]
        result = items[-1]
        assert isinstance(result, Generation) and result.completion_tokens > 0
        kept, _ = small._template.tokens([*system, *recent, *question])
        assert result.prompt_tokens == len(kept), "the oldest exchange went, the rest stayed"
        with pytest.raises(ContextTooLong):
            alone = [*system, {"role": "user", "content": "Tents? " * 200}]
            await anext(aiter(small.stream(alone, 8, trim_history=True)))
    finally:
        small.close()


async def test_answers_waiting_for_the_model_leave_the_default_executor_free(
    model: LocalModel,
) -> None:
    # A small default executor, as on a 2-core device: if answers waiting for the one model
    # held its threads, the outbox and feedback writes (`asyncio.to_thread`) would wait too.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    started: list[int] = []
    steps = model._steps

    def spy(*args: Any, **kw: Any) -> Iterator[object]:
        started.append(1)
        yield from steps(*args, **kw)

    model._steps = spy  # type: ignore[method-assign]
    order: list[str] = []

    async def answer(n: int) -> None:
        await model.generate([{"role": "user", "content": f"Name {n} things to pack."}], 24)
        order.append("answer")

    answers = [asyncio.create_task(answer(n)) for n in range(4)]
    dropped = asyncio.create_task(answer(9))
    await asyncio.sleep(0)  # all five are waiting for the model, or decoding
    await asyncio.to_thread(order.append, "write")
    dropped.cancel()  # given up while still waiting for its turn
    await asyncio.gather(*answers)
    assert order.index("write") <= 1, order
    await asyncio.gather(dropped, return_exceptions=True)
    assert dropped.cancelled()
    assert len(started) == 4, "the request given up on never reached the model"
    del model._steps  # the instance attribute; the class's method again
