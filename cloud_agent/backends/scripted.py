"""`ScriptedBackend`: a test double that answers from a table or a function.

For tests and benchmarks only; it is not a mode of the service. It can also hang, fail or
return garbage on demand, so the fault paths of the callers can be tested.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping

from cloud_agent.backends.base import ChatRequest, Completion, StreamItem
from cloud_agent.errors import BackendError

__all__ = ["ScriptedBackend"]


class ScriptedBackend:
    """Answers each request with `answer(request)`, streamed in word-sized pieces."""

    def __init__(
        self,
        answers: Mapping[str, str] | Callable[[ChatRequest], str] | str = "OK.",
        *,
        name: str = "scripted",
        delay_s: float = 0.0,
        fail_with: BackendError | None = None,
        hang: bool = False,
        keep_calls: bool = True,
    ) -> None:
        self.name = name
        self._answers = answers
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.hang = hang
        self.keep_calls = keep_calls
        self.calls: list[ChatRequest] = []
        """The requests received, for tests to inspect; empty when `keep_calls` is off (a
        benchmark's millions of requests would otherwise stay alive, and be scanned by every
        garbage collection, until it ends)."""
        self.call_count = 0
        self.cancelled = 0
        self.closed = False

    def answer(self, request: ChatRequest) -> str:
        if callable(self._answers):
            return self._answers(request)
        if isinstance(self._answers, str):
            return self._answers
        question = request.messages[-1].content
        return self._answers.get(question, "I do not know.")

    async def _prelude(self, request: ChatRequest) -> str:
        self.call_count += 1
        if self.keep_calls:
            self.calls.append(request)
        if self.hang:
            await asyncio.Event().wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        return self.answer(request)

    def _completion(self, request: ChatRequest, text: str) -> Completion:
        prompt = sum(len(m.content.split()) for m in request.messages)
        return Completion(text, "stop", prompt, len(text.split()), self.name)

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            return self._completion(request, await self._prelude(request))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        try:
            text = await self._prelude(request)
            pieces = text.split(" ")
            for i, piece in enumerate(pieces):
                yield piece if i == len(pieces) - 1 else piece + " "
                await asyncio.sleep(0)
            yield self._completion(request, text)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def aclose(self) -> None:
        self.closed = True
