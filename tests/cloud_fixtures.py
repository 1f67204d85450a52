"""Fixtures: a real cloud service on loopback with a scripted backend, and devices for it."""

from __future__ import annotations

import contextlib
import copy
import datetime
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud_agent.backends import ChatRequest, ScriptedBackend
from cloud_agent.config import CloudConfig
from cloud_agent.service import CloudService
from examples.handshake import Device
from protocol import DeviceCredentials, EnrollmentCompleted, EnrollmentCredentials, Welcomed
from shared import SigningKey


def recall(request: ChatRequest) -> str:
    """A `ScriptedBackend` answer: every earlier turn it was given, so a test sees what of a
    conversation reached the cloud."""
    turns = [f"{t.role}={t.content}" for t in request.messages if t.role != "system"][:-1]
    return " | ".join(turns) or "no history"


@dataclass
class Cloud:
    service: CloudService
    backend: ScriptedBackend
    scheme: str = "ws"
    """wss for a service given a certificate (`tls_cloud`)."""

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.service.port}/v1"

    async def enroll(self, **kw: Any) -> tuple[Device, DeviceCredentials]:
        """Enroll a new device; returns its open session and its credentials."""
        key = SigningKey.generate()
        token = await self.service.store.create_enrollment_token()
        device = await Device.connect(self.url, EnrollmentCredentials(token, key), **kw)
        done = await device.next_event(EnrollmentCompleted)
        assert isinstance(done, EnrollmentCompleted), done
        assert isinstance(await device.next_event(Welcomed), Welcomed)
        return device, DeviceCredentials(done.device_id, key)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 that signs itself (its own CA), and its key:
    `cert.pem` and `key.pem` in `tmp_path`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def make_config(tmp_path: Path, kb_path: Path | None, **overrides: Any) -> CloudConfig:
    data: dict[str, Any] = {
        "data_dir": tmp_path / "cloud",
        "port": 0,
        "admin_port": 0,
        "knowledge": kb_path,
        "store_name": "Northwind Outfitters",
        "shutdown_grace_s": 2.0,
    }
    data.update(overrides)
    return CloudConfig.model_validate(data)


@contextlib.asynccontextmanager
async def replicas_of_one_cluster(
    tmp_path: Path, kb_path: Path | None, database_url: str, n: int = 2, **overrides: Any
) -> AsyncIterator[list[CloudService]]:
    """`n` started services on one database with one signing key (the first one's, copied as
    an operator would), replica `i` answering "replica i"; stopped on the way out, before a
    test's database goes."""
    started: list[CloudService] = []
    try:
        for i in range(n):
            config = make_config(
                tmp_path / f"r{i}", kb_path, database_url=database_url, **overrides
            )
            if started:
                started[0].signing_key.save(config.data_dir / "server.key")
            service = await CloudService.create(config, backend=ScriptedBackend(f"replica {i}"))
            await service.start()
            started.append(service)
        yield started
    finally:
        for service in started:
            await service.stop()


@pytest.fixture
async def cloud(
    tmp_path: Path, kb_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Cloud]:
    marker = request.node.get_closest_marker("cloud")
    options = dict(marker.kwargs) if marker else {}
    # A marker's backend is built once, when the module is imported: each run of the test (one
    # per event loop, `every_event_loop`) takes a copy, so calls and closing do not carry over.
    template = options.pop("backend", None)
    backend = (
        copy.deepcopy(template) if template else ScriptedBackend("Layer up: base, mid, shell.")
    )
    service = await CloudService.create(make_config(tmp_path, kb_path, **options), backend=backend)
    await service.start()
    try:
        yield Cloud(service, backend)
    finally:
        await service.stop()


@pytest.fixture
async def tls_cloud(tmp_path: Path, kb_path: Path) -> AsyncIterator[tuple[Cloud, Path]]:
    """The cloud served over wss:// with a self-signed certificate, and the certificate (the
    CA a client must be given to trust it)."""
    cert, key = self_signed(tmp_path)
    backend = ScriptedBackend("Layer up: base, mid, shell.")
    config = make_config(tmp_path, kb_path, tls_cert=cert, tls_key=key)
    service = await CloudService.create(config, backend=backend)
    await service.start()
    try:
        yield Cloud(service, backend, scheme="wss"), cert
    finally:
        await service.stop()
