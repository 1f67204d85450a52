"""`LlamaCppBackend`: an embedded GGUF model, so the cloud runs with nothing else installed.

Prompts are formatted with the model's own chat template and decoded as the device decodes
(`shared.llama.Decoding`): greedy at temperature 0, and stopped once the answer goes round in
circles (a sentence completed for the third time, a short one for the eighth;
`stop_repetition=False` lets it run to `max_tokens`), which the small default model often does.
Token counts are exact. A conversation too long for the context window loses its oldest turns first
(`ChatTemplate.fitted`).

llama.cpp blocks while it decodes, so each call runs in a worker thread, one at a time per
model (a `Llama` object is not thread-safe). Streaming hands tokens to the event loop as they
are produced; when the consumer stops (a cancel, a deadline), the worker stops decoding at the
next token. llama.cpp failures are mapped to `BackendError`.
"""

from __future__ import annotations

import random
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import llama_cpp

from cloud_agent.backends.base import ChatRequest, Completion, StreamItem
from cloud_agent.errors import BackendError, BackendResponseError
from shared.llama import (
    ChatTemplate,
    Decoding,
    LlamaLoadError,
    RepetitionGuard,
    default_model_path,
    open_llama,
)
from shared.threads import iterate_in_thread, model_executor

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
        stop_repetition: bool = True,
    ) -> None:
        path = Path(model_path) if model_path is not None else default_model_path()
        try:
            self._llm = open_llama(path, n_ctx=n_ctx, n_threads=n_threads, seed=seed)
            self._template = ChatTemplate(self._llm)
        except LlamaLoadError as exc:
            raise BackendError(str(exc)) from exc
        self.model = path.stem
        self.name = f"llama.cpp:{self.model}"
        self.n_ctx = n_ctx
        self.stop_repetition = stop_repetition
        self._lock = threading.Lock()
        self._decoder = model_executor("edgeloop-cloud-model")
        """Requests are decoded one at a time, in this thread; those waiting for it wait here
        (see `shared.threads`)."""
        # Each call samples under a seed drawn from the one before (as llama-cpp-python's own
        # completion calls do), so sampled retries of one request differ and a run replays.
        # (`Llama` reads seed 0 as its default seed, and so does this.)
        self._seed = seed or llama_cpp.LLAMA_DEFAULT_SEED

    def _decode(self, request: ChatRequest, stop: threading.Event) -> Iterator[StreamItem]:
        """Text pieces, then the `Completion`; holds the model meanwhile."""
        with self._lock:
            # A conversation too long for the context loses its oldest turns first.
            prompt, stops = self._template.fitted(
                [{"role": m.role, "content": m.content} for m in request.messages],
                self.n_ctx,
                request.max_tokens,
            )
            room = self.n_ctx - len(prompt)
            if room < 1:
                raise BackendError(
                    f"the prompt's {len(prompt)} tokens do not fit the context of {self.n_ctx}"
                )
            self._seed = random.Random(self._seed).randint(0, 2**32)
            self._llm.set_seed(self._seed)
            decoding = Decoding(
                self._llm,
                prompt,
                stops=[*stops, *request.stop],
                max_tokens=min(request.max_tokens, room),
                temperature=request.temperature,
                repetition=RepetitionGuard() if self.stop_repetition else None,
            )
            for _, piece in decoding:
                if stop.is_set():
                    return
                if piece:
                    yield piece
            yield Completion(
                decoding.text, decoding.finish, len(prompt), decoding.count, self.model
            )

    async def complete(self, request: ChatRequest) -> Completion:
        async for item in self.stream(request):
            if isinstance(item, Completion):
                return item
        raise BackendResponseError("llama.cpp ended without a completion")  # pragma: no cover

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamItem]:
        try:
            async for item in iterate_in_thread(
                lambda stop: self._decode(request, stop), executor=self._decoder
            ):
                yield item
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"llama.cpp failed: {exc}") from exc

    async def aclose(self) -> None:
        with self._lock:
            self._llm.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)
