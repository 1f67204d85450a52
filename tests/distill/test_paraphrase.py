"""Paraphrases as offline work: new wordings of observed questions, paired with the same answer."""

from __future__ import annotations

from cloud_agent.backends import ScriptedBackend
from cloud_agent.backends.base import ChatRequest
from cloud_agent.distill.dataset import Example
from cloud_agent.distill.paraphrase import acceptable, paraphrase
from cloud_agent.scheduler import Scheduler

REWRITES = {
    "Is shipping free?": ["Do you charge for shipping?", "Shipping free?"],
    "How long is the warranty on tents?": [
        "The warranty is 2 years.",  # an answer, not a question
        "What warranty comes with a tent?",
    ],
    "When does the hotline open?": ["Call me on +1 415 555 0134, when does the hotline open?"],
}


def scripted() -> ScriptedBackend:
    calls: dict[str, int] = {}

    def answer(request: ChatRequest) -> str:
        question = request.messages[-1].content.removeprefix("Rephrase: ")
        n = calls.get(question, 0)
        calls[question] = n + 1
        options = REWRITES[question]
        return options[n % len(options)]

    return ScriptedBackend(answer)


async def test_paraphrases_keep_the_trusted_answer_and_pass_the_filters() -> None:
    examples = [Example(q, f"answer to {q}", fact_ids=("f",)) for q in REWRITES]
    out = await paraphrase(examples, backend=scripted(), scheduler=Scheduler(2), per_question=1)
    pairs = {(e.question, e.answer, e.source) for e in out}
    assert pairs == {
        ("Do you charge for shipping?", "answer to Is shipping free?", "paraphrase"),
        ("What warranty comes with a tent?",
         "answer to How long is the warranty on tents?", "paraphrase"),
    }  # fmt: skip


def test_the_filter() -> None:
    assert acceptable("Is shipping free?", "Do you charge for shipping?")
    assert not acceptable("Is shipping free?", "is shipping free?")  # a copy
    assert not acceptable("Is shipping free?", "Shipping is free over $75.")  # not a question
    assert not acceptable("Is shipping free?", "What is the weather like?")  # another topic
    assert not acceptable("When is the hotline open?", "Call 4111 1111 1111 1111, hotline?")
