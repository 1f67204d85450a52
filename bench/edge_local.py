"""Local generation through `LocalModel` against llama-cpp-python's own
`create_chat_completion`, same model, prompt, threads and context, in the same run.

Prints decode tokens/s and time to first token for both, and the ratio ours/direct
(target: at least 0.97). Runs alternate and the best of `--repeat` is kept (noisy machine).

    python -m bench.edge_local [--tokens 128] [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from edge_agent.local_model import DeviceProfile, Generation, LocalModel, RuntimeSettings
from shared.llama import default_model_path, open_llama

PROMPT = [{"role": "user", "content": "Write a detailed packing list for a week-long trek."}]


async def ours(model: LocalModel, tokens: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = None
    count = 0
    async for item in model.stream(PROMPT, max_tokens=tokens):
        if isinstance(item, Generation):
            count = item.completion_tokens
        elif first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return first - started, (count - 1) / (end - first), count


def direct(llm: Any, tokens: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = None
    count = 0
    for chunk in llm.create_chat_completion(
        PROMPT, max_tokens=tokens, temperature=0.0, stream=True
    ):
        if chunk["choices"][0]["delta"].get("content"):
            count += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return first - started, (count - 1) / (end - first), count


async def main_async(args: argparse.Namespace) -> None:
    settings = RuntimeSettings(threads=args.threads, n_ctx=1024, max_tokens=args.tokens)
    # The same number of tokens on both paths: this measures decoding, so the answer is not
    # cut where it starts repeating itself (`bench.repetition` measures that).
    model = LocalModel(
        profile=DeviceProfile(cores=args.threads, memory_mb=4096),
        settings=settings,
        stop_repetition=False,
    )
    llm = open_llama(default_model_path(), n_ctx=1024, n_threads=args.threads)
    best_ours = (float("inf"), 0.0, 0)
    best_direct = (float("inf"), 0.0, 0)
    for _ in range(args.repeat):
        o = await ours(model, args.tokens)
        d = await asyncio.to_thread(direct, llm, args.tokens)
        best_ours = (min(best_ours[0], o[0]), max(best_ours[1], o[1]), o[2])
        best_direct = (min(best_direct[0], d[0]), max(best_direct[1], d[1]), d[2])
    head = f"SmolLM2-135M Q4_1, {args.threads} threads, up to {args.tokens} tokens"
    print(f"{head}, best of {args.repeat}\n")
    print(f"{'path':<40} {'TTFT ms':>8} {'decode tok/s':>13} {'tokens':>7}")
    for name, (ttft, rate, n) in (
        ("llama-cpp-python create_chat_completion", best_direct),
        ("edgeloop LocalModel.stream", best_ours),
    ):
        print(f"{name:<40} {ttft * 1000:>8.1f} {rate:>13.1f} {n:>7}")
    print(
        f"\nratio ours/direct: decode {best_ours[1] / best_direct[1]:.3f} (target >= 0.97), "
        f"time to first token {best_direct[0] / best_ours[0]:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
