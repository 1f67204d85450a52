"""`CloudAgent`: how the cloud answers one escalation.

It checks the request for raw personal data (defence in depth: the device should have replaced
it), plans with the knowledge skill, and either answers from a grounded fact or asks the LLM
backend through the scheduler's online lane, streaming pieces as they come. The caller (the
server) sends the pieces, enforces the deadline and cancels on request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from cloud_agent.backends.base import ChatRequest, ChatTurn, Completion, LLMBackend
from cloud_agent.config import PHONE_REGIONS
from cloud_agent.scheduler import Lane, Scheduler
from cloud_agent.skills import KnowledgeSkill
from cloud_agent.store.records import InteractionRecord
from protocol import Escalate
from shared.pii import PiiKind, detect

__all__ = ["Answer", "CloudAgent"]

CLOUD_PII_KINDS = (PiiKind.CARD, PiiKind.PHONE, PiiKind.EMAIL, PiiKind.IBAN)


@dataclass(slots=True)
class Answer:
    """The end of an answer: what the server puts in `result` and the store keeps."""

    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    model: str
    backend: str
    fact_ids: tuple[str, ...] = ()
    grounded: bool = False
    pii_kinds: tuple[str, ...] = field(default_factory=tuple)


class CloudAgent:
    """Skills around an LLM backend, behind the scheduler."""

    def __init__(
        self,
        backend: LLMBackend,
        scheduler: Scheduler,
        skill: KnowledgeSkill | None = None,
        *,
        phone_regions: tuple[str, ...] = PHONE_REGIONS,
    ) -> None:
        self.backend = backend
        self.scheduler = scheduler
        self.skill = skill
        self.phone_regions = phone_regions
        """Where the detector reads phone numbers without a country code."""

    async def learn(self, record: InteractionRecord) -> bool:
        """Learn from the feedback on an answer (see `KnowledgeSkill.learn`), on a worker
        thread (the question is embedded)."""
        return self.skill is not None and await asyncio.to_thread(self.skill.learn, record)

    def scrub(self, request: Escalate) -> tuple[Escalate, tuple[str, ...]]:
        """The request with any raw personal data replaced by ``[redacted KIND]``, and the
        kinds found. Placeholders such as ``<CARD_1>`` are not personal data. What the cloud
        answers from and stores is the scrubbed copy, so a device that leaks a value does not
        make the cloud keep it."""
        kinds: set[str] = set()
        messages = []
        for message in request.messages:
            findings = detect(message.content, CLOUD_PII_KINDS, phone_regions=self.phone_regions)
            if not findings:
                messages.append(message)
                continue
            text = message.content
            for finding in reversed(findings):
                kinds.add(finding.kind.value)
                text = (
                    f"{text[: finding.start]}[redacted {finding.kind.value}]{text[finding.end :]}"
                )
            messages.append(message.model_copy(update={"content": text}))
        if not kinds:
            return request, ()
        return request.model_copy(update={"messages": messages}), tuple(sorted(kinds))

    async def answer(
        self, request: Escalate, *, deadline: float, pii_kinds: tuple[str, ...] = ()
    ) -> AsyncIterator[str | Answer]:
        """Text pieces, then one `Answer` (streaming escalations). Raises `Overloaded` or
        `BackendError`."""
        turns = [ChatTurn(m.role, m.content) for m in request.messages]
        async for item in self.respond(
            turns,
            max_tokens=request.max_tokens,
            lane=request.priority,
            deadline=deadline,
            pii_kinds=pii_kinds,
        ):
            yield item

    async def complete(
        self,
        turns: list[ChatTurn],
        *,
        max_tokens: int,
        lane: Lane,
        deadline: float | None = None,
        pii_kinds: tuple[str, ...] = (),
    ) -> Answer:
        """The whole answer at once (non-streaming escalations, offline work, evaluation).

        A plain coroutine rather than `respond`'s generator chain: this is the hot path of
        non-streaming traffic."""
        if self.skill is None:  # no knowledge to plan with: straight to the backend
            messages: tuple[ChatTurn, ...] = tuple(turns)
            fact_ids: tuple[str, ...] = ()
        else:
            messages, fact_ids, grounded = await self._plan(turns, personal=bool(pii_kinds))
            if grounded is not None:
                return self._grounded(grounded, fact_ids, pii_kinds)
        chat = ChatRequest(messages=messages, max_tokens=max_tokens)
        async with self.scheduler.slot(lane, deadline=deadline):
            completion = await self.backend.complete(chat)
        return self._from_completion(completion, fact_ids, pii_kinds)

    async def _plan(
        self, turns: list[ChatTurn], *, personal: bool
    ) -> tuple[tuple[ChatTurn, ...], tuple[str, ...], str | None]:
        """(messages for the LLM, fact ids, grounded answer or None)."""
        if self.skill is None:
            return tuple(turns), (), None
        # Retrieval runs a sentence encoder, milliseconds of CPU: on a worker thread, so the
        # event loop serves other connections meanwhile.
        plan = await asyncio.to_thread(self.skill.plan, turns, personal=personal)
        return plan.messages, plan.fact_ids, plan.grounded_answer

    @staticmethod
    def _grounded(text: str, fact_ids: tuple[str, ...], pii_kinds: tuple[str, ...]) -> Answer:
        return Answer(
            text=text,
            finish_reason="stop",
            prompt_tokens=0,
            completion_tokens=0,
            model="knowledge",
            backend="knowledge",
            fact_ids=fact_ids,
            grounded=True,
            pii_kinds=pii_kinds,
        )

    def _from_completion(
        self, completion: Completion, fact_ids: tuple[str, ...], pii_kinds: tuple[str, ...]
    ) -> Answer:
        return Answer(
            text=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            model=completion.model,
            backend=completion.backend or self.backend.name,
            fact_ids=fact_ids,
            pii_kinds=pii_kinds,
        )

    async def respond(
        self,
        turns: list[ChatTurn],
        *,
        max_tokens: int,
        lane: Lane,
        deadline: float | None,
        pii_kinds: tuple[str, ...] = (),
    ) -> AsyncIterator[str | Answer]:
        """Text pieces as produced, then one `Answer`, in the given scheduler lane."""
        messages, fact_ids, grounded = await self._plan(turns, personal=bool(pii_kinds))
        if grounded is not None:
            words = grounded.split(" ")
            for i, word in enumerate(words):
                yield word if i == len(words) - 1 else word + " "
            yield self._grounded(grounded, fact_ids, pii_kinds)
            return
        chat = ChatRequest(messages=messages, max_tokens=max_tokens)
        completion: Completion | None = None
        async with self.scheduler.slot(lane, deadline=deadline):
            async for item in self.backend.stream(chat):
                if isinstance(item, Completion):
                    completion = item
                else:
                    yield item
        assert completion is not None, "a backend stream ends with a Completion"
        yield self._from_completion(completion, fact_ids, pii_kinds)
