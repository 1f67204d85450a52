"""`edgeloop conformance URL`: check that a server speaks protocol v1.

Runs scripted scenarios against any server that claims the protocol (ours or a vendor's):
enrollment, connect, a newer session replacing an older one, a bad version, a bad signature, a
replayed proof, an oversized frame, an unknown type, an escalation with streaming, a cancel,
and feedback with a resend after a lost ack. Every frame received is validated against the
published JSON Schema. Prints a pass/fail table; the exit status is 1 when any scenario fails.

It needs one enrollment token (`--token`); the device it enrolls is then used throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol import (
    SUBPROTOCOL,
    SUPPORTED_VERSIONS,
    KeyEndorsement,
    check_endpoint,
    follow_key_rotation,
    sign_proof,
)
from protocol.schema import json_schema
from shared.errors import SignatureError
from shared.ids import new_idempotency_key, new_request_id
from shared.keys import SigningKey
from shared.net import tls_client_context

__all__ = ["ConformanceReport", "register", "run_conformance"]

SDK = "edgeloop-conformance/1"


class ScenarioFailed(Exception):
    pass


@dataclass
class Outcome:
    name: str
    passed: bool
    detail: str
    ms: float


@dataclass
class ConformanceReport:
    outcomes: list[Outcome]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)

    def table(self) -> str:
        width = max(len(o.name) for o in self.outcomes)
        lines = [f"{'scenario':<{width}}  result  {'ms':>7}  detail"]
        for o in self.outcomes:
            lines.append(
                f"{o.name:<{width}}  {'PASS' if o.passed else 'FAIL':<6}  {o.ms:7.1f}  {o.detail}"
            )
        failed = sum(not o.passed for o in self.outcomes)
        lines.append(f"{len(self.outcomes) - failed} passed, {failed} failed")
        return "\n".join(lines)


class Peer:
    """A raw client: sends dicts, receives frames validated against the JSON Schema."""

    def __init__(self, ws: ClientConnection, validator: jsonschema.protocols.Validator) -> None:
        self.ws = ws
        self.validator = validator
        self.received: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(data, bytes):
            raise ScenarioFailed("unexpected binary frame")
        frame: dict[str, Any] = json.loads(data)
        errors = sorted(self.validator.iter_errors(frame), key=lambda e: e.path)
        if errors:
            raise ScenarioFailed(f"frame fails the schema: {errors[0].message[:120]}")
        self.received.append(frame)
        return frame

    async def expect(self, *types: str, timeout: float = 10.0) -> dict[str, Any]:
        frame = await self.recv(timeout)
        if frame["type"] not in types:
            raise ScenarioFailed(f"expected {'/'.join(types)}, got {_brief(frame)}")
        return frame

    async def expect_close(self, *codes: int, timeout: float = 10.0) -> int:
        try:
            while True:
                await self.recv(timeout)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
        if codes and code not in codes:
            raise ScenarioFailed(f"closed with {code}, expected {'/'.join(map(str, codes))}")
        return code


def _brief(frame: dict[str, Any]) -> str:
    if frame.get("type") == "error":
        return f"error {frame.get('name')}"
    return str(frame.get("type"))


class Kit:
    def __init__(
        self, url: str, token: str | None, timeout: float, tls: ssl.SSLContext | None = None
    ) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout
        self.tls = tls
        self.validator = jsonschema.Draft202012Validator(json_schema())
        self.key = SigningKey.generate()
        self.device_id: str | None = None
        self.limits: dict[str, Any] = {}
        self.peers: list[Peer] = []

    async def close_all(self) -> None:
        """Close every connection a scenario opened, whatever became of it."""
        for peer in self.peers:
            await peer.ws.close()
        self.peers.clear()

    async def open(self) -> Peer:
        # No `ssl` at all for the system's CAs: websockets refuses ssl=None for a wss:// URL.
        tls: dict[str, Any] = {} if self.tls is None else {"ssl": self.tls}
        ws = await connect(
            self.url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            proxy=None,
            max_size=None,
            open_timeout=self.timeout,
            **tls,
        )
        if ws.subprotocol != SUBPROTOCOL:
            await ws.close()
            raise ScenarioFailed(f"server did not select subprotocol {SUBPROTOCOL}")
        peer = Peer(ws, self.validator)
        self.peers.append(peer)
        return peer

    def hello(self, *, versions: list[str] | None = None, device: bool = True) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "type": "hello",
            "versions": versions or list(SUPPORTED_VERSIONS),
            "sdk": SDK,
            "capabilities": ["stream", "cancel", "feedback"],
        }
        if device and self.device_id:
            frame["device_id"] = self.device_id
        return frame

    def auth(self, challenge: dict[str, Any], key: SigningKey | None = None) -> dict[str, Any]:
        if self.device_id is None:
            raise ScenarioFailed("no enrolled device (enrollment failed or no --token)")
        ts = int(time.time())
        return {
            "type": "auth",
            "device_id": self.device_id,
            "nonce": challenge["nonce"],
            "timestamp": ts,
            "signature": sign_proof(
                key or self.key, "auth", challenge["server_id"], challenge["nonce"], ts,
                self.device_id,
            ),
        }  # fmt: skip

    async def session(self) -> Peer:
        """An authenticated session of the enrolled device."""
        if self.device_id is None:
            raise ScenarioFailed("no enrolled device (enrollment failed or no --token)")
        peer = await self.open()
        await peer.send(self.hello())
        challenge = await peer.expect("challenge")
        await peer.send(self.auth(challenge))
        welcome = await peer.expect("welcome")
        self.limits = welcome["limits"]
        return peer

    # --- scenarios ------------------------------------------------------------------------

    async def enrollment(self) -> str:
        if self.token is None:
            raise ScenarioFailed("no --token given")
        peer = await self.open()
        await peer.send(self.hello(device=False))
        challenge = await peer.expect("challenge")
        ts, public = int(time.time()), self.key.verify_key().b64()
        signature = sign_proof(
            self.key, "enroll", challenge["server_id"], challenge["nonce"], ts, public
        )
        await peer.send(
            {
                "type": "enroll",
                "token": self.token,
                "public_key": public,
                "nonce": challenge["nonce"],
                "timestamp": ts,
                "name": "conformance-kit",
                "signature": signature,
            }
        )
        enrolled = await peer.expect("enrolled")
        welcome = await peer.expect("welcome")
        if welcome["device_id"] != enrolled["device_id"]:
            raise ScenarioFailed("welcome names another device than enrolled")
        # The key handed out at enrollment is the one in use: the last of any rotations.
        rotations = [KeyEndorsement.model_validate(e) for e in welcome.get("signing_keys", [])]
        try:
            in_use = follow_key_rotation(enrolled["server_key"], rotations)
        except SignatureError as exc:
            raise ScenarioFailed(f"welcome's key rotations do not start from it: {exc}") from exc
        if in_use != enrolled["server_key"]:
            raise ScenarioFailed("enrolled hands out a key that welcome says was rotated out")
        self.device_id = enrolled["device_id"]
        await peer.ws.close()
        return f"device {self.device_id}"

    async def connect_(self) -> str:
        peer = await self.session()
        await peer.ws.close()
        return f"welcome, limits {self.limits}"

    async def replaced_session(self) -> str:
        older = await self.session()
        newer = await self.session()
        goodbye = await older.expect("goodbye")
        if goodbye["reason"] != "session_replaced":
            raise ScenarioFailed(f"the older session got {_brief(goodbye)}")
        code = await older.expect_close(4003)
        await newer.ws.close()
        return f"goodbye session_replaced, close {code}"

    async def bad_version(self) -> str:
        peer = await self.open()
        await peer.send(self.hello(versions=["99.0"]))
        error = await peer.expect("error")
        if error["name"] != "unsupported_version" or not (error.get("data") or {}).get("supported"):
            raise ScenarioFailed(f"got {_brief(error)} without data.supported")
        code = await peer.expect_close(4001)
        return f"unsupported_version {error['data']['supported']}, close {code}"

    async def bad_signature(self) -> str:
        if self.device_id is None:
            raise ScenarioFailed("no enrolled device")
        peer = await self.open()
        await peer.send(self.hello())
        challenge = await peer.expect("challenge")
        await peer.send(self.auth(challenge, key=SigningKey.generate()))
        error = await peer.expect("error")
        if error["name"] not in ("bad_signature", "auth_failed"):
            raise ScenarioFailed(f"got {_brief(error)}")
        code = await peer.expect_close(1008)
        return f"{error['name']}, close {code}"

    async def replayed_proof(self) -> str:
        first = await self.open()
        await first.send(self.hello())
        proof = self.auth(await first.expect("challenge"))
        await first.send(proof)
        await first.expect("welcome")
        await first.ws.close()
        second = await self.open()
        await second.send(self.hello())
        await second.expect("challenge")
        await second.send(proof)
        error = await second.expect("error")
        if error["name"] not in ("proof_replayed", "bad_signature", "auth_failed"):
            raise ScenarioFailed(f"replayed proof answered with {_brief(error)}")
        code = await second.expect_close(1008)
        return f"{error['name']}, close {code}"

    async def oversized_frame(self) -> str:
        peer = await self.session()
        limit = int(self.limits["max_message_bytes"])
        await peer.send(json.dumps({"type": "cancel", "request_id": "x", "reason": "x" * limit}))
        code = await peer.expect_close(1009)
        return f"{limit + 50} bytes against a {limit}-byte limit: close {code}"

    async def unknown_type(self) -> str:
        peer = await self.session()
        await peer.send({"type": "teleport"})
        error = await peer.expect("error")
        if error["name"] != "unknown_type":
            raise ScenarioFailed(f"got {_brief(error)}")
        key = new_idempotency_key()
        await peer.send(
            {"type": "feedback", "idempotency_key": key, "request_id": "r1", "rating": "positive"}
        )
        ack = await peer.expect("ack")
        await peer.ws.close()
        if ack["idempotency_key"] != key:
            raise ScenarioFailed("ack for another key")
        return "unknown_type, session still open"

    def escalate(self, request_id: str, text: str, *, stream: bool) -> dict[str, Any]:
        return {
            "type": "escalate", "request_id": request_id,
            "messages": [{"role": "user", "content": text}],
            "deadline_ms": int(self.timeout * 1000), "max_tokens": 32, "stream": stream,
        }  # fmt: skip

    async def streaming(self) -> str:
        peer = await self.session()
        rid = new_request_id()
        await peer.send(self.escalate(rid, "Give me one tip for hiking in the rain.", stream=True))
        pieces: list[str] = []
        while True:
            frame = await peer.expect("delta", "result", "error", timeout=self.timeout)
            if frame.get("request_id") != rid:
                raise ScenarioFailed(f"{frame['type']} for another request")
            if frame["type"] == "delta":
                if frame["seq"] != len(pieces):
                    raise ScenarioFailed(f"delta seq {frame['seq']}, expected {len(pieces)}")
                pieces.append(frame["text"])
                continue
            break
        await peer.ws.close()
        if frame["type"] == "error":
            if frame["retryable"]:
                return f"answered with retryable {frame['name']} (server busy), in order"
            raise ScenarioFailed(f"escalation failed: {frame['name']}")
        if pieces and "".join(pieces) != frame["text"]:
            raise ScenarioFailed("result text differs from the concatenated deltas")
        return f"{len(pieces)} deltas in order, then one result"

    async def cancel(self) -> str:
        peer = await self.session()
        rid = new_request_id()
        await peer.send(
            self.escalate(rid, "Write a long packing list for a month in the Andes.", stream=True)
        )
        await peer.send({"type": "cancel", "request_id": rid, "reason": "conformance"})
        terminal = None
        while terminal is None:
            frame = await peer.expect("delta", "result", "error", timeout=self.timeout)
            if frame["type"] != "delta":
                terminal = frame
        # Nothing more may come for it; a follow-up exchange proves the session is healthy.
        key = new_idempotency_key()
        await peer.send(
            {"type": "feedback", "idempotency_key": key, "request_id": rid, "rating": "negative"}
        )
        while True:
            frame = await peer.recv(self.timeout)
            if frame["type"] == "ack":
                break
            if frame.get("request_id") == rid:
                raise ScenarioFailed(f"{frame['type']} after the terminal frame")
        await peer.ws.close()
        return f"ended once with {_brief(terminal)}"

    async def feedback_resend(self) -> str:
        peer = await self.session()
        frame = {
            "type": "feedback", "idempotency_key": new_idempotency_key(),
            "request_id": "req_conformance", "rating": "positive",
        }  # fmt: skip
        await peer.send(frame)
        first = await peer.expect("ack")
        await peer.send(frame)  # as if the first ack had been lost
        second = await peer.expect("ack")
        await peer.ws.close()
        if first["idempotency_key"] != second["idempotency_key"] != frame["idempotency_key"]:
            raise ScenarioFailed("acks name another key")
        if not second.get("duplicate"):
            raise ScenarioFailed("the resend was not reported as a duplicate")
        return "acked twice, second as duplicate"


async def run_conformance(
    url: str, token: str | None, *, timeout: float = 30.0, tls: ssl.SSLContext | None = None
) -> ConformanceReport:
    """Every scenario against the server at `url`; `tls` checks a wss:// server's certificate
    (default: against the system's certificate authorities)."""
    kit = Kit(url, token, timeout, tls)
    scenarios: list[tuple[str, Callable[[], Awaitable[str]]]] = [
        ("enrollment", kit.enrollment),
        ("connect", kit.connect_),
        ("newer session replaces older", kit.replaced_session),
        ("bad version", kit.bad_version),
        ("bad signature", kit.bad_signature),
        ("replayed proof", kit.replayed_proof),
        ("oversized frame", kit.oversized_frame),
        ("unknown type", kit.unknown_type),
        ("escalate with streaming", kit.streaming),
        ("cancel", kit.cancel),
        ("feedback, lost-ack resend", kit.feedback_resend),
    ]
    outcomes = []
    for name, scenario in scenarios:
        started = time.perf_counter()
        try:
            detail = await asyncio.wait_for(scenario(), timeout + 5)
            passed = True
        except ScenarioFailed as exc:
            passed, detail = False, str(exc)
        except (TimeoutError, ConnectionClosed, OSError, ValueError, KeyError) as exc:
            passed, detail = False, f"{type(exc).__name__}: {exc}"[:160]
        finally:
            await kit.close_all()
        outcomes.append(Outcome(name, passed, detail, (time.perf_counter() - started) * 1000))
    return ConformanceReport(outcomes)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "conformance", help="check that a server at URL speaks edgeloop protocol v1"
    )
    parser.add_argument("url", help="WebSocket URL, e.g. ws://127.0.0.1:8765/v1")
    parser.add_argument("--token", help="one-time enrollment token for the kit's device")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per step")
    parser.add_argument(
        "--ca-file",
        type=Path,
        help="PEM file of the CAs a wss:// server's certificate is checked against "
        "(default: the system's)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        check_endpoint(args.url)
    except ValueError as exc:
        print(f"edgeloop conformance: error: {args.url!r}: {exc}", file=sys.stderr)
        return 2
    tls = tls_client_context(args.url, args.ca_file, key="--ca-file")
    report = asyncio.run(run_conformance(args.url, args.token, timeout=args.timeout, tls=tls))
    print(report.table())
    return 0 if report.passed else 1
