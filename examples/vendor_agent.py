"""Another vendor's agent talking to an edgeloop cloud from the published protocol alone.

It imports nothing of edgeloop: the frames are plain JSON built from `protocol/SPEC.md`, and
every frame, sent or received, is checked against the published JSON Schema
(`protocol/schema/edgeloop-v1.schema.json`). What it needs is what any vendor would use:
`websockets`, `cryptography` for Ed25519 and `jsonschema`.

It enrolls with a one-time token (proving it holds its new key), asks a question with the answer
streamed, rates the answer and waits for the acknowledgement, says goodbye, then connects again
as the enrolled device (`auth`) and asks once more.

    edgeloop cloud serve --knowledge ../shared/data/northwind-kb.md      # in one terminal
    python -m examples.vendor_agent ws://127.0.0.1:8765/v1 --token "$(edgeloop cloud enroll-token)"

A `wss://` cloud whose certificate the system does not trust (a private CA, a self-signed
certificate) is trusted with `--ca-file cert.pem`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

SCHEMA = Path(__file__).resolve().parents[1] / "protocol" / "schema" / "edgeloop-v1.schema.json"
SDK = "acme-agent/1.0"


def b64url(data: bytes) -> str:
    """Base64url without padding, as the protocol writes binary values (SPEC section 1)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class ProtocolViolation(Exception):
    """The server sent something the published protocol does not allow here."""


@dataclass
class Answer:
    """One question's answer as it arrived."""

    deltas: list[str]
    text: str
    sources: list[str]
    model: str


@dataclass
class Session:
    """Everything said on one connection, both ways, each frame checked against the schema."""

    ws: ClientConnection
    validator: jsonschema.protocols.Validator
    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, frame: dict[str, Any]) -> None:
        self.validator.validate(frame)  # our own frames too: the schema is the contract
        self.sent.append(frame)
        await self.ws.send(json.dumps(frame))

    async def receive(self, *expected: str) -> dict[str, Any]:
        """The next frame, which must be valid and of one of the `expected` types."""
        data = await asyncio.wait_for(self.ws.recv(), timeout=30)
        if not isinstance(data, str):
            raise ProtocolViolation("a binary frame outside an update download")
        frame: dict[str, Any] = json.loads(data)
        self.validator.validate(frame)
        self.received.append(frame)
        if frame["type"] == "error":
            raise ProtocolViolation(f"server error {frame['name']}: {frame['message']}")
        if frame["type"] not in expected:
            raise ProtocolViolation(f"expected {' or '.join(expected)}, got {frame['type']}")
        return frame


