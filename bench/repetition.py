"""Answers stopped where they start going round in circles, against answers decoded to the
token limit, on the workload's requests the models phrase themselves.

Small models decoded greedily often repeat a sentence until `max_tokens` ("Check the bike before you
leave." again and again). `RepetitionGuard` ends an answer once a sentence of 12 characters or more
completes for the third time (a shorter one for the eighth). This plays the dev workload's
`cloud_complex` and `local_simple` requests (store facts are quoted from the knowledge file and cost
no model tokens) on the packaged SmolLM2 model, each request twice in a row, guard off then on:

- cloud: `LlamaCppBackend` under the cloud's system prompt, 256 tokens at most (the edge's
  `cloud_max_tokens`);
- device: `LocalModel` under the device's system prompt, at most its profile's 256.

Prints per side the completion tokens and seconds with and without the guard and their ratio,
how many answers ran to the limit, how many the guard cut, and checks that every guarded answer
is the start of the unguarded one (the guard only cuts, it never changes a word).

    python -m bench.repetition [--workload PATH] [--side cloud|device|both] [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_agent.backends import ChatRequest, ChatTurn
from cloud_agent.backends.llama_cpp import LlamaCppBackend
from cloud_agent.skills import SYSTEM
from edge_agent.local_model import DeviceProfile, LocalModel
from shared.llama import DEVICE_SYSTEM_PROMPT

KIOSK = Path(__file__).resolve().parents[1] / "examples" / "kiosk"
WORKLOAD = KIOSK / "northwind-workload-dev.jsonl"
MAX_TOKENS = 256

Answer = Callable[[str, bool], Awaitable[tuple[str, int, str]]]
"""(question, guard on) -> (text, completion tokens, finish reason)."""


@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    at_limit: int = 0


async def play(questions: list[str], answer: Answer) -> tuple[Tally, Tally, int, list[str]]:
    """(without the guard, with it, answers cut, questions whose guarded answer is not the start
    of the unguarded one)."""
    off, on, cut, changed = Tally(), Tally(), 0, []
    for question in questions:
        runs = []
        for guard, tally in ((False, off), (True, on)):
            started = time.perf_counter()
            text, tokens, finish = await answer(question, guard)
            tally.seconds += time.perf_counter() - started
            tally.tokens += tokens
            tally.at_limit += finish == "length"
            runs.append((text, tokens))
        (full, full_tokens), (guarded, guarded_tokens) = runs
        cut += guarded_tokens < full_tokens
        if not full.startswith(guarded):
            changed.append(question)
    return off, on, cut, changed


def fresh(llm: Any) -> None:
    """Forget the last prompt, so the next is evaluated whole. Otherwise llama.cpp reuses the
    cache of the prefix it shares with the last one, and logits computed in a different batch
    split can differ in the last bits: the second of two identical questions could be answered
    differently for that reason alone."""
    llm.reset()


def cloud_side() -> tuple[Answer, Callable[[], Awaitable[None]]]:
    backend = LlamaCppBackend(n_threads=2)
    system = ChatTurn("system", SYSTEM.format(store="Northwind Outfitters"))

    async def answer(question: str, guard: bool) -> tuple[str, int, str]:
        backend.stop_repetition = guard
        fresh(backend._llm)
        request = ChatRequest((system, ChatTurn("user", question)), max_tokens=MAX_TOKENS)
        done = await backend.complete(request)
        return done.text, done.completion_tokens, done.finish_reason

    return answer, backend.aclose


def device_side() -> tuple[Answer, Callable[[], Awaitable[None]]]:
    model = LocalModel(profile=DeviceProfile(cores=2, memory_mb=4096))

    async def answer(question: str, guard: bool) -> tuple[str, int, str]:
        model.stop_repetition = guard
        fresh(model._llm)
        messages = [
            {"role": "system", "content": DEVICE_SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ]
        done = await model.generate(messages, max_tokens=MAX_TOKENS)
        return done.text, done.completion_tokens, done.finish_reason

    async def close() -> None:
        model.close()

    return answer, close


async def main_async(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    questions = [r["text"] for r in rows if r["class"] in ("cloud_complex", "local_simple")]
    questions = questions[: args.limit] if args.limit else questions
    sides = {"cloud": cloud_side, "device": device_side}
    names = list(sides) if args.side == "both" else [args.side]
    print(
        f"{len(questions)} requests (cloud_complex and local_simple), SmolLM2-135M Q4_1, "
        f"greedy, at most {MAX_TOKENS} tokens; each answered without the guard, then with it\n"
    )
    print(
        f"{'side':<8} {'tokens off':>11} {'tokens on':>10} {'ratio':>6} {'s off':>7} "
        f"{'s on':>7} {'ratio':>6} {'at limit off/on':>16} {'cut':>5}"
    )
    failed = False
    for name in names:
        answer, close = sides[name]()
        try:
            off, on, cut, changed = await play(questions, answer)
        finally:
            await close()
        print(
            f"{name:<8} {off.tokens:>11,} {on.tokens:>10,} {on.tokens / off.tokens:>6.2f} "
            f"{off.seconds:>7.1f} {on.seconds:>7.1f} {on.seconds / off.seconds:>6.2f} "
            f"{f'{off.at_limit}/{on.at_limit}':>16} {cut:>5}"
        )
        for question in changed:
            failed = True
            print(f"  not a cut of the unguarded answer: {question!r}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workload", type=Path, default=WORKLOAD)
    parser.add_argument("--side", choices=("cloud", "device", "both"), default="both")
    parser.add_argument("--limit", type=int, default=0, help="first N requests only (0: all)")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
