"""The agent for apps without an event loop: `BlockingEdgeAgent` runs an `EdgeAgent` on a loop
of its own in a background thread, with the same calls, returning plainly."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from edge_agent.agent import Conversation, EdgeAgent, Rating, Reply, ReplyStream, Turn
from edge_agent.router import RouteDecision, Target

__all__ = ["BlockingConversation", "BlockingEdgeAgent", "BlockingReplyStream"]

T = TypeVar("T")


class BlockingEdgeAgent:
    """The same agent for apps without an event loop: it runs one in a background thread."""

    def __init__(self, agent: EdgeAgent) -> None:
        self.agent = agent
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._streams: weakref.WeakSet[BlockingReplyStream] = weakref.WeakSet()
        self._call(agent.start())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def ask(
        self,
        text: str,
        *,
        history: Sequence[Turn] = (),
        override: Target | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | str = (),
    ) -> Reply:
        return self._call(
            self.agent.ask(
                text, history=history, override=override, max_tokens=max_tokens, stop=stop
            )
        )

    def stream(
        self,
        text: str,
        *,
        history: Sequence[Turn] = (),
        override: Target | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | str = (),
    ) -> BlockingReplyStream:
        """`ask`, piece by piece, for a UI that shows the answer as it comes (see
        `BlockingReplyStream`)."""
        return BlockingReplyStream(
            self,
            self.agent.stream(
                text, history=history, override=override, max_tokens=max_tokens, stop=stop
            ),
        )

    def feedback(self, request_id: str, rating: Rating, correction: str | None = None) -> None:
        self._call(self.agent.feedback(request_id, rating, correction))

    def conversation(self, *, max_turns: int = 8) -> BlockingConversation:
        """A conversation that remembers its turns (see `Conversation`)."""
        return BlockingConversation(self, self.agent.conversation(max_turns=max_turns))

    def close(self) -> None:
        # Streams left open are given up first (decoding stops), while the loop still runs.
        for stream in list(self._streams):
            stream.close()
        self._call(self.agent.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class BlockingReplyStream:
    """`ReplyStream` for apps without an event loop: iterate for the text pieces as they are
    produced; `reply` is set once they are all read. `close()` (or leaving a ``with`` block)
    gives the answer up: the local model stops decoding and a cloud request is cancelled."""

    def __init__(self, blocking: BlockingEdgeAgent, stream: ReplyStream) -> None:
        self._blocking = blocking
        self._stream = stream
        self.request_id = stream.request_id
        blocking._streams.add(self)

    @property
    def decision(self) -> RouteDecision:
        """Where the request is answered, and why (routed on first use)."""
        return self._blocking._call(self._stream.start())

    @property
    def reply(self) -> Reply | None:
        return self._stream.reply

    def __iter__(self) -> BlockingReplyStream:
        return self

    def __next__(self) -> str:
        async def step() -> str | None:
            return await anext(self._stream, None)

        piece = self._blocking._call(step())
        if piece is None:
            raise StopIteration
        return piece

    def collect(self) -> Reply:
        """Read the rest; the `Reply`."""
        return self._blocking._call(self._stream.collect())

    def close(self) -> None:
        self._blocking._call(self._stream.aclose())

    def __enter__(self) -> BlockingReplyStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BlockingConversation:
    """`Conversation` for apps without an event loop (`BlockingEdgeAgent.conversation`)."""

    def __init__(self, blocking: BlockingEdgeAgent, conversation: Conversation) -> None:
        self._blocking = blocking
        self.conversation = conversation

    @property
    def turns(self) -> list[Turn]:
        return self.conversation.turns

    def ask(
        self,
        text: str,
        *,
        override: Target | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | str = (),
    ) -> Reply:
        return self._blocking._call(
            self.conversation.ask(text, override=override, max_tokens=max_tokens, stop=stop)
        )

    def stream(
        self,
        text: str,
        *,
        override: Target | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | str = (),
    ) -> BlockingReplyStream:
        """`ask`, piece by piece; the answer is remembered once it is all read."""
        return BlockingReplyStream(
            self._blocking,
            self.conversation.stream(text, override=override, max_tokens=max_tokens, stop=stop),
        )

    def clear(self) -> None:
        self.conversation.clear()
