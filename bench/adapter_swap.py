"""Adapter hot-swap time against reloading the base model, in the same run.

Swapping = loading a GGUF LoRA file into the running model and activating it (what
`UpdateManager` does); the baseline is what a swap would cost without llama.cpp's adapter API:
loading the base model again with the adapter (`Llama(lora_path=...)`). Target: a swap takes at
most 1 second. Also prints the adapter's size against the base model file (target: at most 5%).

    python -m bench.adapter_swap [--rank 16] [--repeat 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edge_agent.local_model import DeviceProfile, LocalModel, RuntimeSettings
from shared.llama import default_model_path, open_llama
from tests.edge_agent.lora import write_random_lora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        lora = write_random_lora(Path(tmp) / "adapter.gguf", rank=args.rank, layers=30)
        model = LocalModel(
            profile=DeviceProfile(cores=2, memory_mb=4096),
            settings=RuntimeSettings(threads=2, n_ctx=512, max_tokens=16),
        )
        swaps, reloads = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            adapter = model.load_adapter(lora)
            model.activate(adapter)
            swaps.append(time.perf_counter() - started)
            model.activate(None)
            model.unload(adapter)
            started = time.perf_counter()
            llm = open_llama(default_model_path(), n_ctx=512, n_threads=2, lora_path=str(lora))
            reloads.append(time.perf_counter() - started)
            llm.close()
        base_size = default_model_path().stat().st_size
        size = lora.stat().st_size
    swap, reload = min(swaps), min(reloads)
    print(f"LoRA rank {args.rank} on q and v of 30 layers (f32), best of {args.repeat}\n")
    print(f"hot swap (load adapter + activate):   {swap * 1000:8.1f} ms  (target <= 1000 ms)")
    print(f"reload base model with the adapter:   {reload * 1000:8.1f} ms")
    print(f"ratio swap/reload: {swap / reload:.3f}")
    print(f"\nadapter file {size / 2**20:.2f} MiB = {size / base_size:.1%} of the base model file"
          " (target <= 5%)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
