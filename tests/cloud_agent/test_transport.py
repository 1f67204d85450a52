"""The server's WebSocket transport over real sockets: messages whole and in order, the
handshake, keepalive and closing timeouts, flow control, and bad input."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from cloud_agent.transport import WebSocket, WebSocketServer, serve
from shared.log import QUIETED_LOGGERS

pytestmark = pytest.mark.every_event_loop

CHAT = Subprotocol("chat")


@dataclass(eq=False)
class EchoPeer:
    """Test double of an application: answers each message with itself, keeps what came."""

    ws: WebSocket
    received: list[str | bytes] = field(default_factory=list)
    closed_with: list[int | None] = field(default_factory=list)
    fail_on: str | None = None

    def message(self, data: str | bytes) -> None:
        self.received.append(data)
        if data == self.fail_on:
            raise RuntimeError("a bug in the application")
        self.ws.send(data)

    def closed(self) -> None:
        self.closed_with.append(self.ws.close_code)


@dataclass
class Served:
    server: WebSocketServer
    peers: list[EchoPeer]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"


async def served(
    fail_on: str | None = None, max_size: int = 1024, **options: float | None
) -> Served:
    peers: list[EchoPeer] = []

    def accept(ws: WebSocket) -> EchoPeer:
        peers.append(EchoPeer(ws, fail_on=fail_on))
        return peers[-1]

    kwargs: dict[str, float | None] = {"ping_interval": None, **options}
    server = await serve(
        accept,
        "127.0.0.1",
        0,
        subprotocols=[CHAT],
        max_size=max_size,
        **kwargs,  # type: ignore[arg-type]
    )
    return Served(server, peers)


@pytest.fixture
async def echo() -> AsyncIterator[Served]:
    s = await served()
    yield s
    s.server.close()
    for ws in list(s.server.connections):
        ws.transport.abort()
    await s.server.wait_closed()


class RawClient:
    """A WebSocket client on websockets' Sans-I/O layer over a plain socket, which can send
    what a well-behaved client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.protocol = ClientProtocol(parse_uri("ws://127.0.0.1/"), subprotocols=[CHAT])

    @classmethod
    async def connect(cls, url: str) -> RawClient:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        client.protocol.send_request(client.protocol.connect())
        await client.flush()
        await client.events()  # the handshake's response
        return client

    async def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.writer.write(data)
        await self.writer.drain()

    async def events(self) -> list[object]:
        data = await asyncio.wait_for(self.reader.read(65536), 5)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        return list(self.protocol.events_received())


async def test_messages_arrive_whole_and_in_order_fragmented_or_not(echo: Served) -> None:
    async with connect(echo.url, subprotocols=[CHAT], proxy=None) as ws:
        await ws.send("one")
        await ws.send(["tw", "o"])  # one message in two fragments
        await ws.send(b"\x00three")
        assert [await ws.recv() for _ in range(3)] == ["one", "two", b"\x00three"]
    assert echo.peers[0].received == ["one", "two", b"\x00three"]


async def test_a_client_offering_no_subprotocol_is_refused_at_the_handshake(
    echo: Served,
) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(echo.url, proxy=None):
            pass
    assert info.value.response.status_code == 400
    assert echo.peers == []


async def test_the_librarys_narration_of_each_connection_is_quieted_as_websockets_is(
    echo: Served, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `configure_logging` leaves it: everything at INFO but the quieted libraries.
    caplog.set_level(logging.INFO)
    for name in QUIETED_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.WARNING)
    async with connect(echo.url, subprotocols=[CHAT], proxy=None) as ws:
        await ws.send("one")
        await ws.recv()
    with pytest.raises(InvalidStatus):
        async with connect(echo.url, proxy=None):  # refused at the handshake
            pass
    await asyncio.sleep(0.05)  # the server sees both ends
    assert [r.getMessage() for r in caplog.records] == []


