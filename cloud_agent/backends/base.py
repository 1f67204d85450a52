"""The one interface every LLM backend implements.

A backend takes a `ChatRequest` and either completes it (`complete`) or streams it (`stream`:
text pieces, then exactly one `Completion`). `aclose` releases what it holds. The scheduler and
the skills never know which backend they hold. Backends raise only `BackendError` subclasses:
third-party exceptions are mapped where they occur.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = ["ChatRequest", "ChatTurn", "Completion", "LLMBackend", "StreamItem"]

Role = Literal["system", "user", "assistant"]


@dataclass(slots=True)
class ChatTurn:
    role: Role
    content: str


@dataclass(slots=True)
class ChatRequest:
    messages: tuple[ChatTurn, ...]
    max_tokens: int = 256
    temperature: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)


@dataclass(slots=True)
class Completion:
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    model: str
    backend: str = ""
    """The backend that produced it, when a pool chose one of its members (else empty: the
    backend called)."""


StreamItem = str | Completion


@runtime_checkable
class LLMBackend(Protocol):
    """An LLM that answers chat requests."""

    name: str
    """Short name for logs, metrics and the store (e.g. ``llama.cpp:SmolLM2``)."""

    async def complete(self, request: ChatRequest) -> Completion: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        """Text pieces as produced, then exactly one `Completion` (whose text is the whole)."""
        ...

    async def aclose(self) -> None: ...
