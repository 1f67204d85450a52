"""Decode+validate and encode throughput of the common protocol messages.

For each message type, measures our `decode` (pydantic `validate_json` into the discriminated
union, with the size check) and `encode` against plain `json.loads` / `json.dumps` of the very
same frames, in the same run, and prints messages/s and the ratio ours/plain (1.0 = as fast as
parsing JSON without any validation).

    python -m bench.protocol_codec [--seconds 0.5] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

from protocol import Delta, decode, encode
from protocol.examples import EXAMPLES

COMMON = ["escalate", "delta", "result", "feedback", "ack", "error", "cancel"]


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of `fn`, timed over about `seconds` in batches."""
    batch, calls, start = 256, 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(batch):
            fn()
        calls += batch
    return calls / elapsed


def best_of(fn: Callable[[], object], seconds: float, repeat: int) -> float:
    # The machine is shared and noisy: the best of several runs is the least disturbed one.
    return max(rate(fn, seconds) for _ in range(repeat))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=0.3, help="time per measurement")
    parser.add_argument("--repeat", type=int, default=5, help="measurements per figure (best kept)")
    args = parser.parse_args(argv)

    messages = {tag: EXAMPLES[tag] for tag in COMMON}
    messages["delta (512 chars)"] = Delta(request_id="req_1", seq=7, text="token " * 85)
    print(f"{'message':<18} {'bytes':>6} {'decode/s':>10} {'loads/s':>10} {'ratio':>6}"
          f" {'encode/s':>10} {'dumps/s':>10} {'ratio':>6}")  # fmt: skip
    dec_ratios, enc_ratios = [], []
    for tag, message in messages.items():
        frame = encode(message)
        obj = json.loads(frame)
        ours_dec = best_of(partial(decode, frame, max_bytes=1 << 20), args.seconds, args.repeat)
        plain_dec = best_of(partial(json.loads, frame), args.seconds, args.repeat)
        ours_enc = best_of(partial(encode, message), args.seconds, args.repeat)
        plain_enc = best_of(
            partial(json.dumps, obj, separators=(",", ":")), args.seconds, args.repeat
        )
        dec_ratios.append(ours_dec / plain_dec)
        enc_ratios.append(ours_enc / plain_enc)
        print(
            f"{tag:<18} {len(frame):>6} {ours_dec:>10,.0f} {plain_dec:>10,.0f} "
            f"{ours_dec / plain_dec:>6.2f} {ours_enc:>10,.0f} {plain_enc:>10,.0f} "
            f"{ours_enc / plain_enc:>6.2f}"
        )
    dec, enc = statistics.geometric_mean(dec_ratios), statistics.geometric_mean(enc_ratios)
    print(f"\ngeometric mean, ours / plain json: decode+validate {dec:.2f}, encode {enc:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
