"""Escalation round trips through the real cloud server, against a plain websockets echo server.

Both servers run in this process on loopback and are driven by the same raw client: N
connections, each sending a request frame and waiting for one reply frame, as fast as it can.

- ours: `CloudService` (session machine, auth, scheduler, store writes) with a `ScriptedBackend`
  that answers at once (non-streaming escalations: one `escalate` in, one `result` out);
- baseline: a websockets server that echoes a reply of the same size for each frame;
- for the record of where the time goes: ours again with `DiscardingRecorder`, a bench double
  that drops interactions instead of storing them (the log is the largest single cost), and a
  codec-only server: websockets plus the protocol's decode and encode (an `escalate` validated
  in, a `result` built and encoded out) and nothing else. That is the floor of any server
  speaking protocol v1 with these libraries; the gap between it and ours is the session machine,
  auth, rate limits, scheduling, the privacy check, metrics and the log.

Before each run the heap built so far is frozen (`settle_heap`), for every server alike, as
`edgeloop cloud serve` does once started.

Prints round trips per second, p50/p99 latency and the process CPU time per round trip (steadier
than throughput on a shared machine) for each, and the ratio ours/echo (target: at least 0.5).

    python -m bench.cloud_roundtrip [--connections 16] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from cloud_agent.backends import ScriptedBackend
from cloud_agent.config import CloudConfig
from cloud_agent.recorder import InteractionRecorder, Record
from cloud_agent.service import CloudService, settle_heap
from examples.handshake import Device
from protocol import SUBPROTOCOL, EnrollmentCredentials, Welcomed, encode
from protocol.messages import ChatMessage, Escalate, Result, decode
from shared import SigningKey


def escalate_frame(i: int) -> str:
    return encode(
        Escalate(
            request_id=f"req_{i}",
            messages=[ChatMessage(role="user", content="How do I waterproof my hiking boots?")],
            deadline_ms=10_000,
            max_tokens=32,
        )
    )


class DiscardingRecorder(InteractionRecorder):
    """Bench double: takes interactions and session events and stores nothing."""

    async def record(self, item: Record) -> None:
        pass


@dataclass
class Run:
    rate: float
    latencies: list[float]
    cpu_us: float
    """Process CPU time per round trip (clients and server together), microseconds."""


async def drive(sockets: list[ClientConnection], frames: list[list[str]], seconds: float) -> Run:
    """Each socket sends its next frame, waits for one reply, repeats until time is up."""
    settle_heap()  # as `edgeloop cloud serve` does once started, for every server alike
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    cpu = time.process_time()

    async def one(ws: ClientConnection, own: list[str]) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await ws.send(own[i % len(own)])
            await ws.recv()
            latencies.append(time.perf_counter() - t0)
            i += 1

    await asyncio.gather(*(one(ws, f) for ws, f in zip(sockets, frames, strict=True)))
    cpu_us = (time.process_time() - cpu) / max(1, len(latencies)) * 1e6
    return Run(len(latencies) / seconds, latencies, cpu_us)


async def bench_ours(n: int, seconds: float, *, keep_log: bool = True) -> tuple[Run, Result]:
    """Our server's run, and the `result` it sent for the first request."""
    with tempfile.TemporaryDirectory() as tmp:
        config = CloudConfig.model_validate(
            {
                "data_dir": Path(tmp),
                "port": 0,
                "admin_port": 0,
                "capacity": 64,
                "limits": {"max_requests_per_minute": 10**6},
            }
        )
        service = await CloudService.create(
            config, backend=ScriptedBackend("Use wax, then dry.", keep_calls=False)
        )
        if not keep_log:
            # The server and its inbox (which asks whether an answer is still unwritten)
            # share one recorder.
            service.server.recorder = service.server.inbox.recorder = DiscardingRecorder(
                service.store
            )
        await service.start()
        try:
            url = f"ws://127.0.0.1:{service.port}/v1"
            devices = []
            for _ in range(n):
                token = await service.store.create_enrollment_token()
                device = await Device.connect(
                    url, EnrollmentCredentials(token, SigningKey.generate())
                )
                assert isinstance(await device.next_event(Welcomed), Welcomed)
                devices.append(device)
            # Unique request ids per connection: a request id may not repeat while in flight,
            # and interactions are stored per (device, request id).
            frames = [[escalate_frame(k * 1_000_000 + i) for i in range(20_000)] for k in range(n)]
            reply = decode(await _sample(devices[0].ws, frames[0][0]))
            assert isinstance(reply, Result), reply
            frames = [f[1:] for f in frames]
            run = await drive([d.ws for d in devices], frames, seconds)
            for d in devices:
                await d.ws.close()
        finally:
            await service.stop()
    return run, reply


async def _sample(ws: ClientConnection, frame: str) -> str:
    await ws.send(frame)
    data = await ws.recv()
    return data if isinstance(data, str) else data.decode()


async def bench_echo(n: int, seconds: float, reply_size: int) -> Run:
    reply = "x" * reply_size

    async def echo(ws: ServerConnection) -> None:
        async for _ in ws:
            await ws.send(reply)

    return await _bench_plain(echo, n, seconds)


async def bench_codec(n: int, seconds: float, reply: Result) -> Run:
    async def answer(ws: ServerConnection) -> None:
        async for frame in ws:
            request = decode(frame)
            assert isinstance(request, Escalate)
            await ws.send(encode(reply.model_copy(update={"request_id": request.request_id})))

    return await _bench_plain(answer, n, seconds)


async def _bench_plain(
    handler: Callable[[ServerConnection], Awaitable[None]], n: int, seconds: float
) -> Run:
    """`handler` served by a bare websockets server, driven like ours."""
    subprotocols = [Subprotocol(SUBPROTOCOL)]
    async with serve(
        handler, "127.0.0.1", 0, subprotocols=subprotocols, compression=None
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        sockets = [
            await connect(f"ws://127.0.0.1:{port}/v1", subprotocols=subprotocols, proxy=None,
                          compression=None)
            for _ in range(n)
        ]  # fmt: skip
        frames = [[escalate_frame(i)] for i in range(n)]
        run = await drive(sockets, frames, seconds)
        for ws in sockets:
            await ws.close()
    return run


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main_async(args: argparse.Namespace) -> None:
    ours, sample = await bench_ours(args.connections, args.seconds)
    size = len(encode(sample))
    echo = await bench_echo(args.connections, args.seconds, size)
    unlogged, _ = await bench_ours(args.connections, args.seconds, keep_log=False)
    codec = await bench_codec(args.connections, args.seconds, sample)
    print(f"{args.connections} connections, {args.seconds:.0f} s each, reply {size} bytes\n")
    print(f"{'server':<44} {'round trips/s':>14} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/rt':>10}")
    for name, run in (
        ("websockets echo (baseline)", echo),
        ("edgeloop cloud, ScriptedBackend", ours),
        ("  same, interaction log discarded (double)", unlogged),
        ("protocol codec only (floor)", codec),
    ):
        print(
            f"{name:<44} {run.rate:>14,.0f} {statistics.median(run.latencies) * 1000:>8.2f} "
            f"{pct(run.latencies, 0.99) * 1000:>8.2f} {run.cpu_us:>10.0f}"
        )
    print(f"\nratio ours/echo: {ours.rate / echo.rate:.2f} (target >= 0.5)")
    print(f"without storing interactions: {unlogged.rate / echo.rate:.2f}")
    print(f"protocol codec only: {codec.rate / echo.rate:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
