"""The cloud's sentence encoder on one torch thread (as `MiniLMEmbedder` runs it) against torch's
default of one thread per core: on an idle machine, with every core busy, beside llama.cpp
generating, and beside torch training in the same process.

Retrieval encodes each escalation's question. On a server the cores are rarely idle: the event
loop, other requests and often an LLM run beside it, and a second torch thread then waits for a
core instead of helping. Busy cores are one spinning process per core; the LLM is the packaged
SmolLM2 generating without pause in a child process on every core, as the embedded backend
does; training is a thread of this process multiplying matrices with torch's default threads,
as a distillation job does in the cloud service. Prints milliseconds per query and the ratio,
for each condition in turn (each side twice, alternately).

    python -m bench.encoder_threads [--queries 40]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import torch

from cloud_agent.knowledge import MiniLMEmbedder

QUESTIONS = (
    "What's the price of the fastest delivery option?",
    "Can I call customer service early in the morning?",
    "How long do I have to send back a jacket I don't like?",
    "Do you rent out tents for a weekend?",
)


def per_query_ms(encode: Callable[[str], object], n: int) -> float:
    encode(QUESTIONS[0])
    started = time.perf_counter()
    for i in range(n):
        encode(QUESTIONS[i % len(QUESTIONS)])
    return (time.perf_counter() - started) / n * 1000


_GENERATE = """
import os
from shared.llama import default_model_path, open_llama
llm = open_llama(default_model_path(), n_threads=os.cpu_count() or 1, verbose=False)
print("ready", flush=True)  # the model is loaded
while True:
    llm.create_completion("Write a long story about a tent.", max_tokens=256)
"""


@contextlib.contextmanager
def idle() -> Iterator[None]:
    yield


@contextlib.contextmanager
def spinning(cores: int) -> Iterator[None]:
    spin = 'print("ready", flush=True)\nwhile True: pass'
    with _children([[sys.executable, "-c", spin]] * cores):
        yield


@contextlib.contextmanager
def generating() -> Iterator[None]:
    with _children([[sys.executable, "-c", _GENERATE]]):
        yield


@contextlib.contextmanager
def training() -> Iterator[None]:
    stop = threading.Event()

    def train() -> None:
        weights = torch.randn(768, 768, requires_grad=True)
        batch = torch.randn(256, 768)
        while not stop.is_set():
            (batch @ weights).square().mean().backward()  # type: ignore[no-untyped-call]

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        yield
    finally:
        stop.set()
        trainer.join()


@contextlib.contextmanager
def _children(commands: list[list[str]]) -> Iterator[None]:
    """Child processes running `commands`, each of which prints "ready" once it is busy."""
    children = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
    try:
        for child, command in zip(children, commands, strict=True):
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{command[-1]!r} ended before it was ready")
        yield
    finally:
        for child in children:
            child.kill()
            child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--queries", type=int, default=40, help="per run; two runs of each")
    args = parser.parse_args(argv)
    encoder = MiniLMEmbedder()
    cores = os.cpu_count() or 1

    def ours(text: str) -> object:
        return encoder.embed([text])

    def default(text: str) -> object:  # the same model, in this thread, torch's default threads
        return encoder._embed([text])

    print(f"{cores} cores; torch default {torch.get_num_threads()} threads, ours {encoder.threads}")
    print(f"{'':<28} {'default ms':>11} {'ours ms':>9} {'default/ours':>13}")
    conditions: list[tuple[str, Callable[[], contextlib.AbstractContextManager[object]]]] = [
        ("idle machine", idle),
        ("every core busy", lambda: spinning(cores)),
        ("beside llama.cpp generating", generating),
        ("beside torch training", training),
    ]
    for label, condition in conditions:
        with condition():
            # In turn, twice: a swing of the machine falls on both alike.
            runs = [per_query_ms(f, args.queries) for _ in range(2) for f in (default, ours)]
        base, mine = (runs[0] + runs[2]) / 2, (runs[1] + runs[3]) / 2
        print(f"{label:<28} {base:>11.1f} {mine:>9.1f} {base / mine:>12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
