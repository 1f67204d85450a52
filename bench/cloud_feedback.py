"""Acknowledged feedback per second when many devices send at once, as after an outage, when
every device's outbox resends what it kept.

Runs a `CloudService` (SQLite, the default store) in this process; N devices each send F
feedback messages, one at a time, waiting for each ack (the edge outbox's way). Feedback is
acknowledged only after the commit that stores it. Compared in the same run:

- batched: the server as it ships; feedback arriving while a commit runs shares the next one;
- one commit each: the same server with batches of one (the baseline).

Negative ratings are only stored; positive ones also look up the rated answer to learn from it.

    python -m bench.cloud_feedback [--devices 100] [--each 10]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from cloud_agent.backends import ScriptedBackend
from cloud_agent.config import CloudConfig
from cloud_agent.service import CloudService
from examples.handshake import Device
from protocol import AckReceived, EnrollmentCredentials, Feedback, Welcomed
from shared import SigningKey


async def run(devices: int, each: int, rating: str, *, batch: int | None) -> tuple[float, float]:
    """Acks per second and process CPU per ack (ms)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = CloudConfig.model_validate(
            {"data_dir": Path(tmp), "port": 0, "admin_port": 0,
             "limits": {"max_requests_per_minute": 10**6}}
        )  # fmt: skip
        service = await CloudService.create(config, backend=ScriptedBackend("x", keep_calls=False))
        if batch is not None:
            service.server.inbox._feedback.max_batch = batch  # the baseline: commits of one
        await service.start()
        try:
            url = f"ws://127.0.0.1:{service.port}/v1"
            fleet = []
            for _ in range(devices):
                token = await service.store.create_enrollment_token()
                device = await Device.connect(
                    url, EnrollmentCredentials(token, SigningKey.generate())
                )
                assert isinstance(await device.next_event(Welcomed), Welcomed)
                fleet.append(device)

            async def resend(k: int, device: Device) -> None:
                for i in range(each):
                    key = f"fb_{k}_{i}"
                    await device.send(
                        Feedback(idempotency_key=key, request_id=f"req_{i}", rating=rating)
                    )
                    ack = await device.next_event(AckReceived)
                    assert isinstance(ack, AckReceived) and ack.ack.idempotency_key == key

            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(resend(k, d) for k, d in enumerate(fleet)))
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            summary = await service.store.feedback_summary()
            assert summary.positive + summary.negative == devices * each
            for device in fleet:
                await device.close()
        finally:
            await service.stop()
    n = devices * each
    return n / elapsed, cpu / n * 1000


async def main_async(args: argparse.Namespace) -> None:
    n = args.devices * args.each
    print(f"{args.devices} devices sending {args.each} feedback messages each ({n} acks)\n")
    print(f"{'rating':<10} {'commits':<16} {'acks/s':>8} {'CPU ms/ack':>11}")
    for rating in ("negative", "positive"):
        alone = await run(args.devices, args.each, rating, batch=1)
        batched = await run(args.devices, args.each, rating, batch=None)
        for name, (rate, cpu) in (("one each", alone), ("batched", batched)):
            print(f"{rating:<10} {name:<16} {rate:>8,.0f} {cpu:>11.2f}")
        print(f"{'':<10} {'ratio batched/one each':<27} {batched[0] / alone[0]:.1f}x\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--each", type=int, default=10)
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