@dataclass
class Agent:
    """A vendor's agent: its own key, and the device id the cloud gave it at enrollment."""

    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    device_id: str | None = None
    tls: ssl.SSLContext | None = None
    """For wss:// URLs: whom to trust (default: the system's certificate authorities)."""
    validator: jsonschema.protocols.Validator = field(
        default_factory=lambda: jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    )

    @property
    def public_key(self) -> str:
        return b64url(self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def proof(self, purpose: str, challenge: dict[str, Any], subject: str) -> dict[str, Any]:
        """The signed proof of SPEC section 4, bound to this server, connection and moment."""
        timestamp = int(time.time())
        payload = "\n".join(
            ["edgeloop-proof/1", purpose, challenge["server_id"], challenge["nonce"],
             str(timestamp), subject]
        )  # fmt: skip
        signature = b64url(self.key.sign(payload.encode("ascii")))
        return {"nonce": challenge["nonce"], "timestamp": timestamp, "signature": signature}

    async def open(self, url: str, token: str | None = None) -> Session:
        """Connect, prove who we are (enrolling with `token` the first time) and return the
        open session."""
        # websockets takes no `ssl` for ws:// and the system's authorities by default for wss://
        tls: dict[str, Any] = {"ssl": self.tls} if self.tls and url.startswith("wss:") else {}
        ws = await connect(url, subprotocols=[Subprotocol("edgeloop.v1")], proxy=None, **tls)
        session = Session(ws, self.validator)
        hello: dict[str, Any] = {"type": "hello", "versions": ["1.0"], "sdk": SDK,
                                 "capabilities": ["stream", "feedback"]}  # fmt: skip
        if self.device_id is not None:
            hello["device_id"] = self.device_id
        await session.send(hello)
        challenge = await session.receive("challenge")
        if self.device_id is None:
            if token is None:
                raise ValueError("a first connection needs an enrollment token")
            proof = self.proof("enroll", challenge, self.public_key)
            await session.send({"type": "enroll", "token": token, "public_key": self.public_key,
                             "name": "acme-agent", **proof})  # fmt: skip
            self.device_id = (await session.receive("enrolled"))["device_id"]
        else:
            proof = self.proof("auth", challenge, self.device_id)
            await session.send({"type": "auth", "device_id": self.device_id, **proof})
        welcome = await session.receive("welcome")
        if welcome["device_id"] != self.device_id:
            raise ProtocolViolation(f"welcomed as {welcome['device_id']}, not {self.device_id}")
        return session

    async def ask(self, session: Session, question: str) -> tuple[str, Answer]:
        """Escalate `question` with the answer streamed; returns the request id and answer."""
        request_id = f"acme_{secrets.token_hex(8)}"
        await session.send({"type": "escalate", "request_id": request_id,
                         "messages": [{"role": "user", "content": question}],
                         "deadline_ms": 30_000, "max_tokens": 64, "stream": True})  # fmt: skip
        deltas: list[str] = []
        while True:
            frame = await session.receive("delta", "result")
            if frame["request_id"] != request_id:
                raise ProtocolViolation(f"a frame for another request: {frame['request_id']}")
            if frame["type"] == "result":
                return request_id, Answer(
                    deltas, frame["text"], frame.get("sources", []), frame["model"]
                )
            if frame["seq"] != len(deltas):
                raise ProtocolViolation(f"delta {frame['seq']} after {len(deltas)} deltas")
            deltas.append(frame["text"])

    async def rate(self, session: Session, request_id: str, rating: str) -> bool:
        """Send feedback and wait for its ack; True if the cloud had it already."""
        key = f"fb_{secrets.token_hex(8)}"
        await session.send({"type": "feedback", "idempotency_key": key,
                         "request_id": request_id, "rating": rating})  # fmt: skip
        ack = await session.receive("ack")
        if ack["idempotency_key"] != key:
            raise ProtocolViolation(f"ack for another key: {ack['idempotency_key']}")
        return bool(ack.get("duplicate", False))

    async def close(self, session: Session) -> None:
        await session.send({"type": "goodbye", "reason": "client_closing"})
        await session.ws.close()


async def run(
    url: str, token: str, questions: tuple[str, str], *, ca_file: Path | None = None
) -> dict[str, Any]:
    """The whole visit: enroll and ask, rate, leave, come back and ask again."""
    tls = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    agent = Agent(tls=tls)
    session = await agent.open(url, token)
    request_id, first = await agent.ask(session, questions[0])
    duplicate = await agent.rate(session, request_id, "positive")
    await agent.close(session)
    again = await agent.open(url)
    _, second = await agent.ask(again, questions[1])
    await agent.close(again)
    return {
        "device_id": agent.device_id,
        "first": first,
        "second": second,
        "ack_duplicate": duplicate,
        "frames_checked": len(session.sent)
        + len(session.received)
        + len(again.sent)
        + len(again.received),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("url", help="the cloud's WebSocket URL, e.g. ws://127.0.0.1:8765/v1")
    parser.add_argument("--token", required=True, help="a one-time enrollment token")
    parser.add_argument("--question", default="Is standard shipping free?")
    parser.add_argument("--again", default="Do gift cards expire?")
    parser.add_argument("--ca-file", type=Path, help="PEM certificate(s) to trust for a wss:// URL")
    args = parser.parse_args(argv)
    try:
        out = asyncio.run(
            run(args.url, args.token, (args.question, args.again), ca_file=args.ca_file)
        )
    except (ProtocolViolation, jsonschema.ValidationError, ConnectionClosed, OSError) as exc:
        print(f"vendor agent: {type(exc).__name__}: {exc}")
        return 1
    print(f"enrolled as {out['device_id']}")
    for label, answer in (("first", out["first"]), ("again", out["second"])):
        print(f"{label}: {answer.text!r} ({len(answer.deltas)} deltas, model {answer.model}, "
              f"sources {answer.sources})")  # fmt: skip
    print(f"feedback acknowledged; {out['frames_checked']} frames, all valid against the schema")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
