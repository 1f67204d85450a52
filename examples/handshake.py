"""A protocol v1 session on loopback: enroll, reconnect, feedback with a lost-ack resend, refusals.

Both ends are real: a websockets server and client on 127.0.0.1, each driving the sans-I/O
sessions from `protocol` with real Ed25519 keys. The server here is deliberately small (an
in-memory registry, no model); it shows what a server built on `protocol` has to do.
`examples/vendor_agent.py` is the other side of the coin: a client written without `protocol`.

Run it with `python -m examples.handshake`.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from protocol import (
    SUBPROTOCOL,
    Ack,
    AckReceived,
    AuthRequested,
    ClientSession,
    CloseFrame,
    DeviceCredentials,
    EnrollmentCompleted,
    EnrollmentCredentials,
    EnrollmentRequested,
    ErrorCode,
    Event,
    Feedback,
    FeedbackReceived,
    Frame,
    Goodbye,
    PeerError,
    ServerSession,
    SessionClosed,
    Welcomed,
)
from shared import SigningKey, VerifyKey, new_idempotency_key, new_session_id

__all__ = ["HandshakeServer", "main", "run_handshake"]

SDK = "edgeloop-handshake-example/1"


@dataclass
class HandshakeServer:
    """An in-memory registry behind a real WebSocket endpoint."""

    server_id: str = "handshake-example"
    key: SigningKey = field(default_factory=SigningKey.generate)
    tokens: set[str] = field(default_factory=set)
    devices: dict[str, VerifyKey] = field(default_factory=dict)
    feedback: dict[str, Feedback] = field(default_factory=dict)

    def issue_token(self) -> str:
        token = secrets.token_urlsafe(24)
        self.tokens.add(token)
        return token

    async def handler(self, ws: ServerConnection) -> None:
        session = ServerSession(server_id=self.server_id)
        try:
            async for data in ws:
                if isinstance(data, str):
                    session.receive_text(data)
                else:
                    session.receive_binary(data)
                for event in session.events_received():
                    self._on_event(session, event)
                await _flush(ws, session.data_to_send())
                if session.closed:
                    return
        except ConnectionClosed:
            pass

    def _on_event(self, session: ServerSession, event: Event) -> None:
        match event:
            case AuthRequested(device_id=device_id):
                key = self.devices.get(device_id)
                if key is None:
                    session.refuse(ErrorCode.UNKNOWN_DEVICE, "no such device")
                else:
                    session.accept(key, session_id=new_session_id())
            case EnrollmentRequested(request=request):
                if request.token not in self.tokens:
                    session.refuse(ErrorCode.INVALID_ENROLLMENT_TOKEN, "token unknown or used")
                    return
                self.tokens.discard(request.token)
                device_id = f"dev_{secrets.token_hex(8)}"
                self.devices[device_id] = VerifyKey.from_b64(request.public_key)
                session.complete_enrollment(
                    device_id, self.key.verify_key(), session_id=new_session_id()
                )
            case FeedbackReceived(message=message):
                duplicate = message.idempotency_key in self.feedback
                self.feedback.setdefault(message.idempotency_key, message)
                session.send(Ack(idempotency_key=message.idempotency_key, duplicate=duplicate))


async def _flush(ws: ServerConnection | ClientConnection, frames: list[Frame]) -> None:
    for frame in frames:
        if isinstance(frame, CloseFrame):
            await ws.close(int(frame.code), frame.reason)
            return
        await ws.send(frame.data)


class Device:
    """A device's side of one connection, driven step by step for the demonstration."""

    def __init__(self, ws: ClientConnection, session: ClientSession) -> None:
        self.ws, self.session = ws, session

    @classmethod
    async def connect(
        cls,
        url: str,
        credentials: DeviceCredentials | EnrollmentCredentials,
        *,
        ssl: Any = None,
        **kw: Any,
    ) -> Device:
        ws = await connect(url, subprotocols=[SUBPROTOCOL], proxy=None, ssl=ssl)  # type: ignore[list-item]
        device = cls(ws, ClientSession(credentials, sdk=SDK, **kw))
        device.session.start()
        await _flush(ws, device.session.data_to_send())
        return device

    async def next_event(self, *kinds: type) -> Event:
        """Read frames until an event of one of `kinds` (or the session's end) arrives."""
        async with asyncio.timeout(10):
            while True:
                for event in self.session.events_received():
                    if isinstance(event, (*kinds, SessionClosed, PeerError)):
                        return event
                try:
                    data = await self.ws.recv()
                except ConnectionClosed as exc:
                    rcvd = exc.rcvd
                    self.session.receive_close(rcvd.code if rcvd else 1006, "")
                    continue
                if isinstance(data, str):
                    self.session.receive_text(data)
                else:
                    self.session.receive_binary(data)
                await _flush(self.ws, self.session.data_to_send())

    async def send(self, message: Any) -> None:
        self.session.send(message)
        await _flush(self.ws, self.session.data_to_send())

    async def close(self) -> None:
        if not self.session.closed:
            await self.send(Goodbye(reason="client_closing"))
        await self.ws.close()


