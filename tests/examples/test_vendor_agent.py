"""A third-party agent speaks to the real cloud from the published spec and schema alone."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from examples.vendor_agent import Agent, ProtocolViolation, run
from tests.cloud_fixtures import Cloud

pytestmark = pytest.mark.slow


async def test_a_vendor_agent_enrolls_streams_rates_and_comes_back(cloud: Cloud) -> None:
    token = await cloud.service.store.create_enrollment_token()
    out = await run(cloud.url, token, ("Is standard shipping free?", "How do I layer for snow?"))
    device_id = out["device_id"]
    assert [d.id for d in await cloud.service.store.list_devices()] == [device_id]
    # The store fact is quoted; the open question goes to the backend, streamed word by word.
    first, second = out["first"], out["second"]
    assert first.sources and "".join(first.deltas) == first.text
    assert second.text == "Layer up: base, mid, shell." and len(second.deltas) > 1
    assert out["ack_duplicate"] is False
    [interaction] = [
        i for i in await cloud.service.store.list_interactions() if i.rating is not None
    ]
    assert (interaction.device_id, interaction.rating) == (device_id, "positive")


async def test_the_vendor_agent_checks_what_it_sends_and_is_refused_a_used_token(
    cloud: Cloud,
) -> None:
    token = await cloud.service.store.create_enrollment_token()
    agent = Agent()
    session = await agent.open(cloud.url, token)
    with pytest.raises(jsonschema.ValidationError):
        await session.send({"type": "escalate", "request_id": "r1", "messages": []})
    await agent.close(session)
    with pytest.raises(ProtocolViolation, match="invalid_enrollment_token"):
        await Agent().open(cloud.url, token)


async def test_the_vendor_agent_trusts_a_private_certificate_it_is_given(
    tls_cloud: tuple[Cloud, Path],
) -> None:
    cloud, cert = tls_cloud
    questions = ("Is standard shipping free?", "How do I layer for snow?")
    token = await cloud.service.store.create_enrollment_token()
    with pytest.raises(ssl.SSLCertVerificationError):
        await run(cloud.url, token, questions)  # the system does not know this certificate
    out = await run(cloud.url, token, questions, ca_file=cert)
    assert cloud.url.startswith("wss://") and out["second"].text == "Layer up: base, mid, shell."


def test_the_vendor_agent_imports_nothing_of_edgeloop() -> None:
    code = "import sys, examples.vendor_agent; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in out.stdout.split()}
    assert "websockets" in loaded
    assert not loaded & {"protocol", "shared", "edge_agent", "cloud_agent"}