async def test_invalid_utf8_in_a_text_message_closes_with_1007(echo: Served) -> None:
    client = await RawClient.connect(echo.url)
    client.protocol.send_text(b"\xff\xfe not utf-8")
    await client.flush()
    frames = [e for e in await client.events() if isinstance(e, Frame)]
    assert frames and frames[-1].opcode.name == "CLOSE"
    assert frames[-1].data[:2] == (1007).to_bytes(2, "big")
    assert echo.peers[0].received == []
    client.writer.close()
    await client.writer.wait_closed()


async def test_a_message_over_the_size_limit_closes_with_1009(echo: Served) -> None:
    async with connect(echo.url, subprotocols=[CHAT], proxy=None) as ws:
        await ws.send("x" * 2000)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1009
    assert echo.peers[0].received == []


async def test_an_application_error_closes_the_connection_with_1011() -> None:
    s = await served(fail_on="boom")
    async with connect(s.url, subprotocols=[CHAT], proxy=None) as ws:
        await ws.send("fine")
        assert await ws.recv() == "fine"
        await ws.send("boom")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1011
    s.server.close()
    await s.server.wait_closed()
    # A failed connection reads nothing more, the client's answering close included.
    assert s.peers[0].closed_with == [1006]


async def test_a_connection_that_never_completes_the_handshake_is_closed() -> None:
    s = await served(open_timeout=0.2)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", s.server.sockets[0].getsockname()[1]
    )
    writer.write(b"GET / HTTP/1.1\r\n")  # and nothing more
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    s.server.close()
    await s.server.wait_closed()
    assert not s.server.connections


async def test_a_peer_that_answers_no_pings_is_dropped() -> None:
    s = await served(ping_interval=0.1, ping_timeout=0.2, close_timeout=0.2)
    client = await RawClient.connect(s.url)
    client.writer.transport.pause_reading()  # reads nothing: no pong goes back
    async with asyncio.timeout(5):
        await s.peers[0].ws.wait_closed()
    assert s.peers[0].closed_with == [1006]  # no close frame came back
    client.writer.close()
    s.server.close()
    await s.server.wait_closed()


async def test_a_peer_that_answers_pings_stays() -> None:
    s = await served(ping_interval=0.05, ping_timeout=0.2)
    async with connect(s.url, subprotocols=[CHAT], proxy=None, ping_interval=None) as ws:
        await asyncio.sleep(0.6)  # a dozen pings, each answered by the client's protocol
        await ws.send("still here")
        assert await asyncio.wait_for(ws.recv(), 5) == "still here"
    s.server.close()
    await s.server.wait_closed()


async def test_a_peer_that_does_not_answer_the_close_is_aborted_after_the_timeout() -> None:
    s = await served(close_timeout=0.2)
    client = await RawClient.connect(s.url)
    s.peers[0].ws.close(1001, "going away")
    async with asyncio.timeout(5):
        await s.peers[0].ws.wait_closed()
    assert s.peers[0].closed_with == [1006]
    client.writer.close()
    s.server.close()
    await s.server.wait_closed()


async def test_reading_pauses_while_the_peer_reads_nothing_of_what_it_is_sent() -> None:
    s = await served(max_size=1 << 16)
    client = await RawClient.connect(s.url)
    client.writer.transport.pause_reading()  # never reads the echoes
    ws = s.peers[0].ws
    message = b"y" * 60_000
    for _ in range(1000):  # up to 60 MB: far more than socket buffers hold
        client.protocol.send_text(message)
        try:
            await asyncio.wait_for(client.flush(), 1)
        except TimeoutError:
            break  # the server stopped reading
    assert not ws.reading
    # What the server buffers for the peer stays near its write limit, not megabytes.
    assert ws.transport.get_write_buffer_size() < 1 << 20
    received = len(s.peers[0].received)
    client.writer.transport.resume_reading()
    async with asyncio.timeout(10):  # once the peer reads again, so does the server
        while len(s.peers[0].received) == received:
            await client.events()
    client.writer.close()
    s.server.close()
    ws.transport.abort()
    await s.server.wait_closed()
