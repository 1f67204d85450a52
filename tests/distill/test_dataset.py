"""The distillation dataset from a real store: feedback decides, PII refuses, splits are stable."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cloud_agent.distill.dataset import (
    Example,
    PrivateDataError,
    build_dataset,
    expectations_from_workload,
    split,
)
from cloud_agent.distill.pipeline import DistillConfig
from cloud_agent.distill.train import DistillSettingsError, LoraSettings
from cloud_agent.store import NewInteraction, Store
from cloud_agent.store.store import sqlite_url


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(sqlite_url(tmp_path / "cloud.db"))
    token = await opened.create_enrollment_token()
    await opened.enroll_device(token, "dev_a", "A" * 43)
    yield opened
    await opened.close()


async def ask(
    store: Store, rid: str, question: str, answer: str | None, *, facts: tuple[str, ...] = ("f",),
    status: str = "ok",
) -> None:  # fmt: skip
    await store.record_interaction(
        NewInteraction(
            device_id="dev_a", request_id=rid, messages=[{"role": "user", "content": question}],
            placeholders=[], status=status, answer=answer, fact_ids=list(facts),
            backend="knowledge" if facts else "llama_cpp",
        )
    )  # fmt: skip


async def test_feedback_decides_what_is_kept(store: Store) -> None:
    await ask(store, "r1", "How long do returns take?", "45 days.")
    await ask(store, "r2", "Is shipping free?", "Always free.")  # wrong: rated down
    await ask(store, "r3", "When is the hotline open?", "Noon.")  # corrected
    await ask(store, "r4", "Tell me a story", "Once upon a time", facts=())  # unrated LLM text
    await ask(store, "r6", "Any tips for rain?", "Layer up.", facts=())  # LLM text, rated up
    await store.add_feedback("dev_a", "k6", "r6", "positive")
    await ask(store, "r5", "Broken request", None, status="error")
    await store.add_feedback("dev_a", "k2", "r2", "negative")
    await store.add_feedback("dev_a", "k3", "r3", "negative", "From 7:30 to 21:00.")
    dataset = await build_dataset(store, heldout_share=0.0)
    answers = {e.question: (e.answer, e.source) for e in dataset.train}
    assert answers == {
        "How long do returns take?": ("45 days.", "answer"),
        "When is the hotline open?": ("From 7:30 to 21:00.", "correction"),
        "Any tips for rain?": ("Layer up.", "answer"),
    }
    assert dataset.dropped["negative"] == 1
    assert dataset.dropped["untrusted"] == 1
    assert dataset.dropped["no_answer"] == 1


async def test_a_question_asked_after_earlier_turns_is_left_out(store: Store) -> None:
    await ask(store, "r1", "When do you open?", "From 9:00.")
    await store.record_interaction(
        NewInteraction(
            device_id="dev_a", request_id="r2", placeholders=[], status="ok",
            messages=[
                {"role": "user", "content": "When do you open?"},
                {"role": "assistant", "content": "From 9:00."},
                {"role": "user", "content": "And on Sundays?"},
            ],
            answer="From 10:00.", fact_ids=["f"], backend="knowledge",
        )
    )  # fmt: skip
    await store.add_feedback("dev_a", "k2", "r2", "positive")
    dataset = await build_dataset(store, heldout_share=0.0)
    assert [e.question for e in dataset.train] == ["When do you open?"]
    assert dataset.dropped["follow_up"] == 1


async def test_duplicates_keep_the_best_judged_answer(store: Store) -> None:
    await ask(store, "r1", "Is shipping free?", "Over $75.")
    await ask(store, "r2", "is shipping  free", "Sometimes.")
    await ask(store, "r3", "IS SHIPPING FREE?", "Over $75, else $6.95.")
    await store.add_feedback("dev_a", "k1", "r1", "positive")
    dataset = await build_dataset(store, heldout_share=0.0)
    assert [e.answer for e in dataset.train] == ["Over $75."]
    assert dataset.dropped["duplicate"] == 2


async def test_raw_personal_data_refuses_the_whole_dataset(store: Store) -> None:
    await ask(store, "r1", "How long do returns take?", "45 days.")
    await ask(store, "r2", "Call me back", "We will call 4111 1111 1111 1111 soon.")
    with pytest.raises(PrivateDataError) as caught:
        await build_dataset(store)
    assert "r2" in str(caught.value) and "4111" not in str(caught.value)


async def test_placeholders_are_fine(store: Store) -> None:
    await ask(store, "r1", "Text <PHONE_1> my order status", "We will text <PHONE_1>.")
    dataset = await build_dataset(store, heldout_share=0.0)
    assert len(dataset.train) == 1


def test_the_split_is_stable_and_by_question() -> None:
    examples = [Example(f"question number {i}?", f"answer {i}") for i in range(200)]
    train, heldout = split(examples, heldout_share=0.25, seed=3)
    assert 30 <= len(heldout) <= 70 and len(train) + len(heldout) == 200
    again_train, again_heldout = split(list(reversed(examples)), heldout_share=0.25, seed=3)
    assert {e.question for e in again_heldout} == {e.question for e in heldout}
    more = [*examples, Example("a new question?", "new")]
    _, heldout_more = split(more, heldout_share=0.25, seed=3)
    assert {e.question for e in heldout} <= {e.question for e in heldout_more}


def test_expectations_come_from_a_labelled_workload(workload_path: Path) -> None:
    table = expectations_from_workload(workload_path)
    assert table["what are the phone support hours"] == (("7:30", "7.30", "7:30am", "7:30 am"),)
    assert len(table) >= 80


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"rank": 0}, "rank 0"),
        ({"steps": 0}, "steps 0"),
        ({"alpha": 0.0}, "alpha"),
        ({"learning_rate": -1e-3}, "learning rate"),
        ({"batch_size": 0}, "batch size"),
        ({"target_modules": ()}, "at least one"),
        ({"target_modules": ("q_proj", "attn")}, "['attn']"),
    ],
)
def test_lora_settings_out_of_range_are_refused_before_anything_loads(
    settings: dict[str, Any], problem: str
) -> None:
    with pytest.raises(DistillSettingsError, match=re.escape(problem)):
        LoraSettings(**settings)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"heldout_share": 1.0}, "heldout_share"),
        ({"min_gain": 2.0}, "min_gain"),
        ({"canary_share": 0.0}, "canary_share"),
        ({"min_examples": 0}, "min_examples"),
    ],
)
def test_distill_settings_out_of_range_are_refused(settings: dict[str, Any], problem: str) -> None:
    with pytest.raises(DistillSettingsError, match=problem):
        DistillConfig(**settings)
    assert DistillConfig().lora == LoraSettings()
