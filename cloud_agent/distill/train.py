"""Training a LoRA adapter for the device's model, on float weights read from its very GGUF.

transformers reads the GGUF the devices run and dequantizes it to float32 (the only way it
loads GGUF here: no packed-kernel path on CPU), so the adapter is trained against exactly the
weights llama.cpp will apply it to, up to llama.cpp's own quantized arithmetic. The loss is on
the answer tokens only; prompts go through the model's chat template with the device's system
prompt, which is how the device will ask. Runs on CPU, or on a GPU when torch sees one.

Needs the ``distill`` extra (torch, transformers, peft); nothing here is imported by the
serving path.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_agent.distill.dataset import Example
from cloud_agent.errors import CloudAgentError
from shared.llama import DEVICE_SYSTEM_PROMPT

__all__ = ["LoraSettings", "TrainedAdapter", "load_base", "train_lora"]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = (*ATTENTION, "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DistillUnavailable(CloudAgentError):
    """The ``distill`` extra (torch, transformers, peft) is not installed."""


class DistillSettingsError(CloudAgentError):
    """A distillation setting is out of range; nothing was loaded or trained."""


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections of a llama-architecture layer a LoRA can adapt (and the GGUF export maps)."""


@dataclass(frozen=True)
class LoraSettings:
    # Rank 8 on the MLPs (where a model keeps facts) and on q, v, o: measured on the kiosk
    # demo, attention alone confused related facts (three shipping options); k adds little
    # and its share would take the file to the 5% limit (4.6 MB f16 without it, for
    # SmolLM2-135M's 98 MB; 4.9 MB with it).
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 120
    learning_rate: float = 2e-3
    batch_size: int = 8
    seed: int = 0
    system_prompt: str = DEVICE_SYSTEM_PROMPT
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.target_modules) - set(PROJECTIONS))
        problems = [
            (self.rank < 1, f"rank {self.rank}: at least 1"),
            (not self.alpha > 0, f"alpha {self.alpha}: above 0"),
            (self.steps < 1, f"steps {self.steps}: at least 1"),
            (not self.learning_rate > 0, f"learning rate {self.learning_rate}: above 0"),
            (self.batch_size < 1, f"batch size {self.batch_size}: at least 1"),
            (not self.target_modules, "target modules: at least one"),
            (bool(unknown), f"target modules {unknown}: expected some of {list(PROJECTIONS)}"),
        ]
        for bad, problem in problems:
            if bad:
                raise DistillSettingsError(f"LoRA {problem}")


@dataclass
class TrainedAdapter:
    """LoRA weights by HF module path: ``model.layers.3.self_attn.q_proj`` -> (A, B)."""

    weights: dict[str, tuple[Any, Any]]
    rank: int
    alpha: float
    losses: list[float] = field(default_factory=list)
    model: Any = None
    """The peft model (for comparisons in tests); None once released."""
    tokenizer: Any = None


def _require() -> tuple[Any, Any, Any]:
    try:
        import peft
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DistillUnavailable(
            "distillation needs the 'distill' extra: pip install 'edgeloop[distill]'"
        ) from exc
    return torch, transformers, peft


def load_base(gguf_path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 from a GGUF file; its tokenizer and chat template too."""
    torch, transformers, _ = _require()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # our own progress line says what happens
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
    # transformers' GGUF reader draws a raw tqdm bar per load; tqdm reads TQDM_DISABLE.
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), tokenizer


def encode(tokenizer: Any, example: Example, system_prompt: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer + end of turn, and where the answer starts."""
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": example.question},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id
    return [*prompt_ids, *answer_ids, end], len(prompt_ids)


def _batches(n: int, size: int, rng: random.Random) -> Any:
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, size):
            yield order[start : start + size]


def train_lora(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    settings: LoraSettings,
    report: Callable[[str], None] | None = None,
) -> TrainedAdapter:
    """Wrap `model` with a fresh LoRA, train it on `examples`, return its weights."""
    if not examples:
        raise CloudAgentError("nothing to train on: the dataset is empty")
    torch, _, peft = _require()
    from tqdm.auto import tqdm

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers method that transformers 5 marks deprecated.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    device = next(wrapped.parameters()).device
    encoded = [encode(tokenizer, e, settings.system_prompt) for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, settings.steps // 10)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
    wrapped.train()
    losses = []
    batches = _batches(len(encoded), settings.batch_size, rng)
    bar = tqdm(
        range(settings.steps), desc="training", disable=not settings.progress, file=sys.stderr
    )
    started = time.perf_counter()
    for _ in bar:
        rows = [encoded[i] for i in next(batches)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, start) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, start : len(ids)] = torch.tensor(ids[start:])
            mask[i, : len(ids)] = 1
        loss = _answer_loss(
            torch, wrapped, input_ids.to(device), mask.to(device), labels.to(device)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        scheduler.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        step = len(losses)
        if report is not None and (step % max(1, settings.steps // 10) == 0):
            rate = (time.perf_counter() - started) / step
            report(f"step {step}/{settings.steps}, loss {losses[-1]:.3f}, {rate:.1f} s/step")
    wrapped.eval()
    return TrainedAdapter(
        weights=lora_weights(wrapped),
        rank=settings.rank,
        alpha=settings.alpha,
        losses=losses,
        model=wrapped,
        tokenizer=tokenizer,
    )


def _answer_loss(torch: Any, wrapped: Any, input_ids: Any, mask: Any, labels: Any) -> Any:
    """Next-token loss on answer tokens, projecting to the vocabulary only where it counts.

    The output projection (576 x 49,152 for SmolLM2) is a fifth of the model's work per token;
    prompts are most of each sequence and their logits would be thrown away.
    """
    causal_lm = wrapped.get_base_model()
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def lora_weights(wrapped: Any) -> dict[str, tuple[Any, Any]]:
    """(A, B) as float32 numpy arrays per adapted module, keyed by the HF module path."""
    found: dict[str, dict[str, Any]] = {}
    for name, tensor in wrapped.state_dict().items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                module = name.split(marker)[0].removeprefix("base_model.model.")
                found.setdefault(module, {})[part] = tensor.detach().float().cpu().numpy()
    return {m: (p["lora_A"], p["lora_B"]) for m, p in found.items()}
