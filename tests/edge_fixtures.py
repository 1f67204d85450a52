"""Helpers: the packaged model kept small for tests, an edge agent's local OpenAI-compatible
endpoint served on loopback, and a loopback port nothing listens on."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import uvicorn
from starlette.types import ASGIApp

from edge_agent.agent import EdgeAgent
from edge_agent.http import build_openai_app
from edge_agent.local_model import DeviceProfile, LocalModel, RuntimeSettings


def small_model() -> LocalModel:
    settings = RuntimeSettings(threads=2, n_ctx=1024, max_tokens=8)
    return LocalModel(profile=DeviceProfile(cores=2, memory_mb=4096), settings=settings)


@contextlib.asynccontextmanager
async def serving_asgi(app: ASGIApp) -> AsyncIterator[str]:
    """`app` under uvicorn on a free port of 127.0.0.1; its root URL (`http://127.0.0.1:PORT`)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def serving(agent: EdgeAgent) -> AsyncIterator[str]:
    """`agent`'s local endpoint on a free port of 127.0.0.1; its base URL (`.../v1`)."""
    async with serving_asgi(build_openai_app(agent)) as root:
        yield f"{root}/v1"


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound for a moment, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
