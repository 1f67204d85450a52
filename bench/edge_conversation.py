"""A conversation on the device: what its earlier turns cost the next answer's first token.

Each question of a conversation is asked with the turns before it, so its prompt grows turn by
turn. llama.cpp keeps the last prompt and answer in its cache and evaluates only what follows
the longest prefix the new prompt shares with them: in a conversation, that prefix is every
earlier turn. This plays a five-turn kiosk conversation through `EdgeAgent` (the packaged model,
no cloud) and prints, per turn, the prompt's tokens and the time to the first piece of the
answer, as it runs (the cache kept from the turn before) against the same prompt evaluated
whole (the cache cleared first), in the same run. Passes alternate; the best of `--repeat` is
kept for each (noisy machine). Both replay one fixed conversation, so the prompts are the same.

    python -m bench.edge_conversation [--repeat 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from edge_agent.agent import EdgeAgent, Turn
from edge_agent.local_model import DeviceProfile, LocalModel

QUESTIONS = (
    "Hi! I'm planning a weekend hike in the hills.",
    "What should I pack in case it rains?",
    "And for cold nights in the tent?",
    "How heavy should my backpack be, all told?",
    "Thanks! Any tips against blisters on the way?",
)


async def play(agent: EdgeAgent, history: list[Turn], *, keep: bool) -> list[tuple[int, float]]:
    """(prompt tokens, seconds to the first piece) per turn of the fixed conversation."""
    llm = agent.model._llm
    llm.reset()  # type: ignore[no-untyped-call]
    out = []
    for k, question in enumerate(QUESTIONS):
        if not keep:
            llm.reset()  # type: ignore[no-untyped-call]  # the next prompt is evaluated whole
        started = time.perf_counter()
        stream = agent.stream(question, history=history[: 2 * k])
        first = None
        async for _ in stream:
            if first is None:
                first = time.perf_counter() - started
        assert first is not None and stream.reply is not None
        out.append((stream.reply.prompt_tokens, first))
    return out


async def main_async(args: argparse.Namespace) -> None:
    model = LocalModel(profile=DeviceProfile(cores=2, memory_mb=4096))
    agent = EdgeAgent(model, local_max_tokens=args.tokens)
    history: list[Turn] = []
    model._llm.reset()  # type: ignore[no-untyped-call]
    for question in QUESTIONS:
        reply = await agent.ask(question, history=history)
        history += [Turn("user", question), Turn("assistant", reply.text)]
    kept: list[float] = [float("inf")] * len(QUESTIONS)
    whole: list[float] = [float("inf")] * len(QUESTIONS)
    prompts: list[int] = []
    for _ in range(args.repeat):
        for keep, best in ((True, kept), (False, whole)):
            run = await play(agent, history, keep=keep)
            prompts = [tokens for tokens, _ in run]
            for k, (_, seconds) in enumerate(run):
                best[k] = min(best[k], seconds)
    model.close()
    print(f"{len(QUESTIONS)}-turn conversation on the device (packaged SmolLM2-135M Q4_1),")
    print(f"answers up to {args.tokens} tokens; time to the first piece, best of {args.repeat}\n")
    print("turn  prompt tokens   cache kept ms   evaluated whole ms   kept/whole")
    for k, (tokens, a, b) in enumerate(zip(prompts, kept, whole, strict=True), 1):
        print(f"{k:>4}  {tokens:>13}   {a * 1000:>13.0f}   {b * 1000:>18.0f}   {a / b:>10.2f}")
    total_kept, total_whole = sum(kept), sum(whole)
    ratio = total_kept / total_whole
    print(f"\nall turns: {total_kept * 1000:.0f} ms vs {total_whole * 1000:.0f} ms ({ratio:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="answer length limit")
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
