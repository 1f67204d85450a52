"""A device follows the rotations of the cloud's bundle-signing key by endorsement only."""

from __future__ import annotations

import pytest

from protocol import KeyEndorsement, endorse_key, follow_key_rotation
from shared import SignatureError, SigningKey

K0, K1, K2 = (SigningKey.generate() for _ in range(3))
CHAIN = [endorse_key(K0, K1.verify_key()), endorse_key(K1, K2.verify_key())]


def b64(key: SigningKey) -> str:
    return key.verify_key().b64()


@pytest.mark.parametrize("pinned", [K0, K1, K2], ids=["first", "middle", "last"])
def test_a_device_pinned_anywhere_on_the_chain_moves_to_the_last_key(pinned: SigningKey) -> None:
    assert follow_key_rotation(b64(pinned), CHAIN) == b64(K2)


def test_no_rotation_leaves_the_pin_alone() -> None:
    assert follow_key_rotation(b64(K0), []) == b64(K0)


def test_an_endorsement_by_another_key_is_refused() -> None:
    stranger = SigningKey.generate()
    forged = [CHAIN[0], endorse_key(stranger, SigningKey.generate().verify_key())]
    with pytest.raises(SignatureError):
        follow_key_rotation(b64(K0), forged)
    # A chain that does not start from the device's key cannot move it either.
    with pytest.raises(SignatureError):
        follow_key_rotation(b64(stranger), CHAIN)


def test_an_endorsement_of_another_key_than_it_names_is_refused() -> None:
    swapped = KeyEndorsement(public_key=b64(SigningKey.generate()), signature=CHAIN[0].signature)
    with pytest.raises(SignatureError):
        follow_key_rotation(b64(K0), [swapped])
