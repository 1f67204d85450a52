"""Ed25519 keys and signatures, on top of `cryptography`.

Keys are stored as PEM files (PKCS#8 for private keys, written with mode 0600; SubjectPublicKeyInfo
for public keys). On the wire, public keys and signatures travel as unpadded base64url of their
raw bytes (32 and 64 bytes).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import KeyFileError, SignatureError

__all__ = ["SigningKey", "VerifyKey", "b64url_decode", "b64url_encode"]


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url, as used on the wire."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of `b64url_encode`; raises `ValueError` on anything that is not base64url."""
    if not all(c.isalnum() or c in "-_" for c in text):
        raise ValueError("not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not unpadded base64url") from exc


class VerifyKey:
    """The public half of an Ed25519 key pair."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key

    @classmethod
    def from_raw(cls, raw: bytes) -> VerifyKey:
        if len(raw) != 32:
            raise SignatureError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        return cls(Ed25519PublicKey.from_public_bytes(raw))

    @classmethod
    def from_b64(cls, text: str) -> VerifyKey:
        try:
            raw = b64url_decode(text)
        except ValueError as exc:
            raise SignatureError("public key is not base64url") from exc
        return cls.from_raw(raw)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VerifyKey:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except OSError as exc:
            raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from exc
        except ValueError as exc:
            raise KeyFileError(f"{path} is not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def save(self, path: str | os.PathLike[str]) -> None:
        pem = self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        Path(path).write_bytes(pem)

    def raw(self) -> bytes:
        return self._key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def b64(self) -> str:
        return b64url_encode(self.raw())

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise `SignatureError` unless `signature` is this key's signature of `message`."""
        try:
            self._key.verify(signature, message)
        except InvalidSignature as exc:
            raise SignatureError("signature does not verify") from exc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and self.raw() == other.raw()

    def __hash__(self) -> int:
        return hash(self.raw())

    def __repr__(self) -> str:
        return f"VerifyKey({self.b64()})"


class SigningKey:
    """The private half of an Ed25519 key pair."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except OSError as exc:
            raise KeyFileError(f"cannot read private key {path}: {exc.strerror}") from exc
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path} is not an unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> SigningKey:
        """Load the key at `path`, or create one there if no file exists yet."""
        if Path(path).exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        return key

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as PKCS#8 PEM, readable by the owner only, atomically."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def verify_key(self) -> VerifyKey:
        return VerifyKey(self._key.public_key())

    def __repr__(self) -> str:
        return f"SigningKey(public={self.verify_key().b64()})"
