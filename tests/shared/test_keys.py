from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shared import KeyFileError, SignatureError, SigningKey, VerifyKey, b64url_decode, b64url_encode


def test_a_signature_verifies_with_its_key_and_not_with_another() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    sig = key.sign(b"bundle manifest")
    key.verify_key().verify(sig, b"bundle manifest")
    with pytest.raises(SignatureError):
        other.verify_key().verify(sig, b"bundle manifest")
    with pytest.raises(SignatureError):
        key.verify_key().verify(sig, b"bundle manifesT")


def test_keys_round_trip_through_pem_files_and_the_private_one_is_owner_only(
    tmp_path: Path,
) -> None:
    key = SigningKey.generate()
    key.save(tmp_path / "device.key")
    key.verify_key().save(tmp_path / "device.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "device.key").st_mode) == 0o600
    loaded = SigningKey.load(tmp_path / "device.key")
    assert loaded.verify_key() == key.verify_key() == VerifyKey.load(tmp_path / "device.pub")


def test_load_or_create_creates_once_then_loads(tmp_path: Path) -> None:
    first = SigningKey.load_or_create(tmp_path / "k" / "device.key")
    second = SigningKey.load_or_create(tmp_path / "k" / "device.key")
    assert first.verify_key() == second.verify_key()


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
)
def test_a_bad_key_file_raises_key_file_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        SigningKey.load(path)
    with pytest.raises(KeyFileError):
        VerifyKey.load(path)


def test_a_missing_key_file_raises_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        SigningKey.load(tmp_path / "absent.key")


def test_a_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.key").write_bytes(pem)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        SigningKey.load(tmp_path / "ec.key")


def test_wire_encoding_is_unpadded_base64url() -> None:
    key = SigningKey.generate().verify_key()
    text = key.b64()
    assert len(text) == 43 and "=" not in text
    assert VerifyKey.from_b64(text) == key
    assert b64url_decode(b64url_encode(b"\xff\xfe\x00")) == b"\xff\xfe\x00"
    with pytest.raises(ValueError):
        b64url_decode("not base64!")
    with pytest.raises(SignatureError):
        VerifyKey.from_b64("AAAA")
