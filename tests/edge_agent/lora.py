"""Real GGUF LoRA files for tests, written with the `gguf` package (random weights).

They are proper llama.cpp adapters for the packaged SmolLM2 base (general.type=adapter,
adapter.type=lora, adapter.lora.alpha float32, tensors named after base tensors with
.lora_a/.lora_b); random weights are enough to change what the model says.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

HIDDEN, KV = 576, 192


def write_random_lora(
    path: Path, *, rank: int = 8, layers: int = 30, scale: float = 0.1, seed: int = 0,
    out_dim: int = HIDDEN,
) -> Path:  # fmt: skip
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for layer in range(layers):
        for name, n_out in (("attn_q", out_dim), ("attn_v", KV)):
            base = f"blk.{layer}.{name}.weight"
            a = rng.standard_normal((rank, HIDDEN)).astype(np.float32) * scale
            b = rng.standard_normal((n_out, rank)).astype(np.float32) * scale
            writer.add_tensor(f"{base}.lora_a", a)
            writer.add_tensor(f"{base}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
