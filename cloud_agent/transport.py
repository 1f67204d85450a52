"""WebSocket connections for the cloud's server: websockets' Sans-I/O `ServerProtocol` driven by
an asyncio `Protocol`, each message handed to the application as it arrives.

The framing, the opening and closing handshakes, subprotocol negotiation, size limits and
automatic pongs are websockets' own (its Sans-I/O layer, on which its asyncio server runs too).
What is here is the I/O around it, shaped for a server whose application is itself a sans-I/O
session machine (`protocol.ServerSession`): websockets' asyncio server hands every message
through a queue and a future to a reading coroutine, and every send through an async context
manager, about a fifth of an echo round trip in `bench.cloud_roundtrip`. Here a message is a
call (`Peer.message`), a send is a write (`WebSocket.send`), and waiting is for flow control
only (`WebSocket.drain`).

Per connection: the handshake must finish within `open_timeout`; a ping goes out every
`ping_interval` and an unanswered one fails the connection after `ping_timeout` (close code
1011, seen as 1006 when no close frame comes back); once a close is under way the TCP
connection is closed when the peer closes it, or aborted after `close_timeout`. Reading pauses
while the application asks (`pause_reading`) and while the peer does not read what is written
to it (above `write_limit` bytes buffered), so a peer cannot make the server buffer without
bound by sending requests and never reading the answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl as ssl_module
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import OPEN, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

__all__ = ["Peer", "WebSocket", "WebSocketServer", "serve"]

log = logging.getLogger("edgeloop.cloud.transport")
_protocol_log = logging.getLogger("websockets.server")
"""Where websockets' protocol narrates each connection (at INFO, as its own servers do):
under the library's name, so what quiets the library quiets it here too."""


class Peer(Protocol):
    """What the application attaches to a connection once its handshake is done."""

    def message(self, data: str | bytes) -> None:
        """One whole message: `str` for a text message, `bytes` for a binary one."""

    def closed(self) -> None:
        """The connection is over (`WebSocket.close_code` says how); called once."""