async def run_handshake(port: int = 0) -> list[tuple[str, str, float]]:
    """Run every step once; returns (step, outcome, milliseconds) rows."""
    server = HandshakeServer()
    rows: list[tuple[str, str, float]] = []
    async with serve(
        server.handler,
        "127.0.0.1",
        port,
        subprotocols=[Subprotocol(SUBPROTOCOL)],
        max_size=1 << 20,
    ) as ws_server:
        bound = next(iter(ws_server.sockets)).getsockname()[1]
        url = f"ws://127.0.0.1:{bound}/v1"
        key = SigningKey.generate()

        async def step(name: str, coro: Any) -> Any:
            started = time.perf_counter()
            outcome, value = await coro
            rows.append((name, outcome, (time.perf_counter() - started) * 1000))
            return value

        async def enroll() -> tuple[str, str]:
            device = await Device.connect(url, EnrollmentCredentials(server.issue_token(), key))
            enrolled = await device.next_event(EnrollmentCompleted)
            welcomed = await device.next_event(Welcomed)
            await device.close()
            assert isinstance(enrolled, EnrollmentCompleted) and isinstance(welcomed, Welcomed)
            return f"device {enrolled.device_id}, server key pinned", enrolled.device_id

        device_id = await step("enroll with a one-time token", enroll())
        creds = DeviceCredentials(device_id, key)

        async def feedback_twice() -> tuple[str, None]:
            device = await Device.connect(url, creds)
            welcomed = await device.next_event(Welcomed)
            assert isinstance(welcomed, Welcomed)
            fb = Feedback(
                idempotency_key=new_idempotency_key(), request_id="req_demo", rating="positive"
            )
            await device.send(fb)
            first = await device.next_event(AckReceived)
            await device.send(fb)  # as if the first ack had been lost
            second = await device.next_event(AckReceived)
            await device.close()
            assert isinstance(first, AckReceived) and isinstance(second, AckReceived)
            return (
                f"session {welcomed.welcome.session_id}; feedback acked, resend acked as "
                f"duplicate={second.ack.duplicate}; stored {len(server.feedback)}",
                None,
            )

        await step("authenticate, feedback, lost-ack resend", feedback_twice())

        async def refused(
            credentials: DeviceCredentials | EnrollmentCredentials, **kw: Any
        ) -> tuple[str, None]:
            device = await Device.connect(url, credentials, **kw)
            event = await device.next_event(Welcomed)
            closed = await device.next_event(SessionClosed)
            name = event.error.name if isinstance(event, PeerError) else type(event).__name__
            code = closed.code if isinstance(closed, SessionClosed) else "?"
            return f"refused: {name}, close {code}", None

        await step("reuse the enrollment token", refused(EnrollmentCredentials("x" * 32, key)))
        await step(
            "wrong key for the device id",
            refused(DeviceCredentials(device_id, SigningKey.generate())),
        )
        await step("unsupported protocol version", refused(creds, versions=("9.0",)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.parse_args(argv)
    return _run(argparse.Namespace())


def _run(args: argparse.Namespace) -> int:
    print("edgeloop protocol v1 on loopback (real WebSockets, real Ed25519 keys)\n")
    rows = asyncio.run(run_handshake())
    width = max(len(r[0]) for r in rows)
    for name, outcome, ms in rows:
        print(f"  {name:<{width}}  {ms:7.1f} ms  {outcome}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
