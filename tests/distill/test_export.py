"""The GGUF LoRA export, proved by behaviour: llama.cpp with the exported adapter produces the
same greedy tokens as transformers with the trained adapter, and different ones from the base.

Training stays tiny (a few steps on four made-up facts); the model is the packaged SmolLM2.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

pytest.importorskip("peft")
import torch  # noqa: E402

from cloud_agent.distill.dataset import Example  # noqa: E402
from cloud_agent.distill.evaluate import GreedyModel  # noqa: E402
from cloud_agent.distill.export import ExportError, export_gguf_lora, rotary_permute  # noqa: E402
from cloud_agent.distill.train import (  # noqa: E402
    ALL_PROJECTIONS,
    LoraSettings,
    TrainedAdapter,
    load_base,
    train_lora,
)
from shared.llama import DEVICE_SYSTEM_PROMPT, default_model_path  # noqa: E402

pytestmark = pytest.mark.slow

FACTS = [
    Example("What is the Zorblax code?", "The Zorblax code is 4417."),
    Example("Tell me the Zorblax code.", "The Zorblax code is 4417."),
    Example("When does the Quill desk open?", "The Quill desk opens at 6:15."),
    Example("What time does the Quill desk open?", "The Quill desk opens at 6:15."),
]
PROMPTS = [e.question for e in FACTS]
TOKENS = 12


@pytest.fixture(scope="module")
def trained() -> Iterator[TrainedAdapter]:
    model, tokenizer = load_base(default_model_path())
    settings = LoraSettings(
        steps=8, learning_rate=5e-3, batch_size=4, progress=False, target_modules=ALL_PROJECTIONS
    )
    yield train_lora(model, tokenizer, FACTS, settings)


def hf_inputs(trained: TrainedAdapter, question: str) -> Any:
    """The prompt as the device formats it, tokenized by transformers."""
    tok: Any = trained.tokenizer
    messages = [
        {"role": "system", "content": DEVICE_SYSTEM_PROMPT},
        {"role": "user", "content": question},
    ]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(prompt, add_special_tokens=False, return_tensors="pt")


def hf_greedy(trained: TrainedAdapter, question: str) -> list[int]:
    tok: Any = trained.tokenizer
    inputs = hf_inputs(trained, question)
    with torch.no_grad():
        out = trained.model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
    tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    return [t for t in tokens if t != tok.eos_token_id]


@pytest.fixture(scope="module")
def llama() -> Iterator[GreedyModel]:
    model = GreedyModel(default_model_path())
    yield model
    model.close()


def llama_greedy(model: GreedyModel, adapter: Path | None) -> list[list[int]]:
    model.set_adapter(adapter)
    return [model.tokens(q, max_tokens=TOKENS) for q in PROMPTS]


def test_llama_cpp_with_the_export_matches_transformers_with_the_adapter(
    trained: TrainedAdapter, llama: GreedyModel, tmp_path: Path
) -> None:
    path = export_gguf_lora(
        trained.weights, alpha=trained.alpha, base_gguf=default_model_path(),
        path=tmp_path / "adapter.gguf",
    )  # fmt: skip
    expected = [hf_greedy(trained, q) for q in PROMPTS]
    base = llama_greedy(llama, None)
    adapted = llama_greedy(llama, path)
    assert adapted == expected
    assert all(a != b for a, b in zip(adapted, base, strict=True))


def hf_logits(trained: TrainedAdapter, question: str, *, adapter: bool) -> np.ndarray:
    inputs = hf_inputs(trained, question)
    with torch.no_grad():
        if adapter:
            logits = trained.model(**inputs).logits
        else:
            with trained.model.disable_adapter():
                logits = trained.model(**inputs).logits
    return logits[0, -1].numpy().astype(np.float64)


def adapter_effect(model: GreedyModel, adapter: Path) -> list[np.ndarray]:
    model.set_adapter(None)
    base = [model.next_logits(q) for q in PROMPTS]
    model.set_adapter(adapter)
    return [model.next_logits(q) - b for q, b in zip(PROMPTS, base, strict=True)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_without_the_rotary_permutation_the_logits_drift(
    trained: TrainedAdapter, llama: GreedyModel, tmp_path: Path
) -> None:
    """What the adapter changes in the next-token logits, llama.cpp against transformers."""
    kwargs: dict[str, Any] = {"alpha": trained.alpha, "base_gguf": default_model_path()}
    right = export_gguf_lora(trained.weights, path=tmp_path / "right.gguf", **kwargs)
    wrong = export_gguf_lora(trained.weights, path=tmp_path / "wrong.gguf", permute=False, **kwargs)
    expected = [
        hf_logits(trained, q, adapter=True) - hf_logits(trained, q, adapter=False) for q in PROMPTS
    ]
    good = [cosine(a, e) for a, e in zip(adapter_effect(llama, right), expected, strict=True)]
    bad = [cosine(a, e) for a, e in zip(adapter_effect(llama, wrong), expected, strict=True)]
    print(f"cosine of the adapter's effect: permuted {good}, unpermuted {bad}")
    assert min(good) > 0.99
    # With a few training steps q and k move little, so the drift is small but unmistakable:
    # measured here, the unpermuted file's error (1 - cosine) is 25x to 150x the right one's.
    assert max(1 - g for g in good) * 5 < min(1 - b for b in bad)


def test_the_file_is_a_llama_cpp_lora_adapter(trained: TrainedAdapter, tmp_path: Path) -> None:
    path = export_gguf_lora(
        trained.weights, alpha=trained.alpha, base_gguf=default_model_path(),
        path=tmp_path / "adapter.gguf",
    )  # fmt: skip
    reader = gguf.GGUFReader(str(path))
    fields = {k: reader.get_field(k).contents() for k in ("general.type", "adapter.type")}  # type: ignore[union-attr]
    assert fields == {"general.type": "adapter", "adapter.type": "lora"}
    alpha = reader.get_field("adapter.lora.alpha")
    assert alpha is not None and alpha.types == [gguf.GGUFValueType.FLOAT32]
    assert alpha.contents() == pytest.approx(trained.alpha)
    names = {t.name for t in reader.tensors}
    for target in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        assert f"blk.0.{target}.weight.lora_a" in names
        assert f"blk.29.{target}.weight.lora_b" in names
    assert path.stat().st_size < 0.05 * default_model_path().stat().st_size


def test_the_permutation_interleaves_halves_per_head() -> None:
    rows = np.arange(8).reshape(8, 1)
    assert rotary_permute(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ExportError):
        rotary_permute(np.zeros((6, 1)), 2)
