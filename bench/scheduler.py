"""Online latency under an offline flood: our scheduler against plain FIFO, in one run.

A simulated backend serves `capacity` calls at once, each taking `service` seconds. Online
requests arrive as a Poisson stream at `load` x capacity; an offline flood of `jobs` items is
queued at the start. Three runs are printed side by side:

- online alone (the baseline for latency),
- online + flood under `Scheduler` (online first, offline in the gaps with a reserve),
- online + flood under FIFO (one queue in arrival order), for contrast;

plus the offline flood alone (the baseline for offline throughput). Targets: online p99 under
our scheduler at most 1.2x the online-alone p99, while offline work completes at least half
as fast as alone.

    python -m bench.scheduler [--capacity 16] [--service 0.02] [--load 0.3] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from cloud_agent.scheduler import Scheduler


class Fifo:
    """The contrast: every call waits its turn in one queue, whatever its lane."""

    def __init__(self, capacity: int) -> None:
        self._slots = asyncio.Semaphore(capacity)

    @asynccontextmanager
    async def slot(self, lane: str, *, deadline: float | None = None) -> AsyncIterator[None]:
        async with self._slots:
            yield


class Backend:
    """Serves `capacity` calls at once; more would only queue inside it. A call takes the
    mean service time times a factor drawn from [0.5, 1.5): LLM answers vary in length."""

    def __init__(self, capacity: int, service: float, seed: int) -> None:
        self.service = service
        self._rng = random.Random(seed)
        self._gpu = asyncio.Semaphore(capacity)

    async def call(self) -> None:
        async with self._gpu:
            await asyncio.sleep(self.service * (0.5 + self._rng.random()))


SlotSource = Scheduler | Fifo


async def run(
    make: type[SlotSource] | None,
    capacity: int,
    service: float,
    load: float,
    seconds: float,
    jobs: int,
    online: bool,
    seed: int,
) -> tuple[list[float], int]:
    """Returns (online latencies, offline items finished within `seconds`)."""
    loop = asyncio.get_running_loop()
    backend = Backend(capacity, service, seed + 1)
    slots: SlotSource = (
        Scheduler(capacity, clock=loop.time) if make is Scheduler else Fifo(capacity)
    )
    latencies: list[float] = []
    offline_done: list[float] = []
    start = loop.time()

    async def online_request() -> None:
        t0 = loop.time()
        slot: AbstractAsyncContextManager[None] = slots.slot("online", deadline=t0 + 60)
        async with slot:
            await backend.call()
        latencies.append(loop.time() - t0)

    async def offline_item() -> None:
        async with slots.slot("offline"):
            await backend.call()
        offline_done.append(loop.time() - start)

    flood = [asyncio.create_task(offline_item()) for _ in range(jobs)]
    if jobs:
        # Let the flood get going before the online stream starts: the arrivals' clock must
        # not fall behind while thousands of tasks start, or they would come in one burst.
        await asyncio.sleep(0.25)
        start = loop.time()
        offline_done.clear()
    arrivals = []
    if online:
        rng = random.Random(seed)
        rate = load * capacity / service
        t = 0.0
        while t < seconds:
            await asyncio.sleep(max(0.0, start + t - loop.time()))
            arrivals.append(asyncio.create_task(online_request()))
            t += rng.expovariate(rate)
    else:
        await asyncio.sleep(seconds)
    await asyncio.gather(*arrivals)
    finished = sum(1 for done in offline_done if done <= seconds)
    for task in flood:  # the rest of the flood is not needed for the figures
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    return latencies, finished


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main_async(args: argparse.Namespace) -> None:
    common = dict(capacity=args.capacity, service=args.service, load=args.load, seed=args.seed)
    jobs = int(2 * args.seconds * args.capacity / args.service)  # outlasts the online period
    secs = args.seconds
    alone, _ = await run(Scheduler, seconds=secs, jobs=0, online=True, **common)
    _, offline_alone = await run(Scheduler, seconds=secs, jobs=jobs, online=False, **common)
    ours, ours_offline = await run(Scheduler, seconds=secs, jobs=jobs, online=True, **common)
    fifo, fifo_offline = await run(Fifo, seconds=secs, jobs=jobs, online=True, **common)
    base_p99 = pct(alone, 0.99)
    print(
        f"capacity {args.capacity}, service {args.service * 1000:.0f} ms +-50%, online load "
        f"{args.load:.0%} of capacity for {secs:.0f} s, offline flood of {jobs} items queued\n"
    )
    header = f"{'run':<28} {'online n':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99/alone':>9}"
    print(header + f" {'offline/s':>10} {'vs alone':>9}")
    for name, lat, done in (
        ("online alone", alone, None),
        ("offline alone", [], offline_alone),
        ("online + flood, scheduler", ours, ours_offline),
        ("online + flood, FIFO", fifo, fifo_offline),
    ):
        row = f"{name:<28} {len(lat):>8}"
        if lat:
            p99 = pct(lat, 0.99)
            row += (
                f" {statistics.median(lat) * 1000:>8.1f} {p99 * 1000:>8.1f} {p99 / base_p99:>8.2f}x"
            )
        else:
            row += f" {'':>8} {'':>8} {'':>9}"
        if done is not None:
            row += f" {done / secs:>10.0f} {done / offline_alone:>8.2f}x"
        print(row)
    print(
        f"\nscheduler: online p99 {pct(ours, 0.99) / base_p99:.2f}x alone (target <= 1.2), "
        f"offline throughput {ours_offline / offline_alone:.2f}x alone (target >= 0.5); "
        f"FIFO: online p99 {pct(fifo, 0.99) / base_p99:.1f}x alone"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--capacity", type=int, default=16, help="backend slots (batch size)")
    parser.add_argument("--service", type=float, default=0.02, help="seconds per backend call")
    parser.add_argument("--load", type=float, default=0.3, help="online load, share of capacity")
    parser.add_argument("--seconds", type=float, default=6.0, help="online arrivals for this long")
    parser.add_argument("--seed", type=int, default=7)
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
