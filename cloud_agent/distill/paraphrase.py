"""More training data as offline work: paraphrases of the questions users actually asked.

Each observed question is rewritten by the cloud's LLM backend in the scheduler's offline lane
(so live traffic goes first), and the paraphrase is paired with the *same* trusted answer: the
answer came from the grounded fact, not from the paraphrasing model, so a weak model can only
produce a poor question, never a wrong answer. Candidates are filtered: a question, a sensible
length, not a copy, sharing a content word with the original, and free of personal data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from cloud_agent.backends.base import ChatRequest, ChatTurn, LLMBackend
from cloud_agent.distill.dataset import Example, normalise
from cloud_agent.errors import BackendError
from cloud_agent.scheduler import Scheduler
from shared.pii import detect

__all__ = ["paraphrase"]

# Few-shot: a small model told only "rephrase" tends to answer the question instead.
PROMPT = (
    ChatTurn(
        "system", "You rephrase questions. Reply with one rephrased question and nothing else."
    ),
    ChatTurn("user", "Rephrase: How much does delivery cost?"),
    ChatTurn("assistant", "What is the price of shipping?"),
    ChatTurn("user", "Rephrase: Can I return shoes?"),
    ChatTurn("assistant", "Is it possible to send shoes back?"),
)
_STOP = frozenset(
    "a an the is are do does can i you my your to of in on for and or what how when where "
    "which who it be there this that with me we our".split()
)


def _content(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9$]+", text.lower()) if w not in _STOP and len(w) > 2}


def acceptable(original: str, candidate: str) -> bool:
    words = candidate.split()
    return (
        candidate.endswith("?")
        and 3 <= len(words) <= 30
        and normalise(candidate) != normalise(original)
        and bool(_content(candidate) & _content(original))
        and not detect(candidate)
    )


async def paraphrase(
    examples: Sequence[Example],
    *,
    backend: LLMBackend,
    scheduler: Scheduler,
    per_question: int = 2,
    max_tokens: int = 40,
) -> list[Example]:
    """Up to `per_question` accepted paraphrases of each example, with its answer."""
    out: list[Example] = []
    seen = {normalise(e.question) for e in examples}
    for example in examples:
        accepted = 0
        for attempt in range(per_question * 2):
            if accepted >= per_question:
                break
            request = ChatRequest(
                messages=(*PROMPT, ChatTurn("user", f"Rephrase: {example.question}")),
                max_tokens=max_tokens,
                temperature=0.0 if attempt == 0 else 0.8,
            )
            try:
                async with scheduler.slot("offline"):
                    completion = await backend.complete(request)
            except BackendError:
                break
            lines = completion.text.strip().splitlines()
            candidate = lines[0].strip(' "') if lines else ""
            if acceptable(example.question, candidate) and normalise(candidate) not in seen:
                seen.add(normalise(candidate))
                out.append(replace(example, question=candidate, source="paraphrase"))
                accepted += 1
    return out
