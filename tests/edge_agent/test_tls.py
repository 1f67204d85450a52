"""A cloud served over wss:// with a certificate no public CA signed (a private CA, here the
certificate itself): the device's link, the edge commands and the conformance kit trust the
CA they are given, and refuse the cloud, saying why, when they are not."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from cloud_agent.conformance import run_conformance
from edge_agent.link import CloudLink
from protocol import ChatMessage, Escalate, Result
from shared.cli import main
from shared.errors import ConfigError
from shared.ids import new_request_id
from shared.net import tls_client_context
from tests.cloud_fixtures import Cloud
from tests.edge_agent.test_http_and_cli import edge_cli

pytestmark = pytest.mark.slow


async def test_the_link_trusts_the_ca_it_is_given_and_no_other(
    tls_cloud: tuple[Cloud, Path], tmp_path: Path
) -> None:
    cloud, ca = tls_cloud
    token = await cloud.service.store.create_enrollment_token()
    system_trust = CloudLink(cloud.url, tmp_path / "a", enrollment_token=token)
    system_trust.start()
    assert not await system_trust.wait_up(2)
    assert isinstance(system_trust.last_error, ssl.SSLCertVerificationError)
    await system_trust.stop()
    assert await cloud.service.store.list_devices() == [], "nothing got past TLS"

    link = CloudLink(
        cloud.url,
        tmp_path / "b",
        enrollment_token=token,
        ssl=tls_client_context(cloud.url, ca, key="ca_file"),
    )
    link.start()
    assert await link.wait_up(10) and link.enrolled
    request = Escalate(
        request_id=new_request_id(),
        messages=[ChatMessage(role="user", content="How should I dress for a winter hike?")],
        deadline_ms=5000,
        max_tokens=32,
    )
    [result] = [item async for item in link.escalate(request)]
    assert isinstance(result, Result) and result.text == "Layer up: base, mid, shell."
    await link.stop()


def test_a_ca_file_is_checked_when_the_link_is_made(tmp_path: Path) -> None:
    url = "wss://cloud.example:8765/v1"
    assert tls_client_context(url, None, key="ca_file") is None, "the system's CAs"
    assert tls_client_context("ws://127.0.0.1:8765/v1", tmp_path / "x", key="ca_file") is None
    with pytest.raises(ConfigError, match="no such file") as missing:
        tls_client_context(url, tmp_path / "missing.pem", key="ca_file")
    assert missing.value.key == "ca_file"
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="no certificate could be read"):
        tls_client_context(url, tmp_path / "ca.pem", key="ca_file")


async def test_enroll_over_wss_with_the_ca_file_and_says_why_without_it(
    tls_cloud: tuple[Cloud, Path], tmp_path: Path
) -> None:
    cloud, ca = tls_cloud
    token = await cloud.service.store.create_enrollment_token()
    enroll = ["enroll", "--state-dir", str(tmp_path / "dev"), "--cloud", cloud.url]
    untrusted = await asyncio.to_thread(edge_cli, [*enroll, "--token", token])
    assert untrusted.returncode == 1, untrusted.stderr
    assert "is not trusted" in untrusted.stderr and "--ca-file" in untrusted.stderr
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    bad = await asyncio.to_thread(edge_cli, [*enroll, "--token", token, "--ca-file", str(not_pem)])
    assert bad.returncode == 1 and "'ca_file'" in bad.stderr and "Traceback" not in bad.stderr
    done = await asyncio.to_thread(edge_cli, [*enroll, "--token", token, "--ca-file", str(ca)])
    assert done.returncode == 0 and "enrolled as" in done.stdout, done.stderr
    [device] = await cloud.service.store.list_devices()
    assert device.id in done.stdout


async def test_the_conformance_kit_checks_a_wss_server_against_its_ca(
    tls_cloud: tuple[Cloud, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cloud, ca = tls_cloud
    token = await cloud.service.store.create_enrollment_token()
    report = await run_conformance(cloud.url, token, timeout=10)
    assert not report.passed and "CERTIFICATE_VERIFY_FAILED" in report.outcomes[0].detail
    args = ["conformance", cloud.url, "--token", token, "--ca-file", str(ca), "--timeout", "10"]
    code = await asyncio.to_thread(main, args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAIL" not in out and "escalate with streaming" in out
