"""The README's main job runs end to end over real WebSockets on loopback."""

from __future__ import annotations

import pytest

from examples.handshake import run_handshake

pytestmark = pytest.mark.slow


async def test_handshake_demo_enrolls_authenticates_and_refuses_what_it_must() -> None:
    rows = {name: outcome for name, outcome, _ in await run_handshake()}
    assert rows["enroll with a one-time token"].startswith("device dev_")
    assert "duplicate=True; stored 1" in rows["authenticate, feedback, lost-ack resend"]
    assert rows["reuse the enrollment token"] == "refused: invalid_enrollment_token, close 1008"
    assert rows["wrong key for the device id"] == "refused: bad_signature, close 1008"
    assert rows["unsupported protocol version"] == "refused: unsupported_version, close 4001"
