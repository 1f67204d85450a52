"""Escalation round trips through the real cloud server, against a plain websockets echo server.

All servers run in this process on loopback and are driven by the same raw client: N
connections, each sending a request frame and waiting for one reply frame, as fast as it can.

- ours: `CloudService` (session machine, auth, scheduler, store writes) with a `ScriptedBackend`
  that answers at once (non-streaming escalations: one `escalate` in, one `result` out), on
  the cloud's own WebSocket transport (`cloud_agent.transport`: websockets' Sans-I/O protocol
  under an asyncio `Protocol`);
- baseline: a websockets server (its asyncio API) that echoes a reply of the same size for
  each frame;
- for the record of what the transport alone gives: the same echo on `cloud_agent.transport`;
- for the record of where the time goes: ours again with `DiscardingRecorder`, a bench double
  that drops interactions instead of storing them (the log is the largest single cost), and a
  codec-only server: websockets plus the protocol's decode and encode (an `escalate` validated
  in, a `result` built and encoded out) and nothing else. That is the floor of any server
  speaking protocol v1 with these libraries; the gap between it and ours is the session machine,
  auth, rate limits, scheduling, the privacy check, metrics and the log.

Once all are up, the heap built so far is frozen (`settle_heap`), for every server alike, as
`edgeloop cloud serve` does once started.

The machine is shared and its speed swings by half within seconds, so all the servers stay up
and are driven in turn, a short slice each (`--slice`), cycle after cycle (`--cycles`), each
cycle starting one server later: a slow spell falls on all of them alike. Our server's slice
ends when its interaction log has written what the slice produced. Prints, per server, round
trips per second, p50/p99 latency, the process CPU time per round trip (and how much of it the
kernel's) and the voluntary context switches per round trip, over all its slices;
then the ratio ours/echo (target: at least 0.5) over the whole run, with the median and range of
the ratios per cycle.

All run on the event loop `edgeloop cloud serve` takes (`--loop auto`: uvloop when installed);
`--loop asyncio` runs them on the standard library's.

    python -m bench.cloud_roundtrip [--connections 16] [--slice 1] [--cycles 10] [--loop auto]

`bench.cloud_instructions` counts the same servers' work in CPU instructions, which hold still.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from cloud_agent.backends import ScriptedBackend
from cloud_agent.config import EVENT_LOOPS, CloudConfig
from cloud_agent.recorder import InteractionRecorder, Record
from cloud_agent.service import CloudService, event_loop_factory, settle_heap
from cloud_agent.transport import WebSocket
from cloud_agent.transport import serve as serve_transport
from examples.handshake import Device
from protocol import SUBPROTOCOL, EnrollmentCredentials, Welcomed, encode
from protocol.messages import (
    Escalate,
    Result,
    decode,
)
from protocol.parts import (
    ChatMessage,
)
from shared import SigningKey


def escalate_frame(request_id: str) -> str:
    return encode(
        Escalate(
            request_id=request_id,
            messages=[ChatMessage(role="user", content="How do I waterproof my hiking boots?")],
            deadline_ms=10_000,
            max_tokens=32,
        )
    )


class Frames:
    """The `escalate` frame with a fresh request id for each send (a request id may not repeat
    while in flight, and interactions are stored per device and request id), made by splicing
    the id into one encoded frame: every server's client pays the same few hundred ns."""

    def __init__(self) -> None:
        mark = "REQUESTID"
        self._head, self._tail = escalate_frame(mark).split(mark)

    def __call__(self, request_id: str) -> str:
        return f"{self._head}{request_id}{self._tail}"


class DiscardingRecorder(InteractionRecorder):
    """Bench double: takes interactions and session events and stores nothing."""

    async def record(self, item: Record) -> None:
        pass


@dataclass
class Run:
    """Round trips through one server, summed over its slices."""

    seconds: float = 0.0
    cpu_s: float = 0.0
    system_s: float = 0.0
    """The part of `cpu_s` spent in the kernel."""
    switches: int = 0
    """Voluntary context switches of the process's threads: a thread waiting for another, as
    the event loop and the interaction log's thread do when they hand the GIL over."""
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        """Process CPU time per round trip (clients and server together), microseconds."""
        return self.per_rt(self.cpu_s) * 1e6

    def per_rt(self, value: float) -> float:
        return value / max(1, len(self.latencies))

    def add(self, other: Run) -> None:
        self.seconds += other.seconds
        self.cpu_s += other.cpu_s
        self.system_s += other.system_s
        self.switches += other.switches
        self.latencies += other.latencies


