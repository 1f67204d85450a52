"""`LlamaCppBackend`: an embedded GGUF model, so the cloud runs with nothing else installed.

llama.cpp blocks while it decodes, so each call runs in a worker thread, one at a time per
model (a `Llama` object is not thread-safe). Streaming hands tokens to the event loop as they
are produced; when the consumer stops (a cancel, a deadline), the worker stops decoding at the
next token. llama.cpp failures are mapped to `BackendError`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from cloud_agent.backends.base import ChatRequest, Completion, StreamItem
from cloud_agent.errors import BackendError, BackendResponseError
from shared.llama import LlamaLoadError, default_model_path, open_llama
from shared.threads import iterate_in_thread

__all__ = ["LlamaCppBackend"]


class LlamaCppBackend:
    """A GGUF model run in-process by llama-cpp-python."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        seed: int = 0,
    ) -> None:
        path = Path(model_path) if model_path is not None else default_model_path()
        try:
            self._llm = open_llama(path, n_ctx=n_ctx, n_threads=n_threads, seed=seed)
        except LlamaLoadError as exc:
            raise BackendError(str(exc)) from exc
        self.model = path.stem
        self.name = f"llama.cpp:{self.model}"
        self._lock = threading.Lock()

    def _messages(self, request: ChatRequest) -> list[Any]:
        return [{"role": m.role, "content": m.content} for m in request.messages]

    def _run(self, request: ChatRequest) -> dict[str, Any]:
        with self._lock:
            return self._llm.create_chat_completion(  # type: ignore[return-value]
                self._messages(request),
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                stop=list(request.stop) or None,
            )

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            out = await asyncio.to_thread(self._run, request)
            choice = out["choices"][0]
            usage = out.get("usage") or {}
            return Completion(
                text=choice["message"]["content"] or "",
                finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                model=self.model,
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendResponseError("llama.cpp returned an unexpected shape") from exc
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"llama.cpp failed: {exc}") from exc

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        def produce(stop: threading.Event) -> Iterator[dict[str, Any]]:
            with self._lock:
                chunks: Iterator[dict[str, Any]] = self._llm.create_chat_completion(  # type: ignore[assignment]
                    self._messages(request),
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    stop=list(request.stop) or None,
                    stream=True,
                )
                for chunk in chunks:
                    if stop.is_set():
                        break
                    yield chunk

        parts: list[str] = []
        finish = "stop"
        try:
            async for chunk in iterate_in_thread(produce):
                choice = chunk["choices"][0]
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    parts.append(piece)
                    yield piece
                if choice.get("finish_reason") == "length":
                    finish = "length"
        except (RuntimeError, ValueError, KeyError, IndexError) as exc:
            raise BackendError(f"llama.cpp failed: {exc}") from exc
        text = "".join(parts)
        prompt_tokens = len(self._llm.tokenize(_flat(request).encode(), special=True))
        yield Completion(text, finish, prompt_tokens, len(parts), self.model)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        with self._lock:
            self._llm.close()


def _flat(request: ChatRequest) -> str:
    return "\n".join(m.content for m in request.messages)
