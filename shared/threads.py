"""Running a blocking generator in a worker thread and consuming it from asyncio.

Native inference (llama.cpp) blocks while it decodes. `iterate_in_thread` runs a synchronous
generator in a worker thread and hands its items to the event loop as they come. When the
consumer stops early (a cancel, a deadline, a `break`), the producer is told to stop at its
next item and is waited for, so it never outlives its consumer; one still waiting for its
turn in the executor is dropped at once.

A model decodes one answer at a time, so each model has an executor of one thread of its own
(`model_executor`): answers waiting for it wait in that executor's queue, not in threads of
the default executor, which `asyncio.to_thread` (file and database writes) needs meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["iterate_in_thread", "model_executor"]

T = TypeVar("T")
_DONE = object()


def model_executor(name: str) -> ThreadPoolExecutor:
    """An executor of one thread, for one model's decoding."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


async def iterate_in_thread(
    produce: Callable[[threading.Event], Iterator[T]], *, executor: Executor | None = None
) -> AsyncGenerator[T, None]:
    """Items of `produce(stop)` as the worker yields them; `stop` is set when we stop early.
    The worker runs in `executor` (default: the loop's default executor).

    Exceptions raised by the producer are re-raised here, in the consumer.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()
    started = threading.Event()

    def run() -> None:
        started.set()
        if stop.is_set():
            return  # given up while it waited for its turn
        try:
            for item in produce(stop):
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, item)
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, _Raised(exc))

    worker = loop.run_in_executor(executor, run)
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
        if started.is_set():
            await asyncio.shield(worker)
        else:
            # Still queued: dropped now (or, starting meanwhile, it sees `stop` and returns).
            worker.cancel()


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