@dataclass
class Target:
    """A running server and the client connections that drive it."""

    sockets: list[ClientConnection]
    settle: Callable[[], Awaitable[None]] | None = None
    """Waits for work the server put off (our interaction log); counted in its slice."""


ids = itertools.count()
"""Request ids, unique over the whole run."""


async def drive(target: Target, frame: Frames, seconds: float) -> Run:
    """Each socket sends an `escalate`, waits for one reply, repeats until time is up; then
    the server settles."""
    latencies: list[float] = []
    started = time.perf_counter()
    stop_at = started + seconds
    cpu = time.process_time()
    usage = resource.getrusage(resource.RUSAGE_SELF)

    async def one(ws: ClientConnection, k: int) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await ws.send(frame(f"req_{k}_{next(ids)}"))
            await ws.recv()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(ws, k) for k, ws in enumerate(target.sockets)))
    if target.settle is not None:
        await target.settle()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Run(
        time.perf_counter() - started,
        time.process_time() - cpu,
        after.ru_stime - usage.ru_stime,
        after.ru_nvcsw - usage.ru_nvcsw,
        latencies,
    )


@contextlib.asynccontextmanager
async def serve_ours(n: int, *, keep_log: bool = True) -> AsyncIterator[tuple[Target, Result]]:
    """Our server with `n` enrolled devices connected, and the `result` it sent for a first
    request."""
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
            # The server, its escalations and its inbox (which asks whether an answer is
            # still unwritten) share one recorder.
            server = service.server
            server.recorder = server.escalations.recorder = server.inbox.recorder = (
                DiscardingRecorder(service.store)
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
            reply = decode(await _sample(devices[0].ws, escalate_frame("sample")))
            assert isinstance(reply, Result), reply
            yield Target([d.ws for d in devices], service.server.recorder.flush), reply
            for d in devices:
                await d.ws.close()
        finally:
            await service.stop()


async def _sample(ws: ClientConnection, frame: str) -> str:
    await ws.send(frame)
    data = await ws.recv()
    return data if isinstance(data, str) else data.decode()


SUBPROTOCOLS = [Subprotocol(SUBPROTOCOL)]


async def clients(port: int, n: int) -> list[ClientConnection]:
    """`n` raw client connections to a server on `port`, as every server's client makes them."""
    return [
        await connect(f"ws://127.0.0.1:{port}/v1", subprotocols=SUBPROTOCOLS, proxy=None,
                      compression=None)
        for _ in range(n)
    ]  # fmt: skip


def echo_handler(reply_size: int) -> Callable[[ServerConnection], Awaitable[None]]:
    reply = "x" * reply_size

    async def echo(ws: ServerConnection) -> None:
        async for _ in ws:
            await ws.send(reply)

    return echo


@dataclass(eq=False)
class TransportEcho:
    """The echo as a `cloud_agent.transport.Peer`."""

    ws: WebSocket
    reply: str

    def message(self, data: str | bytes) -> None:
        self.ws.send(self.reply)

    def closed(self) -> None:
        pass


@contextlib.asynccontextmanager
async def serve_transport_echo(reply_size: int, n: int) -> AsyncIterator[Target]:
    """The echo on the cloud's transport, with `n` connections to it."""
    reply = "x" * reply_size
    server = await serve_transport(
        lambda ws: TransportEcho(ws, reply), "127.0.0.1", 0, subprotocols=SUBPROTOCOLS
    )
    sockets = await clients(server.sockets[0].getsockname()[1], n)
    try:
        yield Target(sockets)
    finally:
        for ws in sockets:
            await ws.close()
        server.close()
        await server.wait_closed()


def codec_handler(reply: Result) -> Callable[[ServerConnection], Awaitable[None]]:
    async def answer(ws: ServerConnection) -> None:
        async for frame in ws:
            request = decode(frame)
            assert isinstance(request, Escalate)
            await ws.send(encode(reply.model_copy(update={"request_id": request.request_id})))

    return answer


@contextlib.asynccontextmanager
async def serve_plain(
    handler: Callable[[ServerConnection], Awaitable[None]], n: int
) -> AsyncIterator[Target]:
    """`handler` served by a bare websockets server, with `n` connections to it."""
    async with serve(
        handler, "127.0.0.1", 0, subprotocols=SUBPROTOCOLS, compression=None
    ) as server:
        sockets = await clients(next(iter(server.sockets)).getsockname()[1], n)
        yield Target(sockets)
        for ws in sockets:
            await ws.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


SERVERS = (
    ("websockets echo (baseline)", "echo"),
    ("  same echo, on the cloud's transport", "transport"),
    ("edgeloop cloud, ScriptedBackend", "ours"),
    ("  same, interaction log discarded (double)", "unlogged"),
    ("protocol codec only (floor)", "codec"),
)


async def main_async(args: argparse.Namespace) -> None:
    n = args.connections
    async with contextlib.AsyncExitStack() as stack:
        ours, sample = await stack.enter_async_context(serve_ours(n))
        unlogged, _ = await stack.enter_async_context(serve_ours(n, keep_log=False))
        size = len(encode(sample))
        targets = {
            "echo": await stack.enter_async_context(serve_plain(echo_handler(size), n)),
            "transport": await stack.enter_async_context(serve_transport_echo(size, n)),
            "ours": ours,
            "unlogged": unlogged,
            "codec": await stack.enter_async_context(serve_plain(codec_handler(sample), n)),
        }
        settle_heap()  # as `edgeloop cloud serve` does once started, for every server alike
        frame = Frames()
        totals = {key: Run() for key in targets}
        cycles: list[dict[str, Run]] = []
        keys = list(targets)
        for c in range(args.cycles):
            # Each cycle starts with the next server: no server always follows the same one.
            order = keys[c % len(keys) :] + keys[: c % len(keys)]
            cycle = {key: await drive(targets[key], frame, args.slice) for key in order}
            for key, run in cycle.items():
                totals[key].add(run)
            cycles.append(cycle)

    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(
        f"{n} connections; {args.cycles} cycles of {args.slice:g} s on each server in turn; "
        f"reply {size} bytes; event loop {loop}\n"
    )
    print(
        f"{'server':<44} {'round trips/s':>14} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/rt':>10} "
        f"{'of it sys':>10} {'switches/rt':>12}"
    )
    for name, key in SERVERS:
        run = totals[key]
        print(
            f"{name:<44} {run.rate:>14,.0f} {statistics.median(run.latencies) * 1000:>8.2f} "
            f"{pct(run.latencies, 0.99) * 1000:>8.2f} {run.cpu_us:>10.0f} "
            f"{run.per_rt(run.system_s) * 1e6:>10.0f} {run.per_rt(run.switches):>12.2f}"
        )
    print()
    for label, key, target in (
        ("ratio ours/echo", "ours", " (target >= 0.5)"),
        ("echo on the cloud's transport", "transport", ""),
        ("without storing interactions", "unlogged", ""),
        ("protocol codec only", "codec", ""),
    ):
        # Each cycle's ratio compares runs seconds apart, so the machine's drift cancels out.
        ratios = sorted(c[key].rate / c["echo"].rate for c in cycles)
        whole = totals[key].rate / totals["echo"].rate
        print(
            f"{label}: {whole:.2f}{target}; per cycle median {statistics.median(ratios):.2f}, "
            f"range {ratios[0]:.2f}-{ratios[-1]:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--slice", type=float, default=1.0, help="seconds on a server per turn")
    parser.add_argument("--cycles", type=int, default=10, help="turns of every server")
    parser.add_argument(
        "--loop",
        choices=EVENT_LOOPS,
        default="auto",
        help="event loop of every server and the clients (default: as `edgeloop cloud serve`)",
    )
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.connections < 1 or args.slice <= 0:
        parser.error("--cycles and --connections must be at least 1, --slice above 0")
    with asyncio.Runner(loop_factory=event_loop_factory(args.loop)) as runner:
        runner.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
