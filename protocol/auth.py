"""Versions and the device's proof of key possession.

A device proves it holds its Ed25519 key by signing a payload that binds the proof to this
server (`server_id`), this connection (the `challenge` nonce) and this moment (`timestamp`,
checked against the server clock within `proof_window_s`). The payload is ASCII, lines joined
by ``\\n``, no trailing newline:

    edgeloop-proof/1
    <purpose: auth | enroll>
    <server_id>
    <nonce>
    <timestamp, decimal Unix seconds>
    <subject: device_id for auth, public_key (base64url) for enroll>

The cloud's bundle-signing key, which a device pins at enrollment, is rotated by endorsement:
the old key signs ``edgeloop-key/1\n<new public key>`` (`endorse_key`), and a device follows
the chain of endorsements the server sends in `welcome` (`follow_key_rotation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal
from urllib.parse import urlsplit

from protocol.parts import KeyEndorsement
from shared.errors import SignatureError
from shared.keys import SigningKey, VerifyKey, b64url_decode, b64url_encode

__all__ = [
    "SUBPROTOCOL",
    "SUPPORTED_VERSIONS",
    "check_endpoint",
    "endorse_key",
    "follow_key_rotation",
    "negotiate_version",
    "proof_payload",
    "sign_proof",
    "subprotocol_for",
    "verify_proof",
]

SUPPORTED_VERSIONS: tuple[str, ...] = ("1.0",)
"""Protocol versions this implementation speaks, oldest first."""

SUBPROTOCOL = "edgeloop.v1"
"""WebSocket subprotocol name; it carries the major version."""

ProofPurpose = Literal["auth", "enroll"]


def check_endpoint(url: str) -> str:
    """`url` if it can name a protocol endpoint (``ws://`` or ``wss://`` with a host), else
    ValueError saying what is wrong: an ``http://`` URL or a bare host fails here, at once,
    not as a connection that never comes up."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("ws", "wss"):
        raise ValueError("not a WebSocket URL: expected ws:// or wss://")
    if not parts.hostname or port == 0:
        raise ValueError("no host and port to connect to")
    return url


def subprotocol_for(version: str) -> str:
    return f"edgeloop.v{version.split('.', 1)[0]}"


def _parse(version: str) -> tuple[int, int]:
    major, minor = version.split(".", 1)
    return int(major), int(minor)


def negotiate_version(offered: list[str], supported: tuple[str, ...]) -> str | None:
    """The highest version both sides list, or None when they share none."""
    common = set(offered) & set(supported)
    return max(common, key=_parse) if common else None


def proof_payload(
    purpose: ProofPurpose, server_id: str, nonce: str, timestamp: int, subject: str
) -> bytes:
    """The exact bytes a device signs to authenticate or enroll."""
    lines = ("edgeloop-proof/1", purpose, server_id, nonce, str(timestamp), subject)
    return "\n".join(lines).encode("utf-8")


def sign_proof(
    key: SigningKey,
    purpose: ProofPurpose,
    server_id: str,
    nonce: str,
    timestamp: int,
    subject: str,
) -> str:
    """Sign a proof payload; returns the base64url signature for the wire."""
    return b64url_encode(key.sign(proof_payload(purpose, server_id, nonce, timestamp, subject)))


def verify_proof(
    key: VerifyKey,
    signature: str,
    purpose: ProofPurpose,
    server_id: str,
    nonce: str,
    timestamp: int,
    subject: str,
) -> None:
    """Raise `SignatureError` unless `signature` signs this proof with `key`."""
    try:
        raw = b64url_decode(signature)
    except ValueError as exc:
        raise SignatureError("signature is not base64url") from exc
    key.verify(raw, proof_payload(purpose, server_id, nonce, timestamp, subject))


def _endorsement_payload(public_key: str) -> bytes:
    return f"edgeloop-key/1\n{public_key}".encode("ascii")


def endorse_key(previous: SigningKey, new: VerifyKey) -> KeyEndorsement:
    """`previous` vouches for `new`, the key that replaces it."""
    public_key = new.b64()
    signature = b64url_encode(previous.sign(_endorsement_payload(public_key)))
    return KeyEndorsement(public_key=public_key, signature=signature)


def follow_key_rotation(pinned: str, chain: Sequence[KeyEndorsement]) -> str:
    """The key a device pinning `pinned` (base64url) pins after the rotations in `chain`
    (oldest first): the last key, once every endorsement after `pinned` checks out; `pinned`
    itself when it is the last. Raises `SignatureError` when an endorsement does not verify,
    or when `pinned` is neither in the chain nor the key that endorsed its first entry."""
    keys = [entry.public_key for entry in chain]
    start = keys.index(pinned) + 1 if pinned in keys else 0
    endorser = pinned
    for entry in chain[start:]:
        try:
            signature = b64url_decode(entry.signature)
        except ValueError as exc:
            raise SignatureError("endorsement signature is not base64url") from exc
        VerifyKey.from_b64(endorser).verify(signature, _endorsement_payload(entry.public_key))
        endorser = entry.public_key
    return endorser
