"""Memory per idle authenticated session, and the time to connect them all.

Starts `edgeloop cloud serve` as a child process (its own interpreter, so its memory is its
own), enrolls N devices directly in its store, then opens N WebSocket sessions from this
process, each completing hello, challenge and auth. Reports the server's resident memory growth
per session (target: at most 64 KiB) and the connection time, against a plain websockets server
holding the same number of idle connections (also a child process, on the same event loop) in
the same run.

    python -m bench.cloud_sessions [--sessions 5000] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert
from websockets.asyncio.client import ClientConnection, connect

from cloud_agent.store import Store
from cloud_agent.store.store import sqlite_url
from cloud_agent.store.tables import Device as DeviceRow
from protocol import SUBPROTOCOL, ClientSession, DeviceCredentials, TextFrame, Welcomed
from shared import SigningKey


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def wait_for_line(proc: subprocess.Popen[str], marker: str) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while True:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                raise RuntimeError(f"server exited: {proc.poll()}")
            if marker in line:
                return line


async def enroll_devices(data_dir: Path, n: int) -> list[DeviceCredentials]:
    store = await Store.open(sqlite_url(data_dir / "cloud.db"))
    creds, rows = [], []
    now = datetime.now(UTC)
    for i in range(n):
        key = SigningKey.generate()
        creds.append(DeviceCredentials(f"dev_bench_{i:05d}", key))
        rows.append(
            {"id": f"dev_bench_{i:05d}", "public_key": key.verify_key().b64(), "name": None,
             "created_at": now, "privacy_violations": 0}
        )  # fmt: skip
    async with store.engine.begin() as conn:
        await conn.execute(insert(DeviceRow), rows)
    await store.close()
    return creds


async def _connect(url: str) -> ClientConnection:
    return await connect(
        url, subprotocols=[SUBPROTOCOL], proxy=None, compression=None,  # type: ignore[list-item]
        ping_interval=None, open_timeout=60,
    )  # fmt: skip


async def open_sessions(
    url: str, creds: list[DeviceCredentials], concurrency: int
) -> list[ClientConnection]:
    slots = asyncio.Semaphore(concurrency)
    sockets: list[ClientConnection] = []

    async def one(c: DeviceCredentials) -> None:
        async with slots:
            ws = await _connect(url)
            session = ClientSession(c, sdk="bench/1")
            session.start()
            while not session.is_open:
                for frame in session.data_to_send():
                    if isinstance(frame, TextFrame):
                        await ws.send(frame.data)
                data = await ws.recv()
                session.receive_text(data)
                if session.closed:
                    raise RuntimeError(f"session refused: {session.events_received()}")
            assert any(isinstance(e, Welcomed) for e in session.events_received())
            sockets.append(ws)

    await asyncio.gather(*(one(c) for c in creds))
    return sockets


ECHO_SERVER = textwrap.dedent(
    """
    import asyncio, resource, sys
    from websockets.asyncio.server import serve
    from cloud_agent.service import event_loop_factory
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    async def echo(ws):
        async for m in ws:
            await ws.send(m)
    async def main():
        async with serve(echo, "127.0.0.1", 0, subprotocols=["edgeloop.v1"], compression=None) as s:
            print("listening", s.sockets[0].getsockname()[1], flush=True)
            await asyncio.Future()
    # The event loop `edgeloop cloud serve` runs on, as the server compared.
    with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:
        runner.run(main())
    """
)


async def plain_connections(url: str, n: int, concurrency: int) -> list[ClientConnection]:
    slots = asyncio.Semaphore(concurrency)
    sockets: list[ClientConnection] = []

    async def one() -> None:
        async with slots:
            ws = await _connect(url)
            await ws.send("hello")
            await ws.recv()
            sockets.append(ws)

    await asyncio.gather(*(one() for _ in range(n)))
    return sockets


async def settle(pid: int) -> int:
    await asyncio.sleep(1.0)
    return rss_kib(pid)


async def main_async(args: argparse.Namespace) -> None:
    raise_fd_limit()
    n = args.sessions
    results = {}
    # Baseline: plain websockets, same number of idle connections.
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int((await wait_for_line(echo, "listening")).split()[1])
        before = await settle(echo.pid)
        started = time.perf_counter()
        sockets = await plain_connections(f"ws://127.0.0.1:{port}/", n, args.concurrency)
        elapsed = time.perf_counter() - started
        after = await settle(echo.pid)
        results["websockets echo (baseline)"] = (elapsed, (after - before) / n)
        for ws in sockets:
            ws.transport.abort()
    finally:
        echo.kill()
        echo.wait()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        creds = await enroll_devices(data, n)
        env = dict(os.environ, EDGELOOP_CLOUD__LIMITS__AUTH_TIMEOUT_S="120")
        server = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "cloud", "serve", "--data-dir", str(data),
             "--port", "0", "--admin-port", "0"],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            line = await wait_for_line(server, "edgeloop cloud agent:")
            url = line.split()[-1]
            before = await settle(server.pid)
            started = time.perf_counter()
            sockets = await open_sessions(url, creds, args.concurrency)
            elapsed = time.perf_counter() - started
            after = await settle(server.pid)
            results["edgeloop cloud (authenticated)"] = (elapsed, (after - before) / n)
            for ws in sockets:
                ws.transport.abort()
        finally:
            server.terminate()
            try:
                # Each closed session is one fsync'd store write on the way out: give it time.
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    print(f"{n} idle sessions, {args.concurrency} connecting at a time\n")
    print(f"{'server':<32} {'connect all s':>13} {'sessions/s':>11} {'KiB/session':>12}")
    for name, (elapsed, kib) in results.items():
        print(f"{name:<32} {elapsed:>13.1f} {n / elapsed:>11.0f} {kib:>12.1f}")
    ours = results["edgeloop cloud (authenticated)"][1]
    base = results["websockets echo (baseline)"][1]
    print(
        f"\nmemory per session: {ours:.1f} KiB (target <= 64), "
        f"{ours / base:.2f}x a plain websockets connection"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=200)
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
