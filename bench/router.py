"""Router decision time over the dev workload, and where each class of request goes.

Decision time is the router alone (privacy scan, intent match, coverage, difficulty cues; no
model call; every text scanned as new), printed as p50/p99 against the time to merely
lower-case and split the same text (a floor measured in the same run). Target: p99 at most
1 ms. Then the routing table per workload class.

    python -m bench.router [--workload PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from edge_agent.privacy import Redactor
from edge_agent.router import IntentIndex, Router
from examples.kiosk.intents import KIOSK_INTENTS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workload", type=Path, default=SHARED / "northwind-workload-dev.jsonl")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    intents = IntentIndex()
    for name, examples in KIOSK_INTENTS.items():
        intents.add(name, examples)
    router = Router(intents)
    times, floor = [], []
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for round_ in range(args.rounds):
        # A new redactor each round: it keeps the findings of texts it has seen (a
        # conversation's earlier turns), and every request here is to be scanned as new.
        router.redactor = Redactor()
        for row in rows:
            t0 = time.perf_counter()
            decision = router.decide(row["text"])
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            row["text"].lower().split()
            floor.append(time.perf_counter() - t0)
            if round_ == 0:
                table[row["class"]][decision.target.value] += 1
    print(f"{len(rows)} requests x {args.rounds} rounds, {len(intents)} intent examples\n")
    p50, p99 = pct(times, 0.5) * 1e6, pct(times, 0.99) * 1e6
    print(f"router decision: p50 {p50:.0f} us, p99 {p99:.0f} us (target p99 <= 1000 us)")
    print(f"lower+split floor: p50 {pct(floor, 0.5) * 1e6:.1f} us")
    targets = ["local", "local_only", "local_fallback", "cloud"]
    print(f"\n{'class':<16}" + "".join(f"{t:>16}" for t in targets))
    for cls in sorted(table):
        print(f"{cls:<16}" + "".join(f"{table[cls][t]:>16}" for t in targets))
    total = sum(sum(c.values()) for c in table.values())
    local = sum(c[t] for c in table.values() for t in targets[:3])
    share = f"{local}/{total} = {local / total:.1%}"
    print(f"\nkept on the device: {share} (threshold {router.threshold})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
