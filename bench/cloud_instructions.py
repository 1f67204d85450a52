"""CPU instructions per escalation round trip through each server, counted by valgrind.

Instruction counts hold still on a noisy machine, where `bench.cloud_roundtrip`'s rates swing by
half within seconds.

Each server of `bench.cloud_roundtrip` (echo, ours, ours with the interaction log discarded,
codec only) runs alone in a child process under ``valgrind --tool=cachegrind --cache-sim=no``,
driven by the same client in that process: once for `--short` round trips and once for `--long`.
The difference of the two instruction totals over the difference in round trips is what one
round trip costs, start-up cancelled out. Children run with ``PYTHONHASHSEED=0``.

What is counted: user-space instructions of client and server together, the same work whose
time `bench.cloud_roundtrip` compares. Time in the kernel (socket calls, fsync), cache misses
and waiting are not counted, so the ratio to echo is a ratio of work, higher than the
throughput ratio. Timers that fire while a child runs (our server's job and rollout polls, the
admin server's tick) run more often under valgrind's slowdown and add a little to our rows.
Use it to see whether a change to the request path costs or saves a few percent.

Every child runs on the event loop `edgeloop cloud serve` takes (`--loop`, as in
`bench.cloud_roundtrip`).

    python -m bench.cloud_instructions [--short 1600] [--long 4800] [--servers ours ...]
        [--loop auto]

Needs valgrind (Debian's package); about a minute per server on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from bench.cloud_roundtrip import (
    SERVERS,
    Frames,
    Target,
    codec_handler,
    echo_handler,
    ids,
    serve_ours,
    serve_plain,
    serve_transport_echo,
)
from cloud_agent.config import EVENT_LOOPS, EventLoopChoice
from cloud_agent.service import event_loop_factory, settle_heap
from protocol import encode

CONNECTIONS = 16
_TOTAL = re.compile(r"I\s+refs:\s+([\d,]+)")


async def drive(target: Target, frame: Frames, round_trips: int) -> None:
    """`round_trips` in all, shared over the target's connections, then the server settles."""
    each = round_trips // len(target.sockets)

    async def one(k: int) -> None:
        ws = target.sockets[k]
        for _ in range(each):
            await ws.send(frame(f"req_{k}_{next(ids)}"))
            await ws.recv()

    await asyncio.gather(*(one(k) for k in range(len(target.sockets))))
    if target.settle is not None:
        await target.settle()


async def child(kind: str, round_trips: int) -> None:
    """Serve `kind` alone and drive it: a warm-up, then `round_trips`."""
    async with contextlib.AsyncExitStack() as stack:
        if kind in ("ours", "unlogged"):
            target, _ = await stack.enter_async_context(
                serve_ours(CONNECTIONS, keep_log=kind == "ours")
            )
        else:
            # Our server only answers once, for the reply the plain servers send, and is gone
            # before they are driven: its timers must not count in their rows.
            async with serve_ours(1) as (_, sample):
                pass
            size = len(encode(sample))
            if kind == "transport":
                target = await stack.enter_async_context(serve_transport_echo(size, CONNECTIONS))
            else:
                handler = echo_handler(size) if kind == "echo" else codec_handler(sample)
                target = await stack.enter_async_context(serve_plain(handler, CONNECTIONS))
        settle_heap()
        frame = Frames()
        await drive(target, frame, 20 * CONNECTIONS)
        await drive(target, frame, round_trips)


def count(kind: str, round_trips: int, loop: EventLoopChoice) -> int:
    """Instructions of a child serving `kind` for `round_trips`, as valgrind reports them."""
    command = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, "-m", "bench.cloud_instructions", "--loop", loop, "--child", kind,
        str(round_trips),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    match = _TOTAL.search(done.stderr)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"{kind} x {round_trips} failed:\n{done.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--short", type=int, default=1600, help="round trips of the short run")
    parser.add_argument("--long", type=int, default=4800, help="round trips of the long run")
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=[kind for _, kind in SERVERS],
        default=[kind for _, kind in SERVERS],
        help="which servers to count (echo, the baseline, always is)",
    )
    parser.add_argument(
        "--loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="event loop of the servers (default: as `edgeloop cloud serve`)",
    )
    parser.add_argument("--child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        with asyncio.Runner(loop_factory=event_loop_factory(args.loop)) as runner:
            runner.run(child(args.child[0], int(args.child[1])))
        return 0
    if not CONNECTIONS <= args.short < args.long - CONNECTIONS:
        parser.error(f"need {CONNECTIONS} <= --short < --long - {CONNECTIONS}")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt install valgrind)", file=sys.stderr)
        return 2
    chosen = [(name, kind) for name, kind in SERVERS if kind == "echo" or kind in args.servers]
    runs: list[tuple[str, int]] = [(kind, n) for _, kind in chosen for n in (args.short, args.long)]
    with ThreadPoolExecutor(max_workers=min(len(runs), os.cpu_count() or 1)) as pool:
        totals = dict(
            zip(runs, pool.map(lambda run: count(run[0], run[1], args.loop), runs), strict=True)
        )
    # Each connection makes n // CONNECTIONS round trips.
    span = (args.long // CONNECTIONS - args.short // CONNECTIONS) * CONNECTIONS
    per = {kind: (totals[kind, args.long] - totals[kind, args.short]) / span for _, kind in chosen}
    print(
        f"{CONNECTIONS} connections; instructions per round trip (client and server), the "
        f"difference between {args.long:,} and {args.short:,} round trips; --loop {args.loop}\n"
    )
    print(f"{'server':<44} {'instructions/rt':>16} {'echo/server':>12}")
    for name, kind in chosen:
        print(f"{name:<44} {per[kind]:>16,.0f} {per['echo'] / per[kind]:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
