"""The fleet's routing (`Store.routing_summary`, behind `/v1/routing` and `edgeloop cloud
routing`) over many device reports, summed by the database, against reading every report of
the window and summing in Python (what the store did before reports kept their counts in
columns and their reasons in a table of their own).

Fills a SQLite store (the default) with `--devices` devices reporting every 5 minutes for
`--days` days, each report with a few of the router's reasons, then asks for the last day and for
the whole time, `--repeat` times each, and prints the median time of each way and the ratio.
Both ways' totals are checked to agree.

    python -m bench.routing_summary [--devices 200] [--days 7] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

from sqlalchemy import select

from cloud_agent.store import NewReport, RouteCounts, Store, tables
from cloud_agent.store.store import sqlite_url

T = TypeVar("T")
PERIOD = timedelta(minutes=5)
REASONS = ("intent.greet", "coverage.match", "difficulty.high", "privacy.card", "link.down",
           "cloud.overloaded", "difficulty.low", "privacy.national_id")  # fmt: skip


async def fill(store: Store, devices: int, days: float, now: datetime) -> int:
    rng = random.Random(7)
    for d in range(devices):
        token = await store.create_enrollment_token()
        await store.enroll_device(token, f"dev_{d}", f"{d:043d}")
    periods = int(timedelta(days=days) / PERIOD)
    batch: list[NewReport] = []
    for p in range(periods):
        end = now - p * PERIOD
        for d in range(devices):
            routes = RouteCounts(*(rng.randint(0, 9) for _ in range(4)))
            reasons = {r: rng.randint(1, 9) for r in rng.sample(REASONS, 3)}
            body = {"period_start": (end - PERIOD).isoformat(), "period_end": end.isoformat(),
                    "routes": {"local": routes.local, "cloud": routes.cloud,
                               "local_only": routes.local_only,
                               "local_fallback": routes.local_fallback},
                    "reasons": reasons, "adapter_version": p % 3 or None}  # fmt: skip
            batch.append(NewReport(f"dev_{d}", f"r{p}_{d}", body, end - PERIOD, end, routes,
                                   p % 3 or None))  # fmt: skip
        if len(batch) >= 2000 or p == periods - 1:
            await store.add_report_batch(batch)
            batch = []
    return periods * devices


async def from_bodies(store: Store, since: datetime) -> tuple[int, Counter[str], Counter[str]]:
    """The baseline: every report of the window read, its message summed in Python."""
    routes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    reports = 0
    async with store.engine.connect() as conn:
        rows = await conn.stream(
            select(tables.Report.body).where(tables.Report.period_end >= since)
        )
        async for (body,) in rows:
            reports += 1
            routes.update(body["routes"])
            reasons.update(body["reasons"])
    return reports, routes, reasons


async def timed(work: Callable[[], Awaitable[T]], repeat: int) -> tuple[float, T]:
    """The median seconds of `repeat` runs of `work`, and what it returned."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = await work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = await Store.open(sqlite_url(Path(tmp) / "cloud.db"))
        try:
            now = datetime.now(UTC)
            started = time.perf_counter()
            total = await fill(store, args.devices, args.days, now)
            took = time.perf_counter() - started
            print(f"{total:,} reports from {args.devices} devices over {args.days:g} days "
                  f"(every 5 minutes), stored in {took:.0f} s\n")  # fmt: skip
            print(f"{'window':<10} {'reports':>10} {'database ms':>12} {'Python ms':>10} "
                  f"{'ratio':>7}")  # fmt: skip
            for label, since in (("last day", now - timedelta(days=1)),
                                 ("all", now - timedelta(days=args.days + 1))):  # fmt: skip
                ours, summary = await timed(partial(store.routing_summary, since), args.repeat)
                base, (reports, routes, reasons) = await timed(
                    partial(from_bodies, store, since), args.repeat
                )
                assert summary.reports == reports, (summary.reports, reports)
                assert summary.routes.total == sum(routes.values())
                assert summary.reasons == dict(reasons)  # all 8 reasons: within the top 20
                print(f"{label:<10} {reports:>10,} {ours * 1000:>12.1f} {base * 1000:>10.1f} "
                      f"{ours / base:>6.2f}x")  # fmt: skip
        finally:
            await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if args.devices < 1 or args.days <= 0 or args.repeat < 1:
        parser.error("--devices and --repeat must be at least 1, --days above 0")
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
