"""Measuring an adapter the way the device will run it: llama.cpp, the GGUF base, greedy.

- Fact accuracy: the share of held-out questions whose answer contains every expected group
  (a labelled workload's ``expect``; without labels, the key values of the reference answer:
  numbers, prices, times).
- Simple intents: greetings and small talk must still get an answer, and must not start
  reciting store facts the base model never said (a known failure of fact-tuned adapters).
- Coverage: per learned topic (fact id), the adapter's measured accuracy; the router keeps a
  request local when it resembles an example of a topic the adapter answers well.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_agent.distill.dataset import Example
from cloud_agent.errors import CloudAgentError
from cloud_agent.evaluation import contains_expected
from shared.llama import (
    DEVICE_SYSTEM_PROMPT,
    ChatTemplate,
    Decoding,
    RepetitionGuard,
    free_lora,
    load_lora,
    open_llama,
    set_lora,
)

__all__ = [
    "REPLAY_PROMPTS",
    "SIMPLE_PROMPTS",
    "GreedyModel",
    "expectation",
    "key_values",
    "topic_accuracy",
]

# Trained on with the base model's own answers, so the adapter learns facts without forgetting
# how to chat. Disjoint from SIMPLE_PROMPTS, which the gate checks.
REPLAY_PROMPTS = (
    "Hi",
    "Hey there!",
    "Good afternoon",
    "Thank you!",
    "Thanks a lot, bye.",
    "Who are you?",
    "Are you a robot?",
    "Can you help me?",
    "I need some help.",
    "OK",
    "Yes please",
    "No thanks",
    "See you later",
    "How are you today?",
    "Nice to meet you",
    "What do you do?",
)
SIMPLE_PROMPTS = (
    "Hello!",
    "Good morning",
    "Thanks, that's all.",
    "What can you help me with?",
    "Can you say that again?",
    "Bye!",
)
_VALUE = re.compile(r"\$?\d+(?:[.,:]\d+)*%?")


def key_values(text: str) -> set[str]:
    """Numbers, prices, times and percentages in `text`: what a fact answer must state."""
    return {m.group(0).rstrip(".,:") for m in _VALUE.finditer(text)}


def expectation(example: Example) -> tuple[tuple[str, ...], ...]:
    """The labelled groups, or one group per key value of the reference answer."""
    if example.expect:
        return example.expect
    return tuple((value,) for value in sorted(key_values(example.answer)))


class GreedyModel:
    """A llama.cpp model with at most one LoRA adapter, answering greedily as the device does."""

    def __init__(self, base: Path, *, n_ctx: int = 512, threads: int | None = None) -> None:
        self._llm = open_llama(base, n_ctx=n_ctx, n_threads=threads)
        self._template = ChatTemplate(self._llm)
        self._adapter: Any = None

    def set_adapter(self, path: Path | None) -> None:
        if self._adapter is not None:
            set_lora(self._llm, None)
            free_lora(self._adapter)
            self._adapter = None
        if path is not None:
            handle = load_lora(self._llm, path)
            if handle is None:
                raise CloudAgentError(f"llama.cpp refused the adapter {path.name}")
            if not set_lora(self._llm, handle):
                free_lora(handle)
                raise CloudAgentError(f"llama.cpp could not activate {path.name}")
            self._adapter = handle

    def tokens(
        self, question: str, *, max_tokens: int = 48, system_prompt: str = DEVICE_SYSTEM_PROMPT
    ) -> list[int]:
        """The greedy answer's token ids (end of turn excluded)."""
        decoding = self._decode(question, max_tokens, system_prompt)
        return [token for token, _ in decoding if token is not None]

    def answer(
        self, question: str, *, max_tokens: int = 48, system_prompt: str = DEVICE_SYSTEM_PROMPT
    ) -> str:
        decoding = self._decode(question, max_tokens, system_prompt)
        for _ in decoding:
            pass
        return decoding.text.strip()

    def _decode(self, question: str, max_tokens: int, system_prompt: str) -> Decoding:
        """Decoded as the device decodes (`LocalModel`): greedy, ended by the template's stop
        strings or once the answer loops."""
        prompt, stops = self._template.tokens(
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
        )
        return Decoding(
            self._llm, prompt, stops=stops, max_tokens=max_tokens, repetition=RepetitionGuard()
        )

    def next_logits(self, question: str, system_prompt: str = DEVICE_SYSTEM_PROMPT) -> Any:
        """Logits of the answer's first token (a copy, as a numpy array)."""
        import llama_cpp
        import numpy as np

        prompt, _ = self._template.tokens(
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
        )
        llm: Any = self._llm
        llm.reset()
        llm.eval(prompt)
        row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()

    def close(self) -> None:
        self.set_adapter(None)
        self._llm.close()


@dataclass(frozen=True)
class Scored:
    example: Example
    answer: str
    correct: bool


def score(model: GreedyModel, examples: Sequence[Example], max_tokens: int) -> list[Scored]:
    """Answer each example that has an expectation; unscorable ones are left out."""
    scored = []
    for example in examples:
        groups = expectation(example)
        if not groups:
            continue
        answer = model.answer(example.question, max_tokens=max_tokens)
        scored.append(Scored(example, answer, contains_expected(answer, groups)))
    return scored


def accuracy(scored: Sequence[Scored]) -> float:
    return sum(s.correct for s in scored) / len(scored) if scored else 0.0


def simple_regressions(
    before: Sequence[str], after: Sequence[str], reference_answers: Sequence[str]
) -> int:
    """Simple prompts answered before but not after, or now reciting a trained fact's values."""
    taught: set[str] = set()
    for reference in reference_answers:
        taught |= key_values(reference)
    count = 0
    for old, new in zip(before, after, strict=True):
        leaked = (key_values(new) & taught) - key_values(old)
        if (old.strip() and not new.strip()) or leaked:
            count += 1
    return count


def _topic(example: Example) -> str:
    """The fact ids of an example, or its own question without any."""
    return ",".join(example.fact_ids) or example.question


def topic_accuracy(scored: Sequence[Scored]) -> dict[str, float]:
    """Accuracy per topic (see `_topic`)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for item in scored:
        hits[_topic(item.example)].append(item.correct)
    return {topic: sum(v) / len(v) for topic, v in hits.items()}


def coverage(scored: Sequence[Scored], *, min_accuracy: float) -> list[tuple[str, float]]:
    """Router coverage: every question of a topic answered well enough, with its accuracy."""
    topics = topic_accuracy(scored)
    examples = []
    for item in scored:
        acc = topics[_topic(item.example)]
        if acc >= min_accuracy:
            examples.append((item.example.question, round(acc, 3)))
    return examples