class WebSocket(asyncio.Protocol):
    """One server-side WebSocket connection."""

    def __init__(self, server: WebSocketServer) -> None:
        self._server = server
        self.protocol = ServerProtocol(
            subprotocols=server.subprotocols,
            max_size=server.max_size,
            logger=_protocol_log,
        )
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        """Set once connected (`connection_made`)."""
        self.peer: Peer | None = None
        """The application's side, once the handshake is done."""
        self._loop = server.loop
        self._fragments: list[bytes] = []
        self._fragmented: Opcode | None = None
        """The opcode of the fragmented message being received, if any."""
        self._timer: asyncio.TimerHandle | None = None
        """The open timeout, then the next ping or the pong's deadline, then the close
        timeout: a connection waits for one of them at a time."""
        self._ping: bytes | None = None
        """The payload of the ping awaiting its pong."""
        self._write_paused = False
        self._read_paused_by_app = False
        self._reading = True
        self._drained: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()

    # --- what the application uses --------------------------------------------------------

    @property
    def subprotocol(self) -> Subprotocol | None:
        return self.protocol.subprotocol

    @property
    def state(self) -> State:
        return self.protocol.state

    @property
    def close_code(self) -> int | None:
        """The close code the peer sent (1006 if none came), once the connection is over."""
        return self.protocol.close_code

    def send(self, data: str | bytes) -> None:
        """Write one message (text for `str`, binary for `bytes`), without waiting; `drain` to
        wait until the peer has read enough. Raises `ConnectionClosed` once closing."""
        protocol = self.protocol
        if protocol.state is not OPEN:
            raise ConnectionClosed(protocol.close_rcvd, protocol.close_sent)
        if isinstance(data, str):
            protocol.send_text(data.encode())
        else:
            protocol.send_binary(data)
        self._write()

    async def drain(self) -> None:
        """Wait while more than the write limit is buffered for the peer (or until the
        connection is lost)."""
        if self._write_paused and not self._closed.done():
            if self._drained is None:
                self._drained = self._loop.create_future()
            await asyncio.shield(self._drained)

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake (`wait_closed` to wait for its end)."""
        if self.protocol.state is OPEN:
            self.protocol.send_close(code, reason)
            self._write()
            self._expect_close()

    async def wait_closed(self) -> None:
        """Wait until the connection is over."""
        await asyncio.shield(self._closed)

    @property
    def reading(self) -> bool:
        """Whether the connection reads from the peer (not paused by the application, nor
        because the peer is behind reading what it was sent)."""
        return self._reading

    def pause_reading(self) -> None:
        """Read nothing more from the peer until `resume_reading`."""
        self._read_paused_by_app = True
        self._update_reading()

    def resume_reading(self) -> None:
        self._read_paused_by_app = False
        self._update_reading()

    # --- asyncio's callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not derive from asyncio's classes).
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(self._server.write_limit)
        self._server.connections.add(self)
        self._arm(self._server.open_timeout, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        self._write()
        if protocol.close_expected():
            self._expect_close()
        for event in events:
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request):
                self._handshake(event)

    def eof_received(self) -> None:
        self.protocol.receive_eof()
        self._write()
        # None: asyncio closes the transport (the protocol has nothing more to say).

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent: the state is now CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.connections.discard(self)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._closed.set_result(None)
        if self.peer is not None:
            self._call(self.peer.closed)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None:
            self._drained.set_result(None)
            self._drained = None
        self._update_reading()

    # --- inside ---------------------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        protocol = self.protocol
        response = protocol.accept(request)
        protocol.send_response(response)
        self._write()
        if protocol.state is not OPEN:  # refused (400, 426...): the response says why
            self._expect_close()
            return
        self._arm(self._server.ping_interval, self._send_ping)
        self.peer = self._server.accept(self)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = bytes(frame.data)  # the same object when it is bytes already, as parsed
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if not frame.fin:
                self._fragmented, self._fragments = opcode, [data]
                return
            self._deliver(opcode, data)
        elif opcode is Opcode.CONT:
            self._fragments.append(data)
            if frame.fin:
                assert self._fragmented is not None
                whole, self._fragments = b"".join(self._fragments), []
                self._deliver(self._fragmented, whole)
                self._fragmented = None
        elif opcode is Opcode.PONG:
            if self._ping is not None and data == self._ping and self.state is OPEN:
                self._ping = None
                self._arm(self._server.ping_interval, self._send_ping)

    def _deliver(self, opcode: Opcode, data: bytes) -> None:
        if self.peer is None or self.protocol.state is not OPEN:
            return
        if opcode is Opcode.TEXT:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self._fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
                return
            self._call(self.peer.message, text)
        else:
            self._call(self.peer.message, data)

    def _call(self, method: Callable[..., None], *args: str | bytes) -> None:
        try:
            method(*args)
        except Exception:
            # A bug in the application must not leave the connection half alive.
            log.exception("connection handler failed")
            self._fail(CloseCode.INTERNAL_ERROR, "internal error")

    def _send_ping(self) -> None:
        self._timer = None
        if self.protocol.state is not OPEN:
            return
        self._ping = os.urandom(4)
        self.protocol.send_ping(self._ping)
        self._write()
        self._arm(self._server.ping_timeout, self._ping_timed_out)

    def _ping_timed_out(self) -> None:
        self._timer = None
        log.info("no pong within %.1f s: connection failed", self._server.ping_timeout or 0)
        self._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")

    def _fail(self, code: int, reason: str) -> None:
        self.protocol.fail(code, reason)
        self._write()
        self._expect_close()

    def _expect_close(self) -> None:
        """The TCP connection should close soon: abort it if it has not after the timeout."""
        if not self._closed.done():
            self._arm(self._server.close_timeout, self.transport.abort)

    def _arm(self, delay: float | None, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if delay is None else self._loop.call_later(delay, callback)

    def _write(self) -> None:
        transport = self.transport
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()  # half-close: the peer closes the TCP connection
            else:
                transport.close()  # TLS cannot half-close

    def _update_reading(self) -> None:
        reading = not (self._read_paused_by_app or self._write_paused)
        if reading is self._reading or self.transport.is_closing():
            return
        self._reading = reading
        if reading:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()


class WebSocketServer:
    """Listening sockets and the connections they accepted."""

    def __init__(
        self,
        accept: Callable[[WebSocket], Peer],
        *,
        subprotocols: Sequence[Subprotocol] | None,
        max_size: int | None,
        ping_interval: float | None,
        ping_timeout: float | None,
        open_timeout: float | None,
        close_timeout: float | None,
        write_limit: int,
    ) -> None:
        self.accept = accept
        """Called with each connection once its handshake is done; returns its `Peer`."""
        self.subprotocols = subprotocols
        self.max_size = max_size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.write_limit = write_limit
        self.loop = asyncio.get_running_loop()
        self.connections: set[WebSocket] = set()
        self._server: asyncio.Server | None = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._server is None else tuple(self._server.sockets)

    async def listen(self, host: str, port: int, ssl: ssl_module.SSLContext | None) -> None:
        self._server = await self.loop.create_server(
            lambda: WebSocket(self),
            host,
            port,
            ssl=ssl,
            ssl_handshake_timeout=self.open_timeout if ssl is not None else None,
        )

    def close(self) -> None:
        """Stop accepting connections; those open stay open."""
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        """Wait until no longer listening and every connection is over."""
        if self._server is not None:
            await self._server.wait_closed()
        while self.connections:
            await asyncio.gather(*(ws.wait_closed() for ws in list(self.connections)))


async def serve(
    accept: Callable[[WebSocket], Peer],
    host: str,
    port: int,
    *,
    subprotocols: Sequence[Subprotocol] | None = None,
    max_size: int | None = 2**20,
    ping_interval: float | None = 20,
    ping_timeout: float | None = 20,
    open_timeout: float | None = 10,
    close_timeout: float | None = 10,
    write_limit: int = 2**15,
    ssl: ssl_module.SSLContext | None = None,
) -> WebSocketServer:
    """Listen on `host`:`port` (0: any free port); `accept` is called with each connection
    once its handshake is done and returns the `Peer` that takes its messages."""
    server = WebSocketServer(
        accept,
        subprotocols=subprotocols,
        max_size=max_size,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        open_timeout=open_timeout,
        close_timeout=close_timeout,
        write_limit=write_limit,
    )
    await server.listen(host, port, ssl)
    return server
