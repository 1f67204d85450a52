"""Writing a trained LoRA as a GGUF adapter that llama.cpp loads, with the `gguf` package.

The file says ``general.type = adapter``, ``adapter.type = lora`` and ``adapter.lora.alpha``
(float32; llama.cpp scales by alpha / rank, as peft does). Tensors are named after the base
tensors they adapt (``blk.3.attn_q.weight.lora_a``), with A as (rank, in) and B as (out, rank).

One subtlety decides whether the adapter answers right: llama.cpp's converter permutes the
rows of the q and k projections for its rotary layout, and transformers undoes that when it
reads a GGUF, so the adapter was trained in the un-permuted row order. The same permutation is
applied here to the rows of ``lora_b`` for q and k (A acts on the input side and is left as
is). Without it the file still loads, and the answers drift.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from cloud_agent.errors import CloudAgentError

__all__ = ["ExportError", "export_gguf_lora", "rotary_permute"]

_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


class ExportError(CloudAgentError):
    """The adapter cannot be written for this base model."""


def rotary_permute(rows: Any, heads: int) -> Any:
    """llama.cpp's row order for a q/k projection: per head, interleave the two halves."""
    shape = rows.shape
    if shape[0] % (2 * heads):
        raise ExportError(f"{shape[0]} rows do not split into {heads} rotary heads")
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _heads(base_gguf: Path) -> tuple[str, int, int]:
    import gguf

    reader = gguf.GGUFReader(str(base_gguf))

    def field(key: str) -> Any:
        item = reader.get_field(key)
        if item is None:
            raise ExportError(f"{base_gguf.name} has no {key}")
        return item.contents()

    arch = str(field("general.architecture"))
    n_head = int(field(f"{arch}.attention.head_count"))
    kv_field = reader.get_field(f"{arch}.attention.head_count_kv")
    n_kv = int(kv_field.contents()) if kv_field is not None else n_head
    return arch, n_head, n_kv


def export_gguf_lora(
    weights: dict[str, tuple[Any, Any]],
    *,
    alpha: float,
    base_gguf: Path,
    path: Path,
    dtype: str = "f16",
    permute: bool = True,
) -> Path:
    """Write `weights` (HF module path -> (A, B)) as a GGUF LoRA for `base_gguf` at `path`.

    `permute=False` skips the q/k row permutation; it exists to show in a test what goes
    wrong without it, never for use.
    """
    import gguf

    arch, n_head, n_kv = _heads(base_gguf)
    if arch != "llama":
        raise ExportError(f"exporting LoRA for {arch!r} models is not supported (llama only)")
    kind = {"f16": np.float16, "f32": np.float32}[dtype]
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for module, (a, b) in sorted(weights.items(), key=lambda kv: _sort_key(kv[0])):
        match = _PATH.search(module)
        if match is None or match.group(2) not in _MODULES:
            raise ExportError(f"no llama.cpp tensor for the module {module!r}")
        layer, target = int(match.group(1)), _MODULES[match.group(2)]
        b = np.asarray(b, dtype=np.float32)
        if permute and target == "attn_q":
            b = rotary_permute(b, n_head)
        elif permute and target == "attn_k":
            b = rotary_permute(b, n_kv)
        base = f"blk.{layer}.{target}.weight"
        writer.add_tensor(f"{base}.lora_a", np.ascontiguousarray(np.asarray(a), dtype=kind))
        writer.add_tensor(f"{base}.lora_b", np.ascontiguousarray(b, dtype=kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def _sort_key(module: str) -> tuple[int, str]:
    match = _PATH.search(module)
    return (int(match.group(1)), match.group(2)) if match else (-1, module)
