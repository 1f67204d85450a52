"""Running a blocking generator in a worker thread and consuming it from asyncio.

Native inference (llama.cpp) blocks while it decodes. `iterate_in_thread` runs a synchronous
generator in the default executor and hands its items to the event loop as they come. When
the consumer stops early (a cancel, a deadline, a `break`), the producer is told to stop at
its next item and is waited for, so it never outlives its consumer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import TypeVar

__all__ = ["iterate_in_thread"]

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(
    produce: Callable[[threading.Event], Iterator[T]],
) -> AsyncGenerator[T, None]:
    """Items of `produce(stop)` as the worker yields them; `stop` is set when we stop early.

    Exceptions raised by the producer are re-raised here, in the consumer.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in produce(stop):
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, item)
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, _Raised(exc))

    worker = loop.run_in_executor(None, run)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        await asyncio.shield(worker)


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
