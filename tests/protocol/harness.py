"""Connect a `ClientSession` and a `ServerSession` in memory, without sockets or an event loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol import (
    AuthRequested,
    BinaryFrame,
    ClientSession,
    CloseFrame,
    DeviceCredentials,
    EnrollmentCredentials,
    EnrollmentRequested,
    ErrorCode,
    Event,
    Frame,
    Limits,
    ServerSession,
    TextFrame,
)
from shared import SigningKey, VerifyKey

NOW = 1_800_000_000.0
SERVER_KEY = SigningKey.generate()


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def feed(session: ClientSession | ServerSession, frames: list[Frame]) -> None:
    for frame in frames:
        match frame:
            case TextFrame(data=data):
                session.receive_text(data)
            case BinaryFrame(data=data):
                session.receive_binary(data)
            case CloseFrame(code=code, reason=reason):
                session.receive_close(int(code), reason)


@dataclass
class Pair:
    """Both ends of one connection plus a toy registry, pumped by hand."""

    client: ClientSession
    server: ServerSession
    devices: dict[str, VerifyKey] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    client_events: list[Event] = field(default_factory=list)
    server_events: list[Event] = field(default_factory=list)
    auto_auth: bool = True

    def pump(self) -> None:
        """Exchange frames until both sides are quiet, deciding auth like a registry would."""
        while True:
            to_server = self.client.data_to_send()
            feed(self.server, to_server)
            for event in self.server.events_received():
                self.server_events.append(event)
                if self.auto_auth:
                    self._decide(event)
            to_client = self.server.data_to_send()
            feed(self.client, to_client)
            self.client_events.extend(self.client.events_received())
            if not to_server and not to_client:
                return

    def _decide(self, event: Event) -> None:
        match event:
            case AuthRequested(device_id=device_id):
                key = self.devices.get(device_id)
                if key is None:
                    self.server.refuse(ErrorCode.UNKNOWN_DEVICE, "no such device")
                else:
                    self.server.accept(key, session_id="ses_test")
            case EnrollmentRequested(request=request):
                if request.token not in self.tokens:
                    self.server.refuse(ErrorCode.INVALID_ENROLLMENT_TOKEN, "bad token")
                    return
                self.tokens.discard(request.token)
                device_id = f"dev_{len(self.devices) + 1}"
                self.devices[device_id] = VerifyKey.from_b64(request.public_key)
                self.server.complete_enrollment(
                    device_id, SERVER_KEY.verify_key(), session_id="ses_test"
                )

    def of(self, side: str, kind: type) -> list:  # type: ignore[type-arg]
        events = self.client_events if side == "client" else self.server_events
        return [e for e in events if isinstance(e, kind)]


def make_server(clock: Clock | None = None, **kw: object) -> ServerSession:
    limits = kw.pop("limits", None) or Limits(
        max_message_bytes=4096, max_in_flight=2, max_requests_per_minute=60, heartbeat_s=20
    )
    return ServerSession(
        server_id="cloud-test",
        limits=limits,  # type: ignore[arg-type]
        clock=clock or Clock(),
        **kw,  # type: ignore[arg-type]
    )


def open_pair(key: SigningKey | None = None, **server_kw: object) -> Pair:
    """An authenticated session of an enrolled device."""
    key = key or SigningKey.generate()
    clock = Clock()
    client = ClientSession(DeviceCredentials("dev_1", key), sdk="test/1", clock=clock)
    pair = Pair(client, make_server(clock, **server_kw), devices={"dev_1": key.verify_key()})
    client.start()
    pair.pump()
    assert client.is_open and pair.server.is_open
    pair.client_events.clear()
    pair.server_events.clear()
    return pair


def enrolling_pair(token: str = "tok_12345678", valid: bool = True) -> Pair:
    clock = Clock()
    client = ClientSession(
        EnrollmentCredentials(token, SigningKey.generate(), name="kiosk"), sdk="test/1", clock=clock
    )
    pair = Pair(client, make_server(clock), tokens={token} if valid else set())
    client.start()
    pair.pump()
    return pair
